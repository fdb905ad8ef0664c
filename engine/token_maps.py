"""Token maps of a token-reducing classifier (``Backbone.token_maps``: the patches a pruned ViT still runs after
each stage, or the groups of patches a merging ViT made into one token), drawn over its input images and written as
PNG."""

from __future__ import annotations

import colorsys
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
        kept: per stage, a map ``[h, w]`` over the patch grid, 1 on the patches still running, 0 on dropped ones;
            or an integer map of merge groups (``merge_groups_panel``).
    """
    img = image.detach().float().cpu()
    img = img[:3] if img.shape[0] >= 3 else img[:1].expand(3, -1, -1)  # grey inputs drawn as RGB
    img = (img - img.amin()) / (img.amax() - img.amin()).clamp_min(1e-6)
    panels = [img]
    for mask in kept:
        if not mask.is_floating_point():
            panels.append(merge_groups_panel(img, mask))
            continue
        m = mask.detach().float().cpu()[None, None]  # [1, 1, h, w]
        m = F.interpolate(m, size=img.shape[1:], mode="nearest")[0]  # [1, H, W], 1 on kept patches
        panels.append(img * m + (0.25 * img + 0.75) * (1 - m))
    gap = torch.ones(3, img.shape[1], max(2, img.shape[2] // 32))
    canvas = torch.cat([p for panel in panels for p in (panel, gap)][:-1], dim=2)  # side by side
    return Image.fromarray((canvas.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


def merge_groups_panel(img: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """The image ``[3, H, W]`` (0-1) with each group of merged patches (``groups`` ``[h, w]``: equal values ended in one
    token) filled with its mean colour blended with a colour of its own and outlined; unmerged patches as they are."""
    ids = groups.detach().cpu().long()
    pixel = F.interpolate(ids[None, None].float(), size=img.shape[1:], mode="nearest")[0, 0].long()  # [H, W]
    count = int(ids.max()) + 1
    flat = pixel.flatten()
    mean = torch.zeros(count, 3).index_add_(0, flat, img.flatten(1).T) / torch.bincount(flat, minlength=count).clamp_min(1)[:, None]
    palette = torch.tensor([colorsys.hsv_to_rgb((g * 0.618034) % 1.0, 0.65, 0.95) for g in range(count)])
    fill = (0.5 * mean + 0.5 * palette)[pixel].permute(2, 0, 1)  # [3, H, W]
    merged = (torch.bincount(ids.flatten(), minlength=count) > 1)[pixel]  # [H, W]: a group of several patches
    panel = torch.where(merged, fill, img)
    edge = torch.zeros_like(merged)
    edge[:, 1:] |= pixel[:, 1:] != pixel[:, :-1]
    edge[1:, :] |= pixel[1:, :] != pixel[:-1, :]
    return torch.where(edge & merged, 0.15 * panel, panel)


def write_token_maps(images: torch.Tensor, maps: Sequence[torch.Tensor], names: Sequence[str], out_dir: Path) -> list[Path]:
    """One PNG per image of the batch, ``out_dir/<name>.png``; ``maps`` per stage ``[B, h, w]``."""
    paths = []
    for b, name in enumerate(names):
        picture = token_map_image(images[b], [m[b] for m in maps])
        paths.append(atomic_write(out_dir / f"{name}.png", lambda tmp, pic=picture: pic.save(tmp, format="PNG")))
    return paths
