"""3-D segmentation data in Medical Segmentation Decathlon layout, loaded with MONAI dictionary transforms.

``root/dataset.json`` lists ``training`` pairs ``{"image", "label"}`` (and optionally ``validation``
pairs or a ``fold`` per pair), ``test`` images, the ``labels`` and the ``modality`` per input channel;
``imagesTr``/``labelsTr``/``imagesTs`` hold NIfTI files (4-D for multi-channel MRI). Without a root the
synthetic CT-like set of ``synthetic_volumes.py`` is written in that layout and read the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.data import CacheDataset, list_data_collate
from monai.transforms import (
    CastToTyped,
    Compose,
    CropForegroundd,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from .common import CheckFiles, DataError, TaskDataModule
from .medical_check import LoadVolumesd, check_volumes
from .nifti_io import label_in_original_space, write_nifti_labels
from .synthetic_volumes import CLASS_NAMES, synthetic_volumes

Intensity = Literal["auto", "ct", "mri"]
Split = Literal["train", "val", "test"]


def read_dataset_json(root: Path, name: str = "dataset.json") -> dict[str, Any]:
    """Parse a Decathlon ``dataset.json`` and check the keys this loader relies on."""
    path = root / name
    if not path.is_file():
        raise DataError(f"{path} not found: a Decathlon folder holds dataset.json, imagesTr/ and labelsTr/")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON: {err}") from err
    missing = [k for k in ("labels", "training") if k not in meta]
    if missing:
        raise DataError(f"{path} lacks the key(s) {missing}")
    ids = sorted(int(k) for k in meta["labels"])
    if ids != list(range(len(ids))):
        raise DataError(f"{path}: labels must be numbered 0..N-1 (0 = background), got {ids}")
    return meta


def split_folds(
    entries: Sequence[dict[str, Any]], fold: int, num_folds: int, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and held-out entries of ``fold``: by each entry's ``fold`` key where the json gives one,
    otherwise by a k-fold split of the shuffled list (``seed``)."""
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in [0, {num_folds}), got {fold}")
    if all("fold" in e for e in entries):
        held = [int(e["fold"]) == fold for e in entries]
    else:
        order = np.random.default_rng(seed).permutation(len(entries))
        held_idx = set(np.array_split(order, num_folds)[fold].tolist())
        held = [i in held_idx for i in range(len(entries))]
    train = [e for e, h in zip(entries, held) if not h]
    val = [e for e, h in zip(entries, held) if h]
    if not train or not val:
        raise DataError(f"fold {fold} of {num_folds} leaves {len(train)} training and {len(val)} held-out volumes")
    return train, val


class MedicalDataModule(TaskDataModule):
    """Decathlon-format volumes through MONAI transforms and ``CacheDataset``; synthetic CT by default.

    Args:
        root: Decathlon folder; ``None`` writes and uses the synthetic set.
        dataset_json: name of the index file inside ``root``.
        fold, num_folds, fold_seed: which fold of ``training`` is held out for validation and testing (by the
            entries' ``fold`` keys if present, else a seeded k-fold split); ``fold=None`` uses the json's own
            ``validation`` list. Decathlon test labels are withheld, so ``test`` also scores the held-out fold.
        predict_split: what ``predict`` segments: ``test`` (the json's ``test`` images), ``val`` or ``train``.
        intensity: ``ct`` windows HU to [0, 1] (``ct_window``); ``mri`` normalises non-zero voxels per channel;
            ``auto`` picks ``ct`` when every modality in the json is CT.
        ct_window: Hounsfield range mapped to [0, 1] and clipped.
        spacing: voxel size (mm) everything is resampled to; ``None`` keeps each file's.
        roi_size: training crop size (the model's input size).
        num_samples: crops per volume per step, chosen by ``pos``:``neg`` foreground/background centres.
        flip_prob, rot90_prob, shift_prob, shift_offset: random flips per axis, in-plane 90° turns, and
            intensity shifts by up to ``shift_offset``.
        cache_rate: share of volumes whose deterministic preprocessing is kept in memory.
        batch_size: volumes per training step; the step sees ``batch_size * num_samples`` crops.
        num_workers, cache_num_workers: loader and caching processes/threads.
        check_files: check every listed file up front (exists; shapes and affines of image and label agree;
            label values inside the declared classes); ``true``/``full`` also reads every image's voxels (a
            truncated file, NaN or infinite values fail at setup, named); ``header`` skips that; ``false``/``none``
            skips the check.
        synthetic_num_train, synthetic_size, synthetic_channels: shape of the default data set.
    """

    def __init__(
        self,
        root: str | None = None,
        *,
        dataset_json: str = "dataset.json",
        fold: int | None = 0,
        num_folds: int = 5,
        fold_seed: int = 0,
        predict_split: Split = "test",
        intensity: Intensity = "auto",
        ct_window: tuple[float, float] = (-175.0, 250.0),
        spacing: tuple[float, float, float] | None = (1.5, 1.5, 2.0),
        roi_size: tuple[int, int, int] = (96, 96, 96),
        num_samples: int = 4,
        pos: float = 1.0,
        neg: float = 1.0,
        flip_prob: float = 0.1,
        rot90_prob: float = 0.1,
        shift_prob: float = 0.5,
        shift_offset: float = 0.1,
        cache_rate: float = 1.0,
        batch_size: int = 1,
        num_workers: int | None = None,
        cache_num_workers: int | None = None,
        check_files: CheckFiles = True,
        synthetic_num_train: int = 24,
        synthetic_size: int = 64,
        synthetic_channels: int = 1,
    ) -> None:
        super().__init__(root, num_workers)
        self.save_hyperparameters()
        if self.root is None:
            self.class_names = list(CLASS_NAMES)
            modalities = ["CT"] if synthetic_channels == 1 else [f"MR{c}" for c in range(synthetic_channels)]
        else:
            meta = read_dataset_json(self.root, dataset_json)
            self.class_names = [meta["labels"][k] for k in sorted(meta["labels"], key=int)]
            modalities = [meta.get("modality", {"0": "CT"})[k] for k in sorted(meta.get("modality", {"0": 0}), key=int)]
        self.modalities = modalities
        self.intensity = intensity if intensity != "auto" else ("ct" if all(m.upper() == "CT" for m in modalities) else "mri")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        return len(self.modalities)

    def write_prediction(self, row: dict[str, Any], output_dir: Path) -> dict[str, Any]:
        """Write a predicted ``label`` volume ``[1, D, H, W]`` (on the grid of ``affine``) as ``<input name>.nii.gz``,
        resampled back onto the input file's own grid (``original_affine``, ``original_shape``) with its header's
        codes. The row is rewritten in place to the CSV's columns (the classes found named by this data; the
        ``token_map`` file where predict drew one), so predictions the trainer keeps hold the file path, not the
        volume."""
        if "label" not in row:
            return row
        source = Path(row["path"])
        original = label_in_original_space(row["label"], row["affine"], row["original_affine"], row["original_shape"])
        affine = np.asarray(row["original_affine"])
        path = write_nifti_labels(Path(output_dir) / source.name, original, affine, like=source)
        found = " ".join(self.class_name(int(c)) for c in np.unique(original) if c > 0)
        written = {"index": row["index"], "path": str(source), "prediction": str(path), "classes_found": found}
        if "token_map" in row:  # save_token_maps
            written["token_map"] = row["token_map"]
        row.clear()
        row.update(written)
        return row

    def class_name(self, index: int) -> str:
        return self.class_names[index] if index < len(self.class_names) else str(index)

    def synthetic_root(self) -> Path:
        hp = self.hparams
        return synthetic_volumes(num_train=hp.synthetic_num_train, size=hp.synthetic_size, channels=hp.synthetic_channels)

    # --- the file lists ----------------------------------------------------------------------------------

    def entries(self, split: Split) -> list[dict[str, Any]]:
        """``{"image", "label", "index", "path"}`` dicts with absolute paths: the training or held-out part
        of ``training`` (``train``/``val``), or the json's unlabelled ``test`` images (no ``label``)."""
        hp = self.hparams
        root = self.data_root()
        meta = read_dataset_json(root, hp.dataset_json)

        def resolve(path: str) -> str:
            return str(path if Path(path).is_absolute() else root / path)

        pairs = [{**e, "image": resolve(e["image"]), "label": resolve(e["label"])} for e in meta["training"]]
        if split == "test":
            chosen = [{"image": resolve(e["image"] if isinstance(e, dict) else e)} for e in meta.get("test", [])]
        elif hp.fold is None:
            if "validation" not in meta:
                raise DataError(f"{root / hp.dataset_json} has no 'validation' list; choose a fold (0..{hp.num_folds - 1})")
            held = [{**e, "image": resolve(e["image"]), "label": resolve(e["label"])} for e in meta["validation"]]
            held_images = {e["image"] for e in held}
            chosen = [p for p in pairs if p["image"] not in held_images] if split == "train" else held
        else:
            train, held = split_folds(pairs, hp.fold, hp.num_folds, hp.fold_seed)
            chosen = train if split == "train" else held
        keep = ("image", "label")
        return [{**{k: e[k] for k in keep if k in e}, "index": i, "path": e["image"]} for i, e in enumerate(chosen)]

    # --- transforms ----------------------------------------------------------------------------------------

    def _geometry(self, keys: list[str]) -> list[MapTransform]:
        hp = self.hparams
        modes = ["bilinear" if k == "image" else "nearest" for k in keys]
        ops: list[MapTransform] = [LoadVolumesd(keys, ensure_channel_first=True, image_only=True), Orientationd(keys, axcodes="RAS", labels=None)]
        if hp.spacing is not None:
            ops.append(Spacingd(keys, pixdim=tuple(hp.spacing), mode=modes))
        return ops

    def _intensity(self, keys: list[str], crop: bool) -> list[MapTransform]:
        lo, hi = self.hparams.ct_window
        crop_op = [CropForegroundd(keys, source_key="image", allow_smaller=True)] if crop else []
        if self.intensity == "ct":  # air maps to 0 after windowing, so the body is the foreground
            return [ScaleIntensityRanged("image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True), *crop_op]
        # MRI background is 0 before normalisation, not after it
        return [*crop_op, NormalizeIntensityd("image", nonzero=True, channel_wise=True)]

    def train_transform(self) -> Compose:
        hp = self.hparams
        keys = ["image", "label"]
        return Compose([
            *self._geometry(keys),
            *self._intensity(keys, crop=True),
            SpatialPadd(keys, spatial_size=tuple(hp.roi_size)),
            RandCropByPosNegLabeld(
                keys, label_key="label", spatial_size=tuple(hp.roi_size), pos=hp.pos, neg=hp.neg,
                num_samples=hp.num_samples, image_key="image", image_threshold=0,
            ),
            *(RandFlipd(keys, prob=hp.flip_prob, spatial_axis=axis) for axis in range(3)),
            RandRotate90d(keys, prob=hp.rot90_prob, max_k=3),
            RandShiftIntensityd("image", offsets=hp.shift_offset, prob=hp.shift_prob),
        ])

    def eval_transform(self, with_label: bool = True) -> Compose:
        """Whole volumes: resampled and normalised; cropped to the body only when scored against labels, whose
        volume is then kept in the smallest integer type that holds the classes (``uint8``: a quarter of float32's
        memory, cached and batched as it is)."""
        keys = ["image", "label"] if with_label else ["image"]
        labels = [CastToTyped("label", dtype=label_dtype(self.num_classes))] if with_label else []
        return Compose([*self._geometry(keys), *self._intensity(keys, crop=with_label), *labels])

    # --- stages --------------------------------------------------------------------------------------------

    def _dataset(self, split: Split, transform: Compose, cache: bool = True) -> CacheDataset:
        entries = self.entries(split)
        if not entries:
            raise DataError(f"no volumes in the {split!r} split of {self.data_root() / self.hparams.dataset_json}")
        check_volumes(entries, num_classes=self.num_classes, in_channels=self.in_channels, mode=self.hparams.check_files)
        workers = self.hparams.cache_num_workers or max(1, self.num_workers)
        rate = self.hparams.cache_rate if cache else 0.0
        return CacheDataset(entries, transform, cache_rate=rate, num_workers=workers, progress=False)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.datasets["train"] = self._dataset("train", self.train_transform())
        if stage in ("fit", "validate"):
            self.datasets["val"] = self._dataset("val", self.eval_transform())
        elif stage == "test":
            self.datasets["test"] = self._dataset("val", self.eval_transform())
        elif stage == "predict":
            self.datasets["predict"] = self._dataset(self.hparams.predict_split, self.eval_transform(False), cache=False)

    def sample_files(self, split: str, index: int) -> list[str]:
        entry = self.datasets[split].data[index]
        images = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
        return [str(p) for p in [*images, entry.get("label")] if p is not None]

    def split_batch_size(self, split: str) -> int:
        return self.hparams.batch_size if split == "train" else 1  # whole volumes differ in size

    def collate(self, split: str) -> Callable[[list[Any]], Any]:
        return collate_volumes


def label_dtype(num_classes: int) -> torch.dtype:
    """The smallest integer type holding labels ``0..num_classes-1``."""
    return torch.uint8 if num_classes <= 256 else torch.int16 if num_classes <= 2**15 else torch.int32


def collate_volumes(items: list[Any]) -> dict[str, Any]:
    """MONAI samples (lists of crops are flattened) -> the task batch: plain tensors ``input``
    ``[B, C, D, H, W]``, ``target`` ``[B, 1, D, H, W]`` (integer labels: ``long`` for training crops, the cached
    type, ``uint8`` for up to 256 classes, for whole volumes), ``index``, ``path``, ``spacing`` ``[B, 3]`` mm, and the
    geometry needed to write a prediction back in the input's space: ``affine`` (after preprocessing),
    ``original_affine`` and ``original_shape`` (as stored in the file). One whole volume (evaluation, prediction)
    is batched as views of its tensors: stacking would copy the volume."""
    if len(items) == 1 and isinstance(items[0], dict):
        item = items[0]
        image, label = item["image"], item.get("label")
        affine = torch.as_tensor(image.affine, dtype=torch.float64)[None]
        index, paths = torch.as_tensor([item["index"]]), [item["path"]]
        input, target = image.as_tensor()[None], label.as_tensor()[None] if isinstance(label, torch.Tensor) else None
        original_affine, original_shape = image.meta["original_affine"], image.meta["spatial_shape"]
    else:
        batch = list_data_collate(items)
        image = batch["image"]
        affine = torch.as_tensor(image.affine, dtype=torch.float64).reshape(-1, 4, 4)
        index, paths, input = batch["index"], list(batch["path"]), image.as_tensor()
        target = batch["label"].as_tensor() if isinstance(batch.get("label"), torch.Tensor) else None
        original_affine, original_shape = image.meta["original_affine"], image.meta["spatial_shape"]
    out: dict[str, Any] = {
        "input": input,
        "index": index,
        "path": paths,
        "spacing": torch.linalg.vector_norm(affine[:, :3, :3], dim=1),  # column norms: [B, 3]
        "affine": affine,
        "original_affine": torch.as_tensor(original_affine, dtype=torch.float64).reshape(-1, 4, 4),
        "original_shape": torch.as_tensor(original_shape).reshape(affine.shape[0], -1).long(),
    }
    if target is not None:
        out["target"] = target.long() if target.is_floating_point() else target  # float as loaded; integer as cast
    return out


__all__ = ["MedicalDataModule", "collate_volumes", "read_dataset_json", "split_folds"]
