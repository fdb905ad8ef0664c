"""Albumentations pipelines of the SegFormer/mmseg recipe, and the two steps albumentations lacks.

Training: keep-ratio rescale by a random ratio of a base size, random crop whose largest class may cover
at most ``cat_max_ratio`` of it, horizontal flip, photometric distortion, normalisation, and padding
to the crop size (image 0 after normalising, mask ``ignore_index``) as mmseg does. Evaluation resizes
the image only (the label map keeps its size; logits are resized to it) and normalises.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2


class RescaleToFit(A.DualTransform):
    """Resize keeping the aspect ratio, mmseg's ``Resize(img_scale, ratio_range, keep_ratio=True)``.

    With ``scale=(long, short)`` the image is scaled by ``min(long * r / long_side, short * r / short_side)``
    for a ratio ``r`` drawn from ``ratio_range``; with ``scale=None`` by ``r`` alone. Images are
    interpolated bilinearly, label maps by nearest neighbour.
    """

    def __init__(
        self, scale: Sequence[int] | None = None, ratio_range: Sequence[float] = (0.5, 2.0), p: float = 1.0
    ) -> None:
        super().__init__(p=p)
        self.scale = tuple(scale) if scale else None
        self.ratio_range = tuple(ratio_range)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        r = self.py_random.uniform(*self.ratio_range)
        f = r if self.scale is None else min(max(self.scale) * r / max(h, w), min(self.scale) * r / min(h, w))
        return {"size": (max(1, round(h * f)), max(1, round(w * f)))}

    def apply(self, img: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return img if img.shape[:2] == size else cv2.resize(img, size[::-1], interpolation=cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return mask if mask.shape[:2] == size else cv2.resize(mask, size[::-1], interpolation=cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scale", "ratio_range")


class RandomCropCatMax(A.DualTransform):
    """Random crop (smaller where the image is), redrawn up to ``tries`` times while one class covers
    ``cat_max_ratio`` or more of the crop's labelled pixels, as mmseg's ``RandomCrop``."""

    def __init__(
        self, height: int, width: int, *, cat_max_ratio: float = 0.75, ignore_index: int = 255,
        tries: int = 10, p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.height, self.width = height, width
        self.cat_max_ratio, self.ignore_index, self.tries = cat_max_ratio, ignore_index, tries

    @property
    def targets_as_params(self) -> list[str]:
        return ["mask"]

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        mask = data["mask"]
        h, w = mask.shape[:2]
        ch, cw = min(self.height, h), min(self.width, w)
        for _ in range(self.tries):
            y, x = self.py_random.randint(0, h - ch), self.py_random.randint(0, w - cw)
            if self.cat_max_ratio >= 1.0:
                break
            counts = np.bincount(mask[y : y + ch, x : x + cw].ravel())
            if self.ignore_index < len(counts):
                counts[self.ignore_index] = 0
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return {"box": (y, x, ch, cw)}

    def apply(self, img: np.ndarray, box: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        y, x, h, w = box
        return img[y : y + h, x : x + w]

    def apply_to_mask(self, mask: np.ndarray, box: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        return self.apply(mask, box)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "cat_max_ratio", "ignore_index", "tries")


def photometric_distortion() -> A.BaseCompose:
    """mmseg's PhotoMetricDistortion in albumentations terms: brightness +-32, contrast 0.5-1.5,
    saturation 0.5-1.5 and hue +-18 degrees, each applied with probability 0.5."""
    return A.Sequential(
        [
            A.RandomBrightnessContrast(brightness_limit=32 / 255, contrast_limit=0.0, p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=0.5, p=0.5),
            A.ColorJitter(brightness=0.0, contrast=0.0, saturation=0.5, hue=0.0, p=0.5),
            A.ColorJitter(brightness=0.0, contrast=0.0, saturation=0.0, hue=18 / 360, p=0.5),
        ]
    )


def train_pipeline(
    *, crop_size: Sequence[int], scale: Sequence[int] | None, ratio_range: Sequence[float], cat_max_ratio: float,
    hflip: float, photometric: bool, mean: Sequence[float], std: Sequence[float], ignore_index: int,
) -> A.Compose:
    """Rescale, cat-max crop, flip, photometric distortion, normalise, pad to the crop size, to tensor."""
    h, w = crop_size
    ops: list[A.BasicTransform | A.BaseCompose] = [
        RescaleToFit(scale, ratio_range),
        RandomCropCatMax(h, w, cat_max_ratio=cat_max_ratio, ignore_index=ignore_index),
        A.HorizontalFlip(p=hflip),
    ]
    if photometric:
        ops.append(photometric_distortion())
    ops += [
        A.Normalize(mean=tuple(mean), std=tuple(std)),
        A.PadIfNeeded(h, w, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index),
        ToTensorV2(),
    ]
    return A.Compose(ops)


def eval_pipeline(*, scale: Sequence[int] | None, mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    """Image-only: optional keep-ratio resize to fit ``scale`` (long, short), normalise, to tensor."""
    ops: list[A.BasicTransform] = [RescaleToFit(scale, (1.0, 1.0))] if scale else []
    return A.Compose([*ops, A.Normalize(mean=tuple(mean), std=tuple(std)), ToTensorV2()])
