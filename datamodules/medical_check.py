"""Up-front check of a 3-D segmentation data set, so a bad file fails at setup with its name, not mid-epoch.

NIfTI headers give shapes and affines; label volumes are read in full to check their values, and in the
``full`` form image volumes too, so a truncated file or NaN/infinite voxels fail here rather than as an
unnamed ``LoadImaged`` error or a NaN loss at the first step. Files in other formats (``.nrrd``, ``.mha``) are
only checked for existence.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
from monai.transforms import LoadImaged

from .common import CheckFiles, check_mode, run_check
from .errors import DataError, listing_error

NIFTI_SUFFIXES = (".nii", ".nii.gz")
AFFINE_TOLERANCE_MM = 1e-3


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _header(path: str) -> tuple[tuple[int, ...], np.ndarray]:
    img = nib.load(path)  # lazy: reads the header only
    return tuple(int(s) for s in img.shape), np.asarray(img.affine)


def voxel_problems(path: str) -> list[str]:
    """Why the voxels of a NIfTI image cannot be trained on: unreadable (truncated, corrupt) or not finite."""
    try:
        data = np.asanyarray(nib.load(path).dataobj)
    except Exception as err:  # nibabel/gzip/zlib raise several types for truncated or corrupt data
        return [f"{path}: unreadable voxel data (truncated or corrupt file?): {type(err).__name__}: {err}"]
    if data.dtype.kind in "fc":
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            return [f"{path}: {bad} NaN or infinite voxel(s) of {data.size}; they would make the loss NaN"]
    return []


def check_entry(
    entry: dict[str, Any], num_classes: int, in_channels: int, mode: Literal["full", "header"] = "full"
) -> list[str]:
    """Problems with one ``{"image", "label"?}`` entry, each naming its file; empty when it is fine. ``full``
    also reads the image's voxels (truncated files, NaN or infinite values)."""
    image, label = entry["image"], entry.get("label")
    problems = [f"{p}: file not found (listed in dataset.json)" for p in (image, label) if p and not Path(p).is_file()]
    if problems or not is_nifti(image):
        return problems
    try:
        shape, affine = _header(image)
    except Exception as err:  # nibabel raises several types for corrupt headers
        return [f"{image}: unreadable NIfTI header: {type(err).__name__}: {err}"]
    channels = shape[3] if len(shape) == 4 else 1
    if len(shape) not in (3, 4) or len(shape) == 4 and channels != in_channels:
        problems.append(
            f"{image}: shape {shape} does not fit {in_channels}-channel volumes "
            f"(expected [X, Y, Z]{' or [X, Y, Z, 1]' if in_channels == 1 else f' x {in_channels}'})"
        )
    elif len(shape) == 3 and in_channels != 1:
        problems.append(f"{image}: a single-channel volume where dataset.json declares {in_channels} modalities")
    if mode == "full":
        problems += voxel_problems(image)
    if not label or not is_nifti(label):
        return problems
    try:
        lbl = nib.load(label)
        label_shape, label_affine = tuple(int(s) for s in lbl.shape), np.asarray(lbl.affine)
    except Exception as err:
        return [*problems, f"{label}: unreadable NIfTI header: {type(err).__name__}: {err}"]
    if label_shape[:3] != shape[:3] or len(label_shape) > 3 and label_shape[3:] != (1,):
        problems.append(f"{label}: label shape {label_shape} differs from its image's {shape[:3]} ({image})")
    elif not np.allclose(label_affine, affine, atol=AFFINE_TOLERANCE_MM):
        problems.append(
            f"{label}: affine differs from its image's ({image}); max difference "
            f"{np.abs(label_affine - affine).max():.4g} mm"
        )
    try:
        values = np.asanyarray(lbl.dataobj)
    except Exception as err:
        return [*problems, f"{label}: unreadable voxel data: {type(err).__name__}: {err}"]
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > num_classes - 1:
        problems.append(
            f"{label}: label values span {low:g}..{high:g} but dataset.json declares {num_classes} classes "
            f"(0..{num_classes - 1})"
        )
    elif values.dtype.kind == "f" and not np.array_equal(values, np.round(values)):
        problems.append(f"{label}: non-integer label values (a resampled or probability map?)")
    return problems


def check_volumes(
    entries: Sequence[dict[str, Any]], *, num_classes: int, in_channels: int, mode: CheckFiles = "full"
) -> None:
    """Check every entry (in threads, timed) and raise one DataError listing all problems, one per line."""
    form = check_mode(mode)
    if form == "none":
        return
    found = run_check(
        list(entries), lambda e: check_entry(e, num_classes, in_channels, form), what="volumes", mode=form, workers=4
    )
    if found:
        raise listing_error("problem(s) in the data set", found, limit=30)


class LoadVolumesd(LoadImaged):
    """MONAI's ``LoadImaged`` whose failure names the file and the reason (MONAI's own error names only the
    transform object), for data read after the up-front check or without it (``check_files: header``)."""

    def __call__(self, data: Any, reader: Any = None) -> Any:
        try:
            return super().__call__(data, reader)
        except Exception as err:  # nibabel/ITK/gzip raise several types for truncated or corrupt files
            paths = [str(data[k]) for k in self.keys if k in data]
            named = [p for p in paths if is_nifti(p) and voxel_problems(p)] or paths
            raise DataError(f"{named[0]}: cannot read the volume: {type(err).__name__}: {err}") from err
