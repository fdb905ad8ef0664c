"""Write tests/data/releases/big_vision/ with google-research/big_vision's own ViT code (not run by CI).

    git clone https://github.com/google-research/big_vision /tmp/src/big_vision
    python -m venv --system-site-packages /tmp/envs/bv && /tmp/envs/bv/bin/pip install "jax[cpu]" flax ml_collections
    /tmp/envs/bv/bin/python tools/release_fixtures/big_vision.py --repo /tmp/src/big_vision

Tiny ViTs of ``big_vision.models.vit.Model`` (random initialisation, fixed seed, every parameter perturbed so none sits
at a trivial value) are saved as big_vision saves parameters: the tree flattened by ``big_vision.utils
.tree_flatten_with_names`` into an ``.npz``, bare (as open-sourced) or under ``params/`` (a training checkpoint). Their
logits for a fixed input are saved beside them, and for every full-size ViT preset of ours a manifest of every
parameter's name and shape (``jax.eval_shape``: nothing allocated).

big_vision's ``utils.py`` imports ``tensorflow.io.gfile`` for file access this script does not use: an empty module
stands in for it (nothing else is changed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[2] / "tests/data/releases/big_vision"
TINY = {"patch_size": (4, 4), "width": 32, "depth": 2, "mlp_dim": 48, "num_heads": 2, "head_zeroinit": False}
CASES = {  # file -> (pool_type, scan, prefix, posemb)
    "vit_gap.npz": ("gap", False, "", "learn"),
    "vit_tok_scan.npz": ("tok", True, "params/", "learn"),
    "vit_map.npz": ("map", False, "params/", "learn"),
    "vit_sincos.npz": ("gap", False, "", "sincos2d"),  # configs/vit_s16_i1k.py: no pos_embedding parameter
}
# our preset -> big_vision variant and head; g/14 and G/14 as in Zhai et al. (MAP head)
PRESETS = {
    "vit_tiny_patch16": ("Ti/16", "gap"), "vit_small_patch16": ("S/16", "gap"), "vit_base_patch16": ("B/16", "gap"),
    "vit_large_patch16": ("L/16", "gap"), "vit_tiny_patch32": ("Ti/32", "gap"), "vit_small_patch32": ("S/32", "gap"),
    "vit_base_patch32": ("B/32", "gap"), "vit_large_patch32": ("L/32", "gap"),
    "vit_giant_patch14": ("g/14", "map"), "vit_gigantic_patch14": ("G/14", "map"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repo", type=Path, required=True, help="a checkout of google-research/big_vision")
    args = parser.parse_args()
    import flax  # (flax probes for tensorflow once: before the stand-in exists)
    import flax.training.checkpoints
    import jax
    import jax.numpy as jnp

    gfile = types.ModuleType("tensorflow.io.gfile")
    tf, tf_io = types.ModuleType("tensorflow"), types.ModuleType("tensorflow.io")
    tf.io, tf_io.gfile = tf_io, gfile
    sys.modules.update({"tensorflow": tf, "tensorflow.io": tf_io, "tensorflow.io.gfile": gfile})
    sys.path.insert(0, str(args.repo))
    from big_vision import utils
    from big_vision.models import vit

    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    image = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)  # NCHW, as our models take it
    np.save(OUT / "input.npy", image)
    for i, (name, (pool, scan, prefix, posemb)) in enumerate(CASES.items()):
        model = vit.Model(num_classes=5, pool_type=pool, scan=scan, posemb=posemb, **TINY)
        params = model.init(jax.random.PRNGKey(i), jnp.zeros((1, 16, 16, 3)))["params"]
        params = jax.tree.map(lambda p: p + 0.2 * rng.standard_normal(p.shape).astype(np.float32), params)
        logits, _ = model.apply({"params": params}, jnp.asarray(image.transpose(0, 2, 3, 1)))
        names_and_values, _ = utils.tree_flatten_with_names(params)
        np.savez(OUT / name, **{prefix + k: np.asarray(v) for k, v in names_and_values})
        np.save(OUT / name.replace(".npz", "_logits.npy"), np.asarray(logits))
        print(name, pool, scan, repr(prefix), posemb, len(names_and_values), "arrays")
    manifests = {}
    for ours, (variant, pool) in PRESETS.items():
        model = vit.Model(num_classes=1000, variant=variant, pool_type=pool)
        shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3), jnp.float32))["params"]
        names_and_shapes, _ = utils.tree_flatten_with_names(shapes)
        manifests[ours] = {"variant": variant, "pool_type": pool, "img_size": 224, "num_classes": 1000,
                           "keys": {k: list(v.shape) for k, v in names_and_shapes}}
    (OUT / "manifests.json").write_text(json.dumps(manifests, indent=0) + "\n")
    commit = subprocess.run(["git", "-C", str(args.repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout
    print("big_vision commit", commit.strip() or "(not a git checkout)", "jax", jax.__version__, "flax", flax.__version__)


if __name__ == "__main__":
    main()
