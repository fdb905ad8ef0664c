"""Synthetic segmentation scenes written in the ADE20K folder layout, the default data of SegFormer.

Each scene is a textured background with several overlapping objects. An object's class decides its
outline and its texture (checkerboard, stripes, dots, speckle, shaded disc), while colours, size, angle,
texture phase and stacking order are random per instance; a hole in a ring shows whatever lies behind it,
and later objects occlude earlier ones, so a pixel's class is decided by its surroundings, not by its
colour. Label maps follow ADE20K: value 0 is "unlabelled" (a few clutter blobs, ignored after
reduce-zero-label), values 1..K are the classes of ``SCENE_CLASSES``.

    root/images/{training,validation}/scene_00000.png        RGB
    root/annotations/{training,validation}/scene_00000.png   palette PNG, one byte per pixel
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .label_maps import save_label_map
from .synthetic import draw_shape, ensure_written, textured_background

SCENE_CLASSES = ("background", "disc", "box", "triangle", "cross", "ring")
_SHAPES = {"disc": "circle", "box": "square", "triangle": "triangle", "cross": "cross", "ring": "circle"}


def _texture(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """An ``[size, size, 3]`` float texture whose pattern belongs to ``kind``; colours are random."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    while np.abs(c0 - c1).sum() < 150:  # keep the two colours of a pattern apart
        c1 = rng.uniform(0, 255, 3)
    angle = rng.uniform(0, math.pi)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    period = rng.uniform(6, 10)
    if kind == "disc":  # one colour, shaded towards one side
        t = 0.5 + 0.3 * np.sin(u / size * math.pi)
        return c0 * t[..., None] * 1.4
    if kind == "box":
        t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    elif kind == "triangle":
        t = (np.sin(2 * math.pi * u / period) > 0).astype(np.float32)
    elif kind == "cross":
        t = ((np.hypot((u % period) - period / 2, (v % period) - period / 2)) < period / 4).astype(np.float32)
    else:  # ring: coarse speckle
        small = rng.uniform(0, 1, (size // 4 + 1, size // 4 + 1))
        t = (np.kron(small, np.ones((4, 4)))[:size, :size] > 0.5).astype(np.float32)
    return c0 + (c1 - c0) * t[..., None]


def scene(rng: np.random.Generator, size: int, max_objects: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """One ``[size, size, 3]`` uint8 image and its ``[size, size]`` uint8 label map (ADE20K values)."""
    image = textured_background(rng, size).astype(np.float32)
    image = 0.6 * image + 0.4 * image.mean()  # a calmer background than the objects
    label = np.ones((size, size), np.uint8)  # 1 = background
    for _ in range(rng.integers(2, max_objects + 1)):
        cls = int(rng.integers(1, len(SCENE_CLASSES)))
        kind = SCENE_CLASSES[cls]
        r = rng.uniform(0.14, 0.3) * size
        cx, cy = rng.uniform(0.1 * size, 0.9 * size, 2)
        canvas = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(canvas)
        draw_shape(draw, _SHAPES[kind], cx, cy, r, rng.uniform(0, 2 * math.pi), 255)
        if kind == "ring":
            draw.ellipse([cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2], fill=0)
        mask = np.asarray(canvas) > 0
        image[mask] = _texture(rng, kind, size)[mask]
        label[mask] = cls + 1
    for _ in range(rng.integers(0, 3)):  # unlabelled clutter: raw value 0, ignored after reduce-zero-label
        canvas = Image.new("L", (size, size), 0)
        cx, cy, r = *rng.uniform(0, size, 2), rng.uniform(0.03, 0.06) * size
        ImageDraw.Draw(canvas).ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        mask = np.asarray(canvas) > 0
        image[mask] = rng.uniform(0, 255, (int(mask.sum()), 3))
        label[mask] = 0
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_scenes(root: Path, *, size: int, train: int, val: int, seed: int = 0) -> None:
    """Write ``train`` and ``val`` scenes of side ``size`` under ``root`` in the ADE20K layout."""
    rng = np.random.default_rng(seed)
    for split, count in (("training", train), ("validation", val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for n in range(count):
            image, label = scene(rng, size)
            Image.fromarray(image).save(root / "images" / split / f"scene_{n:05d}.png")
            save_label_map(root / "annotations" / split / f"scene_{n:05d}.png", label)


def synthetic_scenes(size: int = 128, train: int = 400, val: int = 100, seed: int = 0) -> Path:
    """The default segmentation data set, written on first use into the cache (``cache_root()``)."""
    name = f"scenes-v1-s{size}-n{train}-{val}-seed{seed}"
    return ensure_written(name, lambda tmp: write_scenes(tmp, size=size, train=train, val=val, seed=seed))
