"""ImageFolder classification data: ``root/train/<class>/*.png``, ``root/val/<class>/*.png``."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image
from torch.utils.data import Dataset

from .common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CheckFiles,
    DataError,
    TaskDataModule,
    check_images,
    format_list,
    list_images,
    read_image,
)
from .synthetic import SHAPE_CLASSES, synthetic_shapes


def scan_image_folder(folder: Path, classes: Sequence[str] | None = None) -> tuple[list[str], list[tuple[Path, int]]]:
    """Classes (sorted sub-folder names) and ``(path, class index)`` samples; empty classes raise."""
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise DataError(f"{folder} has no class sub-folders (expected {folder}/<class name>/<image>)")
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{folder} has class folders not in the training classes: {format_list(unknown)}")
    samples: list[tuple[Path, int]] = []
    for name in found:
        images = list_images(folder / name)
        if not images:
            raise DataError(f"class folder {folder / name} holds no image files")
        samples += [(p, classes.index(name)) for p in images]
    return list(classes), samples


def split_holdout(
    samples: Sequence[tuple[Path, int]], per_class: int, seed: int = 0
) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """``(train, holdout)``: per class, ``per_class`` images picked by a shuffle of the sorted paths seeded by
    ``(seed, class)``, so the same files are held out on every machine and by every run: the super-network's
    training (``search_holdout_per_class``) and the search's fitness use this one rule. A smaller ``per_class``
    holds out a subset of a larger one. A class with too few images raises."""
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


class TimmRandAugment:
    """timm's RandAugment (``rand-m9-mstd0.5-inc1`` strings) applied to the numpy image in an albumentations
    pipeline; a class rather than a lambda so loader workers can pickle it."""

    def __init__(self, config: str, image_size: int, mean: Sequence[float]) -> None:
        from timm.data.auto_augment import rand_augment_transform

        hparams = {"translate_const": int(image_size * 0.45), "img_mean": tuple(round(255 * m) for m in mean)}
        self.transform = rand_augment_transform(config, hparams)

    def __call__(self, image: np.ndarray, **kwargs: Any) -> np.ndarray:
        return np.asarray(self.transform(Image.fromarray(image)))


class ImageFolderDataset(Dataset):
    """``(path, label)`` samples decoded with PIL and transformed with albumentations."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: A.Compose) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.samples[index]
        image = self.transform(image=read_image(path))["image"]
        return {"input": image, "target": torch.tensor(label), "index": index, "path": str(path)}


class ClassificationDataModule(TaskDataModule):
    """ImageFolder train/val(/test) splits with albumentations pipelines; synthetic shapes by default.

    Args:
        root: folder with ``train/`` and ``val/`` ImageFolder trees; ``None`` writes and uses the built-in
            synthetic shapes set (PNG, same layout).
        train_dir, val_dir, test_dir: sub-folders of ``root``; ``test_dir=None`` tests on ``val_dir``.
        predict_dir: folder of images (any layout) for ``predict``; ``None`` predicts ``root/val_dir``.
        image_size: side of the square crops fed to the model.
        crop_scale: area range of the training RandomResizedCrop.
        crop_pct: evaluation resizes the short side to ``image_size / crop_pct`` then center-crops.
        hflip: horizontal flip probability in training.
        color_jitter: strength of brightness/contrast/saturation jitter in training (0 disables).
        rand_augment: timm RandAugment config string (``rand-m9-mstd0.5-inc1`` in DeiT), ``None`` for none.
        random_erasing: probability of random erasing with noise after normalisation (0.25 in DeiT).
        interpolation: resampling of resize/crop (``bicubic`` as in the ViT/DeiT recipes).
        mean, std: normalisation, in 0..1 units.
        batch_size: per process; the effective batch is ``batch_size * devices * nodes * accumulate``.
        num_workers: loader processes.
        check_files: at setup, ``true``/``full`` decodes every image (in threads, timed) so a corrupt or truncated
            file fails now, not mid-epoch; ``header`` reads headers only (fast, misses truncated files);
            ``false``/``none`` skips the check.
        search_holdout_per_class: training images per class left out of training (``split_holdout``) for a
            network search's fitness (``python -m tasks.search``); 0 trains on all of them.
        synthetic_size, synthetic_train_per_class, synthetic_val_per_class: shape of the default data set (more
            validation images give a tighter estimate: 100 per class put a standard error of about a point on a
            top-1 of 0.95; the training images stay the same whatever the count).
    """

    def __init__(
        self,
        root: str | None = None,
        *,
        train_dir: str = "train",
        val_dir: str = "val",
        test_dir: str | None = None,
        predict_dir: str | None = None,
        image_size: int = 224,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_pct: float = 0.875,
        hflip: float = 0.5,
        color_jitter: float = 0.0,
        rand_augment: str | None = None,
        random_erasing: float = 0.0,
        interpolation: Literal["bilinear", "bicubic"] = "bicubic",
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        batch_size: int = 32,
        num_workers: int | None = None,
        check_files: CheckFiles = True,
        search_holdout_per_class: int = 0,
        synthetic_size: int = 64,
        synthetic_train_per_class: int = 400,
        synthetic_val_per_class: int = 100,
    ) -> None:
        super().__init__(root, num_workers)
        if search_holdout_per_class < 0:
            raise ValueError(f"search_holdout_per_class must be 0 or more, got {search_holdout_per_class}")
        if synthetic_train_per_class < 1 or synthetic_val_per_class < 1:
            raise ValueError(
                "synthetic_train_per_class and synthetic_val_per_class must be 1 or more, got "
                f"{synthetic_train_per_class} and {synthetic_val_per_class}"
            )
        self.save_hyperparameters()
        if self.root is None:
            self.class_names = list(SHAPE_CLASSES)
        else:
            self.class_names, _ = scan_image_folder(self.root / train_dir)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def input_size(self) -> tuple[int, int]:
        return (self.hparams.image_size, self.hparams.image_size)

    def sample_files(self, split: str, index: int) -> list[str]:
        return [str(self.datasets[split].samples[index][0])]

    def synthetic_root(self) -> Path:
        return synthetic_shapes(
            self.hparams.synthetic_size, self.hparams.synthetic_train_per_class, self.hparams.synthetic_val_per_class
        )

    def train_transform(self) -> A.Compose:
        hp = self.hparams
        ops: list[A.BasicTransform] = [
            A.RandomResizedCrop(
                size=(hp.image_size, hp.image_size), scale=tuple(hp.crop_scale), interpolation=self._interpolation
            ),
            A.HorizontalFlip(p=hp.hflip),
        ]
        if hp.color_jitter > 0:
            j = hp.color_jitter
            ops.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=0.0, p=0.8))
        if hp.rand_augment:
            ops.append(A.Lambda(image=TimmRandAugment(hp.rand_augment, hp.image_size, hp.mean)))
        ops.append(A.Normalize(mean=hp.mean, std=hp.std))
        if hp.random_erasing > 0:
            ops.append(A.Erasing(p=hp.random_erasing, fill="random"))
        return A.Compose([*ops, ToTensorV2()])

    @property
    def _interpolation(self) -> int:
        return {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}[self.hparams.interpolation]

    def eval_transform(self) -> A.Compose:
        hp = self.hparams
        return A.Compose(
            [
                A.SmallestMaxSize(max_size=round(hp.image_size / hp.crop_pct), interpolation=self._interpolation),
                A.CenterCrop(height=hp.image_size, width=hp.image_size),
                A.Normalize(mean=hp.mean, std=hp.std),
                ToTensorV2(),
            ]
        )

    def training_samples(self) -> list[tuple[Path, int]]:
        """The training split's ``(path, class index)`` samples, the search hold-out left out."""
        _, samples = scan_image_folder(self.data_root() / self.hparams.train_dir, self.class_names)
        if self.hparams.search_holdout_per_class:
            samples, _ = split_holdout(samples, self.hparams.search_holdout_per_class)
        return samples

    def search_holdout(self, per_class: int) -> list[tuple[Path, int]]:
        """``per_class`` training images per class held out for a network search's fitness (``split_holdout``)."""
        _, samples = scan_image_folder(self.data_root() / self.hparams.train_dir, self.class_names)
        return split_holdout(samples, per_class)[1]

    def _split(self, folder: str, transform: A.Compose) -> ImageFolderDataset:
        _, samples = scan_image_folder(self.data_root() / folder, self.class_names)
        return self._dataset(samples, transform)

    def _dataset(self, samples: list[tuple[Path, int]], transform: A.Compose) -> ImageFolderDataset:
        check_images([p for p, _ in samples], mode=self.hparams.check_files)
        return ImageFolderDataset(samples, transform)

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if stage == "fit":
            self.datasets["train"] = self._dataset(self.training_samples(), self.train_transform())
            self.datasets["val"] = self._split(hp.val_dir, self.eval_transform())
        elif stage == "validate":
            self.datasets["val"] = self._split(hp.val_dir, self.eval_transform())
        elif stage == "test":
            self.datasets["test"] = self._split(hp.test_dir or hp.val_dir, self.eval_transform())
        elif stage == "predict":
            folder = Path(hp.predict_dir) if hp.predict_dir else self.data_root() / hp.val_dir
            images = list_images(folder)
            if not images:
                raise DataError(f"no image files under {folder} to predict")
            check_images(images, mode=hp.check_files)
            self.datasets["predict"] = ImageFolderDataset([(p, -1) for p in images], self.eval_transform())
