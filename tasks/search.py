"""Network search over a trained super-network: ``python -m tasks.search --config configs/search/<space>.yaml
--ckpt_path runs/.../last.ckpt`` (the search engine is the ``search`` package; this is its command line)."""

from search.run import main

if __name__ == "__main__":
    main()
