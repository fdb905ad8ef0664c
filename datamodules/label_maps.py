"""Label maps as files people and tools read: palette PNGs (pixel values are the labels, colours are for people),
the PASCAL VOC and Cityscapes colour maps, and a prediction blended over its image."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .io import atomic_write

Palette = Sequence[tuple[int, int, int]]

# the colours of the 19 Cityscapes train ids (*_gtFine_labelTrainIds.png), as the benchmark's own scripts
CITYSCAPES_PALETTE = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]


def voc_palette(n: int = 256) -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour map: distinct colours for label indices, generated bit by bit."""
    colours = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours.append((r, g, b))
    return colours


def save_label_map(path: Path, label: np.ndarray, palette: Palette | None = None) -> None:
    """A ``[H, W]`` label map as a palette PNG (pixel values are the labels, the palette is for people);
    labels above 255 need a 16-bit greyscale PNG instead."""
    if label.size and label.max() > 255:
        Image.fromarray(label.astype(np.uint16)).save(path)
        return
    img = Image.fromarray(label.astype(np.uint8), mode="P")
    img.putpalette([c for rgb in (palette or voc_palette()) for c in rgb][: 256 * 3])
    img.save(path)


def write_label_map(path: Path, label: np.ndarray, palette: Palette | None = None) -> Path:
    """``save_label_map`` written atomically (a crash never leaves a half-written PNG under ``path``)."""
    return atomic_write(path, lambda tmp: save_label_map(Path(tmp), label, palette))


def write_overlay(path: Path, image_path: str | Path, label: np.ndarray, palette: Palette) -> Path:
    """The label map's colours blended half and half over the image it was predicted from, as a JPEG."""
    colours = np.asarray(palette, dtype=np.uint8)[np.minimum(label, len(palette) - 1)]  # [H, W, 3]
    with Image.open(image_path) as img:
        blend = Image.blend(img.convert("RGB"), Image.fromarray(colours), 0.5)
    return atomic_write(path, lambda tmp: blend.save(tmp, format="JPEG", quality=90))
