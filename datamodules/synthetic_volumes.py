"""Synthetic CT-like (or multi-channel MRI-like) volumes in Medical Segmentation Decathlon layout.

Each volume is an abdomen-like cylinder of soft tissue in air with a spine (bone, unlabelled) and four
labelled organ-like structures whose shape, size, place and intensity vary per volume: a large
deformed liver, a spleen, two kidneys and an aorta (a curved tube). Voxels are anisotropic (thicker
slices), noise is added, and some volumes are stored in LPS rather than RAS voxel order, so the
loader's orientation and spacing transforms do real work. Written as NIfTI with a ``dataset.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from .synthetic import ensure_written

ORGANS = ("liver", "spleen", "kidney", "aorta")
CLASS_NAMES = ("background", *ORGANS)
# Mean Hounsfield units (contrast-enhanced CT, roughly), tissue and air.
_HU = {"liver": 60.0, "spleen": 120.0, "kidney": 180.0, "aorta": 240.0, "tissue": 0.0, "bone": 600.0, "air": -1000.0}


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], scale: int = 6) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled by repetition and box-blurred."""
    coarse = rng.uniform(-1, 1, tuple(max(2, s // scale + 2) for s in shape))
    field = coarse.repeat(scale, 0).repeat(scale, 1).repeat(scale, 2)[: shape[0], : shape[1], : shape[2]]
    for axis in range(3):
        field = (np.roll(field, 1, axis) + field + np.roll(field, -1, axis)) / 3
    return field


def _ellipsoid(
    coords: np.ndarray, centre: np.ndarray, radii: np.ndarray, angle: float, wobble: np.ndarray | None = None
) -> np.ndarray:
    """Boolean mask of an ellipsoid in millimetre ``coords`` ``[3, X, Y, Z]``, turned by ``angle`` about z;
    ``wobble`` (same shape as a mask) deforms its surface."""
    d = coords - centre[:, None, None, None]
    c, s = np.cos(angle), np.sin(angle)
    x, y = c * d[0] + s * d[1], -s * d[0] + c * d[1]
    r = (x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (d[2] / radii[2]) ** 2
    return r <= 1.0 + (0.35 * wobble if wobble is not None else 0.0)


def synthetic_case(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, float, float], channels: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """One volume: image ``[X, Y, Z]`` in HU (``[X, Y, Z, C]`` with MRI-like channels) and labels ``[X, Y, Z]``.

    Coordinates are millimetres in RAS (x to the patient's left, y anterior, z superior), origin at the
    volume's centre.
    """
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))  # [3, X, Y, Z] in mm
    half = np.array([n * s / 2 for n, s in zip(shape, spacing)])
    jitter = lambda scale: rng.uniform(-scale, scale, 3)  # noqa: E731
    labels = np.zeros(shape, np.uint8)
    image = np.full(shape, _HU["air"], np.float32)

    body = (coords[0] / (0.88 * half[0])) ** 2 + (coords[1] / (0.72 * half[1])) ** 2 <= 1.0
    image[body] = _HU["tissue"]
    spine_c = np.array([0.0, -0.45 * half[1], 0.0]) + jitter(3) * [1, 1, 0]
    spine = (coords[0] - spine_c[0]) ** 2 + (coords[1] - spine_c[1]) ** 2 <= (0.12 * half[0]) ** 2
    image[spine] = _HU["bone"]

    wobble = _smooth_noise(rng, shape)
    scale = half[:2].mean()
    organs = {
        "liver": [_ellipsoid(coords, np.array([-0.38, 0.1, 0.15]) * half + jitter(6),
                             np.array([0.36, 0.42, 0.45]) * [scale, scale, half[2]] * rng.uniform(0.85, 1.15, 3),
                             rng.uniform(-0.4, 0.4), wobble)],
        "spleen": [_ellipsoid(coords, np.array([0.5, -0.15, 0.25]) * half + jitter(5),
                              np.array([0.24, 0.3, 0.36]) * [scale, scale, half[2]] * rng.uniform(0.8, 1.2, 3),
                              rng.uniform(-0.6, 0.6), wobble)],
        "kidney": [_ellipsoid(coords, np.array([side * 0.32, -0.3, -0.25]) * half + jitter(4),
                              np.array([0.16, 0.2, 0.34]) * [scale, scale, half[2]] * rng.uniform(0.8, 1.2, 3),
                              side * rng.uniform(0.2, 0.6), None) for side in (-1, 1)],
    }
    # The aorta: a tube in front of the spine whose centre drifts sideways along z.
    drift = rng.uniform(-0.08, 0.08) * half[0] * np.sin(coords[2] / half[2] * rng.uniform(1, 3))
    aorta_c = spine_c + np.array([0.08 * half[0], 0.22 * half[1], 0.0]) + jitter(2) * [1, 1, 0]
    radius = rng.uniform(0.06, 0.09) * scale
    organs["aorta"] = [(coords[0] - aorta_c[0] - drift) ** 2 + (coords[1] - aorta_c[1]) ** 2 <= radius**2]

    for index, name in enumerate(ORGANS, start=1):
        for mask in organs[name]:
            mask &= body & ~spine
            labels[mask] = index
            image[mask] = _HU[name] + rng.normal(0, 8)
    image += 15 * _smooth_noise(rng, shape, scale=4) + rng.normal(0, 12, shape).astype(np.float32)
    image[~body] = _HU["air"] + rng.normal(0, 5, (~body).sum())
    if channels == 1:
        return np.round(image).astype(np.int16), labels
    # MRI-like: each channel maps the tissues through its own contrast; the background is exactly 0.
    contrast = [rng.permutation(np.linspace(0.2, 1.0, 7)) for _ in range(channels)]
    tissue = np.where(body, 1, 0)
    tissue[spine] = 2
    tissue[labels > 0] = 2 + labels[labels > 0]  # 3..6: one contrast per organ
    stack = [np.where(body, 800 * c[np.minimum(tissue, 6)] + rng.normal(0, 30, shape), 0.0) for c in contrast]
    return np.stack(stack, axis=-1).astype(np.float32), labels


def write_case(path: Path, array: np.ndarray, spacing: tuple[float, ...], *, lps: bool, label: bool) -> None:
    """Save ``array`` (RAS voxel order) as NIfTI; with ``lps`` store it flipped in x and y with the matching
    affine, as DICOM-derived scans often are. The world positions are the same either way."""
    shape = array.shape[:3]
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-(n - 1) / 2 * s for n, s in zip(shape, spacing)]
    if lps:
        array = array[::-1, ::-1].copy()
        affine[:2] *= -1  # x, y run the other way and start at the far corner, i.e. the same world box
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if label:
        img.set_data_dtype(np.uint8)
    nib.save(img, str(path))


def write_decathlon_folder(
    root: Path, *, num_train: int = 24, num_test: int = 4, size: int = 64, channels: int = 1, seed: int = 0
) -> None:
    """``root/{imagesTr,labelsTr,imagesTs}/*.nii.gz`` and ``root/dataset.json`` (Decathlon layout), plus
    ``labelsTs`` (which real Decathlon sets withhold) so predictions on the test images can be checked."""
    rng = np.random.default_rng(seed)
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    training, test = [], []
    for n in range(num_train + num_test):
        in_plane = float(rng.uniform(1.3, 1.7))
        spacing = (in_plane, in_plane, float(rng.uniform(2.2, 3.0)))
        depth = int(round(size * 0.62 * rng.uniform(0.9, 1.1)))
        shape = (size, size, depth)
        image, labels = synthetic_case(rng, shape, spacing, channels)
        name = f"synth_{n:03d}.nii.gz"
        lps = bool(n % 3 == 1)
        if n < num_train:
            write_case(root / "imagesTr" / name, image, spacing, lps=lps, label=False)
            write_case(root / "labelsTr" / name, labels, spacing, lps=lps, label=True)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            write_case(root / "imagesTs" / name, image, spacing, lps=lps, label=False)
            write_case(root / "labelsTs" / name, labels, spacing, lps=lps, label=True)  # for checking predictions
            test.append(f"./imagesTs/{name}")
    modality = {"0": "CT"} if channels == 1 else {str(c): f"MR{c}" for c in range(channels)}
    meta = {
        "name": "SyntheticAbdomen",
        "description": "vision-suite synthetic CT-like abdomen volumes (organ-like shapes, not anatomy)",
        "tensorImageSize": "3D" if channels == 1 else "4D",
        "modality": modality,
        "labels": {str(i): name for i, name in enumerate(CLASS_NAMES)},
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))


def synthetic_volumes(
    num_train: int = 24, num_test: int = 4, size: int = 64, channels: int = 1, seed: int = 0
) -> Path:
    """The default 3-D segmentation data set, written on first use into the cache folder."""
    name = f"volumes-v3-n{num_train}-{num_test}-s{size}-c{channels}-seed{seed}"
    return ensure_written(
        name,
        lambda tmp: write_decathlon_folder(
            tmp, num_train=num_train, num_test=num_test, size=size, channels=channels, seed=seed
        ),
    )
