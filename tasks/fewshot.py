"""Few-shot linear evaluation of a trained classifier's frozen features, as big_vision does it
(``engine/fewshot.py``: closed-form ridge regression on 1, 5, 10, 25 shots per class, mean ± std over seeds).

``python -m tasks.fewshot --config configs/vit_small_patch16.yaml --ckpt_path runs/.../last.ckpt --data.root DIR``
(any classification config; without ``--data.root`` the built-in synthetic data). Writes a table, a CSV and an SVG plot.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from backbones.weights import load_pretrained
from datamodules.classification import ClassificationDataModule
from engine.cli import run_cli
from engine.fewshot import check_shots, extract_features, fewshot_datasets, fewshot_table, write_results

from .classification import ClassificationModule


def main(argv: Sequence[str] | None = None) -> dict[int, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", help="our checkpoint (or any file pretrained= reads); none: the config's weights")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10, 25])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--l2_reg", type=float, default=1024.0)
    parser.add_argument("--out", type=Path, default=Path("runs/fewshot"))
    ours, rest = parser.parse_known_args(argv)
    cli = run_cli(ClassificationModule, ClassificationDataModule, args=[*rest, "--trainer.logger=false"], run=False)
    model, data = cli.model, cli.datamodule
    if ours.ckpt_path:
        print(load_pretrained(model, ours.ckpt_path).summary())
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    data.prepare_data()
    train_set, val_set = fewshot_datasets(data)
    check_shots(train_set, ours.shots, data.class_names)
    pin = torch.cuda.is_available()
    loader = lambda ds: DataLoader(ds, batch_size=data.hparams.batch_size, num_workers=data.num_workers, pin_memory=pin)  # noqa: E731
    features = [tuple(t.cpu() for t in extract_features(model, loader(ds))) for ds in (train_set, val_set)]
    results = fewshot_table(features[0], features[1], data.class_names, ours.shots, range(ours.seeds), ours.l2_reg)
    print(write_results(results, ours.out))
    return results


if __name__ == "__main__":
    main()
