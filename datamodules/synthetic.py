"""Small, learnable data sets written in each field's real on-disk format, so the default run
exercises the same loader as real data. Written once per version into a cache folder; a folder is
complete only once its ``.complete`` marker exists, so an interrupted write is redone, not half-read.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPE_CLASSES = ("circle", "square", "triangle", "cross")


def cache_root() -> Path:
    """``$VISION_SUITE_CACHE`` or ``~/.cache/vision-suite``."""
    return Path(os.environ.get("VISION_SUITE_CACHE", Path.home() / ".cache" / "vision-suite"))


def ensure_written(name: str, write: Callable[[Path], None]) -> Path:
    """Return ``cache_root()/name``, first calling ``write(tmp_folder)`` and renaming it into place
    if no complete copy exists yet."""
    target = cache_root() / name
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        write(tmp)
        (tmp / ".complete").touch()
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except FileExistsError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def textured_background(rng: np.random.Generator, size: int, stripes: float = 20.0, noise: float = 12.0) -> np.ndarray:
    """An RGB ``[size, size, 3]`` uint8 background: two-colour gradient, stripes and noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, math.pi)
    ramp = np.cos(angle) * xx + np.sin(angle) * yy
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = c0 + (c1 - c0) * ramp[..., None]
    freq = rng.uniform(4, 12)
    img += stripes * np.sin(2 * math.pi * freq * (xx * math.cos(angle * 2) + yy * math.sin(angle * 2)))[..., None]
    img += rng.normal(0, noise, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def shape_polygon(kind: str, cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]]:
    """Vertices of a square, triangle or cross of circumradius ``r``, rotated by ``rotation`` radians."""
    if kind == "square":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    elif kind == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif kind == "cross":
        w = 0.3
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
    else:
        raise ValueError(f"unknown shape {kind!r}")
    c, s = math.cos(rotation), math.sin(rotation)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, rotation: float, fill) -> None:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(shape_polygon(kind, cx, cy, r, rotation), fill=fill)


def shape_image(rng: np.random.Generator, kind: str, size: int) -> Image.Image:
    """One image whose class is the kind of the 2 or 3 shapes on it. Colours (bright, random hue), sizes,
    places and angles (within ±17°) are random and the background is a darker random texture, so colour and
    place say nothing about the class: only the outline does. Bright-on-dark keeps an edge's contrast of one
    sign, which a ViT's linear patch embedding learns from in hundreds of steps rather than thousands."""
    background = (textured_background(rng, size, stripes=8.0, noise=8.0) * 0.45).astype(np.uint8)
    img = Image.fromarray(background)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 4))):
        r = rng.uniform(0.15, 0.25) * size
        cx, cy = rng.uniform(r, size - r, 2)
        colour = tuple(int(v) for v in rng.uniform(150, 255, 3))
        draw_shape(draw, kind, cx, cy, r, rng.uniform(-0.3, 0.3), colour)
    return img


def write_shape_folder(
    root: Path, *, size: int = 64, train_per_class: int = 400, val_per_class: int = 100, seed: int = 0
) -> None:
    """ImageFolder layout: ``root/{train,val}/<class>/<n>.png`` with the classes of ``SHAPE_CLASSES``."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for kind in SHAPE_CLASSES:
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                shape_image(rng, kind, size).save(folder / f"{n:05d}.png")


def synthetic_shapes(size: int = 64, train_per_class: int = 400, val_per_class: int = 100, seed: int = 0) -> Path:
    """The default classification data set, written on first use."""
    name = f"shapes-v5-s{size}-n{train_per_class}-{val_per_class}-seed{seed}"
    return ensure_written(
        name,
        lambda tmp: write_shape_folder(
            tmp, size=size, train_per_class=train_per_class, val_per_class=val_per_class, seed=seed
        ),
    )
