"""The search's data: the hold-out a candidate is scored on, a fixed part of the training images (never the
validation split), and the calibration batches that re-estimate a candidate's BatchNorm statistics.

The rule that picks the hold-out is ``datamodules.classification.split_holdout``; a super-network trained with
``data.search_holdout_per_class`` at least as large never saw these images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from datamodules.classification import ClassificationDataModule, ImageFolderDataset


@dataclass
class HoldoutSettings:
    """Where the fitness images come from: ``root`` (``None``: the checkpoint's data) and how many per class; with
    ``calibration_batches`` > 0, that many batches of the other training images re-estimate each candidate's
    BatchNorm statistics before it is scored (0: the super-network's statistics)."""

    root: str | None = None
    search_holdout_per_class: int = 25
    batch_size: int = 100
    num_workers: int = 0
    calibration_batches: int = 0


def check_holdout_unseen(data_hparams: dict[str, Any], per_class: int) -> None:
    """Say so when the super-network's training (``data_hparams``) did not leave out the ``per_class`` hold-out:
    its fitness would then be measured partly on images it trained on."""
    trained_without = data_hparams.get("search_holdout_per_class", 0)
    if trained_without < per_class:
        print(f"warning: the super-network trained with data.search_holdout_per_class={trained_without}, fewer than "
              f"the search's hold-out of {per_class} per class: some hold-out images were trained on")


def holdout_dataset(data_hparams: dict[str, Any], per_class: int) -> ImageFolderDataset:
    """The hold-out images with the evaluation transform of the data module ``data_hparams`` describes."""
    data = ClassificationDataModule(**data_hparams)
    return ImageFolderDataset(data.search_holdout(per_class), data.eval_transform())


def holdout_batches(data_hparams: dict[str, Any], per_class: int, batch_size: int, num_workers: int = 0,
                    cache_limit_bytes: float = 2**31) -> list[tuple[torch.Tensor, torch.Tensor]] | DataLoader:
    """``holdout_dataset``: a list of decoded batches when they fit in ``cache_limit_bytes``, a loader otherwise."""
    dataset = holdout_dataset(data_hparams, per_class)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    if dataset[0]["input"].numel() * 4 * len(dataset) > cache_limit_bytes:  # fp32 bytes of every decoded image
        return loader
    return [(b["input"], b["target"]) for b in loader]


def calibration_batches(data_hparams: dict[str, Any], per_class: int, count: int,
                        batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of training images outside the hold-out of ``per_class`` images per class, evaluation
    transform, a fixed shuffle."""
    if count <= 0:
        return []
    data = ClassificationDataModule(**{**data_hparams, "search_holdout_per_class": per_class})
    samples = data.training_samples()
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0)).tolist()
    picked = [samples[i] for i in order[: count * batch_size]]
    loader = DataLoader(ImageFolderDataset(picked, data.eval_transform()), batch_size=batch_size)
    return [(b["input"], b["target"]) for b in loader]
