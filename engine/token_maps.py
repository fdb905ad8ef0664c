"""Token maps of a token-reducing classifier (``Backbone.token_maps``: the patches a pruned ViT still runs after
each stage), drawn over its input images and written as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from datamodules.io import atomic_write


def token_map_image(image: torch.Tensor, kept: Sequence[torch.Tensor]) -> Image.Image:
    """The input ``[C, H, W]`` (rescaled to 0-255 as the model saw it) and, beside it, one panel per stage in which
    the patches dropped by then are washed out to white (the DynamicViT paper's figures).

    Args:
        image: one normalised input image.
        kept: per stage, a map ``[h, w]`` over the patch grid, 1 on the patches still running, 0 on dropped ones.
    """
    img = image.detach().float().cpu()
    img = img[:3] if img.shape[0] >= 3 else img[:1].expand(3, -1, -1)  # grey inputs drawn as RGB
    img = (img - img.amin()) / (img.amax() - img.amin()).clamp_min(1e-6)
    panels = [img]
    for mask in kept:
        m = mask.detach().float().cpu()[None, None]  # [1, 1, h, w]
        m = F.interpolate(m, size=img.shape[1:], mode="nearest")[0]  # [1, H, W], 1 on kept patches
        panels.append(img * m + (0.25 * img + 0.75) * (1 - m))
    gap = torch.ones(3, img.shape[1], max(2, img.shape[2] // 32))
    canvas = torch.cat([p for panel in panels for p in (panel, gap)][:-1], dim=2)  # side by side
    return Image.fromarray((canvas.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


def write_token_maps(images: torch.Tensor, maps: Sequence[torch.Tensor], names: Sequence[str], out_dir: Path) -> list[Path]:
    """One PNG per image of the batch, ``out_dir/<name>.png``; ``maps`` per stage ``[B, h, w]``."""
    paths = []
    for b, name in enumerate(names):
        picture = token_map_image(images[b], [m[b] for m in maps])
        paths.append(atomic_write(out_dir / f"{name}.png", lambda tmp, pic=picture: pic.save(tmp, format="PNG")))
    return paths
