"""Predicted label volumes written back as NIfTI in the input scan's own grid, so they overlay it in any viewer."""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample

from .io import atomic_write


def label_in_original_space(
    labels: torch.Tensor, affine: torch.Tensor, original_affine: torch.Tensor, original_shape: Sequence[int]
) -> np.ndarray:
    """Resample a label volume ``[1, D, H, W]`` on the preprocessed grid (``affine``) back onto the file's
    own grid (nearest neighbour), undoing reorientation, resampling and any crop: ``[X, Y, Z]`` uint8."""
    resample = SpatialResample(mode="nearest", padding_mode="zeros", dtype=torch.float32)
    moved = resample(MetaTensor(labels.float(), affine=affine), dst_affine=original_affine, spatial_size=original_shape)
    return np.asarray(moved[0].round().clamp(0, 255).byte().cpu())


def write_nifti_labels(path: Path, labels: np.ndarray, affine: np.ndarray, *, like: Path | None = None) -> Path:
    """Write ``labels`` as ``.nii.gz`` atomically, with ``affine`` and, when ``like`` is a NIfTI file, its
    header's qform/sform codes and units, so the mask overlays that scan in any viewer."""
    header = None
    if like is not None and str(like).lower().endswith((".nii", ".nii.gz")) and like.is_file():
        header = nib.load(str(like)).header.copy()
    img = nib.Nifti1Image(labels.astype(np.uint8), affine, header=header)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1.0, 0.0)
    if header is not None:
        img.set_qform(affine, code=int(header["qform_code"]) or 1)
        img.set_sform(affine, code=int(header["sform_code"]) or 1)
    data = gzip.compress(img.to_bytes(), compresslevel=1)
    name = path.name if path.name.endswith(".nii.gz") else path.name.removesuffix(".nii") + ".nii.gz"
    return atomic_write(path.with_name(name), lambda tmp: Path(tmp).write_bytes(data))
