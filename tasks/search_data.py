"""The search's hold-out: a fixed part of the training images, never the validation split."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from datamodules.classification import ClassificationDataModule, ImageFolderDataset, scan_image_folder
from datamodules.common import DataError


def split_holdout(samples: list[tuple[Path, int]], per_class: int, seed: int = 0) -> tuple[list, list]:
    """``(train, holdout)``: per class, ``per_class`` images picked by a shuffle of the sorted paths seeded by
    ``(seed, class)``, so the same files are held out on every machine and by every run (the supernet's training
    must leave out the same ones). A class with too few images raises."""
    by_class: dict[int, list[Path]] = defaultdict(list)
    for path, label in samples:
        by_class[label].append(path)
    train, holdout = [], []
    for label in sorted(by_class):
        paths = sorted(by_class[label])
        if len(paths) <= per_class:
            raise DataError(f"class {label} has {len(paths)} training images; cannot hold out {per_class} and train")
        random.Random(f"{seed}-{label}").shuffle(paths)
        holdout += [(p, label) for p in paths[:per_class]]
        train += [(p, label) for p in paths[per_class:]]
    return sorted(train), sorted(holdout)


def holdout_batches(data_hparams: dict[str, Any], per_class: int, batch_size: int, num_workers: int = 0,
                    cache_limit_bytes: float = 2**31) -> list[tuple[torch.Tensor, torch.Tensor]] | DataLoader:
    """The hold-out images with the evaluation transform of the data module ``data_hparams`` describes: a list
    of decoded batches when they fit in ``cache_limit_bytes``, a loader otherwise."""
    data = ClassificationDataModule(**data_hparams)
    hp = data.hparams
    _, samples = scan_image_folder(data.data_root() / hp.train_dir, data.class_names)
    _, holdout = split_holdout(samples, per_class)
    loader = DataLoader(ImageFolderDataset(holdout, data.eval_transform()), batch_size=batch_size,
                        num_workers=num_workers)
    if len(holdout) * 3 * 4 * hp.image_size**2 > cache_limit_bytes:
        return loader
    return [(b["input"], b["target"]) for b in loader]
