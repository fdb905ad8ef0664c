"""Latency of ViT-ResNAS sub-networks on this machine, from a per-block lookup table measured once and cached.

A sub-network's latency is the sum of its parts': the stem at its width, every kept block at its stage, width,
heads and MLP width, every spatial reduction at its two widths. Each distinct part is timed once (median of
``repeats`` runs after ``warmup``), so the table has a few hundred entries for a search space of ~10^20 networks.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backbones.vit_resnas import ConvPatchEmbed, ResidualSpatialReduction, ResNASBlock
from backbones.vit_resnas_supernet import SubnetConfig, ViTResNASSupernet


class LatencyTable:
    """Per-part latencies in milliseconds for ``supernet``'s search space at batch ``batch_size``.

    Args:
        supernet: the super-network (its search space, input size and fixed parts).
        path: the JSON cache; reused when made on this machine with the same settings, rebuilt otherwise.
        batch_size, repeats, warmup: how each part is timed.
    """

    def __init__(self, supernet: ViTResNASSupernet, path: str | Path, *, batch_size: int = 1, repeats: int = 10,
                 warmup: int = 2) -> None:
        self.net, self.path = supernet, Path(path)
        self.batch_size, self.repeats, self.warmup = batch_size, repeats, warmup
        fixed = supernet.fixed_kwargs
        self.signature = {"machine": platform.node(), "processor": platform.processor() or platform.machine(),
                          "threads": torch.get_num_threads(), "torch": torch.__version__, "batch_size": batch_size,
                          "fixed": {k: v for k, v in fixed.items()}, "space": repr(supernet.space)}
        self.entries: dict[str, float] = {}
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved.get("signature") == self.signature:
                self.entries = saved["entries"]

    def parts(self, config: SubnetConfig) -> list[tuple[str, Any]]:
        """``(key, builder)`` of every part of ``config``; a builder returns ``(module, input)``."""
        fixed, space = self.net.fixed_kwargs, self.net.space
        grid = [s // fixed["patch_size"] for s in fixed["img_size"]]
        dims = config["embed_dims"]
        b = self.batch_size
        parts: list[tuple[str, Any]] = [(f"stem:{dims[0]}", lambda: (
            ConvPatchEmbed(patch_size=fixed["patch_size"], in_chans=fixed["in_chans"], embed_dim=dims[0],
                           mid_chans=fixed["stem_channels"]), (torch.randn(b, fixed["in_chans"], *fixed["img_size"]),)))]
        for s, c in enumerate(dims):
            if s > 0:
                cin, g = dims[s - 1], list(grid)
                parts.append((f"reduce{s}:{cin}:{c}", lambda cin=cin, c=c, g=g: (
                    ResidualSpatialReduction(cin, c, g), (torch.randn(b, 1 + math.prod(g), cin), tuple(g)))))
                grid = [x // 2 for x in grid]
            n = 1 + math.prod(grid)
            for j in range(space.depths[s]):
                if config["keep"][s][j]:
                    h, m = config["num_heads"][s][j], config["mlp_hidden_dims"][s][j]
                    parts.append((f"block{s}:{c}:{h}:{m}", lambda c=c, h=h, m=m, s=s, n=n: (
                        ResNASBlock(c, h, fixed["head_dims"][s], m), (torch.randn(b, n, c),))))
        return parts

    def latency_ms(self, config: SubnetConfig) -> float:
        """The predicted latency of ``config``, timing the parts the table lacks."""
        total = 0.0
        for key, build in self.parts(config):
            if key not in self.entries:
                self.entries[key] = self._time(*build())
            total += self.entries[key]
        return total

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"signature": self.signature, "entries": self.entries}, indent=1))
        tmp.replace(self.path)

    @torch.no_grad()
    def _time(self, module: nn.Module, inputs: tuple[Any, ...]) -> float:
        module.eval()
        times = []
        for i in range(self.warmup + self.repeats):
            start = time.perf_counter()
            module(*inputs)
            if i >= self.warmup:
                times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)
