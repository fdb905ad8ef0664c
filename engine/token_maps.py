"""Token maps of a token-reducing model (``Backbone.token_maps``: the patches a pruned ViT still runs after each stage,
or the groups of patches a merging ViT made into one token), drawn over its inputs (images, video clips, volumes) and
written as PNG."""

from __future__ import annotations

import colorsys
from collections.abc import Callable, Sequence
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
    img = display_rgb(image)
    return grid_image([[img, *(map_panel(img, mask) for mask in kept)]])


def clip_token_map_image(clip: torch.Tensor, maps: Sequence[torch.Tensor], *, frames: int = 8) -> Image.Image:
    """Up to ``frames`` evenly spaced frames of a clip ``[C, T, H, W]`` in the top row (one 0-255 scale for the whole
    clip), and below them one row per map drawn over each frame.

    Args:
        clip: one normalised input clip.
        maps: per stage, a map over the patch grid ``[t, h, w]`` (joint attention: each frame shows its time step's
            slice) or over the positions of a frame ``[h, w]`` (divided attention: the same on every frame); keep
            maps or merge groups, as in ``token_map_image``.
    """
    video = display_rgb(clip)  # [3, T, H, W]
    return grid_image(sliced_rows(video, maps, axis=0, picks=evenly_spaced(video.shape[1], frames)))


def volume_token_map_image(volume: torch.Tensor, maps: Sequence[torch.Tensor], *, slices: int = 4) -> Image.Image:
    """Up to ``slices`` axial slices of a volume ``[C, X, Y, Z]`` (RAS order: the last axis runs up the body; its first
    channel in grey, anterior up as in the validation pictures), each through the centres of one layer of patches,
    evenly spaced, in the top row; below them one row per map ``[x, y, z]`` over the patch grid, its slice drawn over
    each slice (a group that spans several slices keeps its colour in each)."""
    grey = display_rgb(volume[:1])  # [3, X, Y, Z]
    layers = maps[0].shape[-1] if maps else 1
    picks = [int((c + 0.5) * grey.shape[-1] / layers) for c in evenly_spaced(layers, slices)]  # patch centres
    rows = sliced_rows(grey, maps, axis=2, picks=picks)
    return grid_image([[panel.rot90(1, (1, 2)) for panel in row] for row in rows])


def display_rgb(x: torch.Tensor) -> torch.Tensor:
    """An input ``[C, ...]`` as RGB ``[3, ...]`` in 0-1: its first three channels (a grey one repeated), minimum to
    maximum over the whole input."""
    x = x.detach().float().cpu()
    x = x[:3] if x.shape[0] >= 3 else x[:1].expand(3, *x.shape[1:])  # grey inputs drawn as RGB
    return (x - x.amin()) / (x.amax() - x.amin()).clamp_min(1e-6)


def evenly_spaced(length: int, count: int) -> list[int]:
    """``min(count, length)`` indices from first to last of ``range(length)``, evenly spaced."""
    count = max(1, min(count, length))
    return torch.linspace(0, length - 1, count).round().long().tolist()


def sliced_rows(
    x: torch.Tensor, maps: Sequence[torch.Tensor], axis: int, picks: Sequence[int]
) -> list[list[torch.Tensor]]:
    """Slices ``picks`` along spatial ``axis`` of ``x`` ``[3, A, B, C]`` (0-1), then per map a row of panels, each
    with the map's slice over the patch grid drawn (maps with one dimension less than ``x``: the same on each)."""
    cut = [x.select(axis + 1, i) for i in picks]
    rows = [cut]
    for mask in maps:
        sizes = None if mask.is_floating_point() else torch.bincount(mask.detach().cpu().long().flatten())
        cells = [mask if mask.ndim == 2 else mask.select(axis, i * mask.shape[axis] // x.shape[axis + 1])
                 for i in picks]  # the patch layer each slice cuts through
        rows.append([map_panel(img, cell, sizes) for img, cell in zip(cut, cells)])
    return rows


def map_panel(img: torch.Tensor, mask: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
    """``img`` ``[3, H, W]`` (0-1) with a map ``[h, w]`` over its patches drawn: dropped patches washed out to white
    (a float keep map), or merge groups (an integer map, ``merge_groups_panel``)."""
    if not mask.is_floating_point():
        return merge_groups_panel(img, mask, sizes)
    m = mask.detach().float().cpu()[None, None]  # [1, 1, h, w]
    m = F.interpolate(m, size=img.shape[1:], mode="nearest")[0]  # [1, H, W], 1 on kept patches
    return img * m + (0.25 * img + 0.75) * (1 - m)


def grid_image(rows: Sequence[Sequence[torch.Tensor]]) -> Image.Image:
    """Panels ``[3, H, W]`` (0-1, one size) side by side in rows, rows one above the other, white gaps between."""
    height, width = rows[0][0].shape[1:]
    space = max(2, width // 32)
    lines = []
    for row in rows:
        gap = torch.ones(3, height, space)
        lines.append(torch.cat([p for panel in row for p in (panel, gap)][:-1], dim=2))
    gap = torch.ones(3, space, lines[0].shape[2])
    canvas = torch.cat([p for line in lines for p in (line, gap)][:-1], dim=1)
    return Image.fromarray((canvas.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


def merge_groups_panel(img: torch.Tensor, groups: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
    """The image ``[3, H, W]`` (0-1) with each group of merged patches (``groups`` ``[h, w]``: equal values ended in one
    token) filled with its mean colour blended with a colour of its own and outlined; unmerged patches as they are.
    ``sizes``: patches per group id where ``groups`` is a slice of a larger map (default: counted in ``groups``)."""
    ids = groups.detach().cpu().long()
    pixel = F.interpolate(ids[None, None].float(), size=img.shape[1:], mode="nearest")[0, 0].long()  # [H, W]
    sizes = torch.bincount(ids.flatten()) if sizes is None else sizes.cpu()
    count = max(int(ids.max()) + 1, sizes.numel())
    flat = pixel.flatten()
    mean = torch.zeros(count, 3).index_add_(0, flat, img.flatten(1).T) / torch.bincount(flat, minlength=count).clamp_min(1)[:, None]
    palette = torch.tensor([colorsys.hsv_to_rgb((g * 0.618034) % 1.0, 0.65, 0.95) for g in range(count)])
    fill = (0.5 * mean + 0.5 * palette)[pixel].permute(2, 0, 1)  # [3, H, W]
    merged = (F.pad(sizes, (0, count - sizes.numel())) > 1)[pixel]  # [H, W]: a group of several patches
    panel = torch.where(merged, fill, img)
    edge = torch.zeros_like(merged)
    edge[:, 1:] |= pixel[:, 1:] != pixel[:, :-1]
    edge[1:, :] |= pixel[1:, :] != pixel[:-1, :]
    return torch.where(edge & merged, 0.15 * panel, panel)


def write_token_maps(
    inputs: torch.Tensor, maps: Sequence[torch.Tensor], names: Sequence[str], out_dir: Path,
    draw: Callable[[torch.Tensor, Sequence[torch.Tensor]], Image.Image] = token_map_image,
) -> list[Path]:
    """One PNG per input of the batch, ``out_dir/<name>.png``, drawn by ``draw`` (``token_map_image``,
    ``clip_token_map_image``, ``volume_token_map_image``); ``maps`` per stage ``[B, *grid]``."""
    paths = []
    for b, name in enumerate(names):
        picture = draw(inputs[b], [m[b] for m in maps])
        paths.append(atomic_write(out_dir / f"{name}.png", lambda tmp, pic=picture: pic.save(tmp, format="PNG")))
    return paths


def write_row_token_maps(
    inputs: torch.Tensor, maps: Sequence[torch.Tensor], rows: list[dict], out_dir: Path,
    draw: Callable[[torch.Tensor, Sequence[torch.Tensor]], Image.Image] = token_map_image,
    stem: Callable[[str], str] = lambda path: Path(path).stem,
) -> None:
    """``write_token_maps`` for a batch of prediction rows: ``out_dir/<index>_<stem of path>.png`` per row, the file
    named in the row's ``token_map`` column."""
    names = [f"{row['index']}_{stem(row['path'])}" for row in rows]
    for row, path in zip(rows, write_token_maps(inputs, maps, names, out_dir, draw)):
        row["token_map"] = str(path)
