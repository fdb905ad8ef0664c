"""Latency of the sub-networks of any super-network on this machine, from a per-part lookup table measured once and
cached.

A sub-network's latency is the sum of its parts' (``Supernet.latency_parts``: the stem, every kept block at its
widths, every downsampling, each in its inference form). Each distinct part is timed once (median of ``repeats`` runs
after ``warmup``), so the table has a few hundred entries for a search space of ~10^20 networks.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backbones.base import Supernet


@dataclass
class LatencySettings:
    """Measure each candidate's latency from the per-part table (cached as ``latency_table.json``)."""

    measure: bool = True
    batch_size: int = 1
    repeats: int = 10
    warmup: int = 2


class LatencyTable:
    """Per-part latencies in milliseconds for ``supernet``'s search space at batch ``batch_size``.

    Args:
        supernet: the super-network (its search space, fixed parts and latency parts).
        path: the JSON cache; reused when made on this machine with the same settings, rebuilt otherwise.
        batch_size, repeats, warmup: how each part is timed.
    """

    def __init__(self, supernet: Supernet, path: str | Path, *, batch_size: int = 1, repeats: int = 10,
                 warmup: int = 2) -> None:
        self.net, self.path = supernet, Path(path)
        self.batch_size, self.repeats, self.warmup = batch_size, repeats, warmup
        signature = {"machine": platform.node(), "processor": platform.processor() or platform.machine(),
                     "threads": torch.get_num_threads(), "torch": torch.__version__, "batch_size": batch_size,
                     "supernet": type(supernet).__name__, "fixed": supernet.fixed_kwargs,
                     "space": supernet.search_space()}
        self.signature = json.loads(json.dumps(signature))  # as the saved file reads back (tuples as lists)
        self.entries: dict[str, float] = {}
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved.get("signature") == self.signature:
                self.entries = saved["entries"]

    def latency_ms(self, config: Any) -> float:
        """The predicted latency of ``config``, timing the parts the table lacks."""
        total = 0.0
        for part in self.net.latency_parts(config, self.batch_size):
            if part.key not in self.entries:
                self.entries[part.key] = self._time(*part.build())
            total += self.entries[part.key]
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
