"""Latency of the sub-networks of any super-network on this machine, from a per-part lookup table measured once and
cached.

A sub-network's latency is the sum of its parts' (``Supernet.latency_parts``: the stem, every kept block at its
widths, every downsampling, each in its inference form). Each distinct part is timed once (the fastest of ``repeats``
runs after ``warmup``: other processes only ever add time, so on a busy machine the minimum is the least disturbed), so the table has a few hundred entries for a search space of ~10^20 networks. It also times the
Mobile Efficiency Score's latency unit (``reference_ms``): MobileNetV2 on the same input, batch and threads.

A table holds for the machine that timed it: its signature names the processor model (``engine.machine.cpu_model``),
the thread count, the torch version and the batch size besides the search space, and a cached table whose signature
differs is timed again, with a line saying why.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backbones.base import Supernet
from engine.machine import cpu_model

REFERENCE = "mobilenetv2_100"
"""The timm model whose latency is the MES latency unit (MobileNetV2 x1.0, as in Li et al., 2022)."""


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
        path: the JSON cache; reused when timed on this processor with the same threads, torch, batch size and
            search space, timed again otherwise.
        batch_size, repeats, warmup: how each part is timed.
    """

    def __init__(self, supernet: Supernet, path: str | Path, *, batch_size: int = 1, repeats: int = 10,
                 warmup: int = 2) -> None:
        self.net, self.path = supernet, Path(path)
        self.batch_size, self.repeats, self.warmup = batch_size, repeats, warmup
        signature = {"processor": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "batch_size": batch_size, "supernet": type(supernet).__name__, "fixed": supernet.fixed_kwargs,
                     "space": supernet.search_space()}
        self.signature = json.loads(json.dumps(signature))  # as the saved file reads back (tuples as lists)
        self.entries: dict[str, float] = {}
        if self.path.is_file():
            self._read()

    def _read(self) -> None:
        try:
            saved = json.loads(self.path.read_text())
            signature, entries = saved["signature"], saved["entries"]
        except (ValueError, KeyError, TypeError) as err:
            print(f"latency table {self.path} is unreadable ({err!r}): timing every part again", flush=True)
            return
        if signature == self.signature:
            self.entries = entries
            return
        changed = [f"{k} {signature.get(k)!r} there, {v!r} here" for k, v in self.signature.items()
                   if k not in ("fixed", "space") and signature.get(k) != v]
        if any(signature.get(k) != self.signature[k] for k in ("supernet", "fixed", "space")):
            changed.append("another search space")
        print(f"latency table {self.path} was timed elsewhere ({'; '.join(changed)}): timing every part again on "
              "this machine", flush=True)

    def latency_ms(self, config: Any) -> float:
        """The predicted latency of ``config``, timing the parts the table lacks (and then saving the table, so a
        killed search resumes with the same timings)."""
        total, timed = 0.0, False
        for part in self.net.latency_parts(config, self.batch_size):
            if part.key not in self.entries:
                self.entries[part.key], timed = self._time(*part.build()), True
            total += self.entries[part.key]
        if timed:
            self.save()
        return total

    def reference_ms(self) -> float:
        """MobileNetV2's latency here (timm ``mobilenetv2_100``: random weights, 1000 classes, eval mode) at the
        sub-networks' input shape, batch size and threads: the MES latency unit of ``latency_unit_ms: auto``. Timed
        once and kept in the table, so a resumed search scores with the same unit."""
        shape = tuple(self.net.input_shape)
        key = f"reference:{REFERENCE}:{'x'.join(map(str, shape))}"
        if key not in self.entries:
            import timm

            model = timm.create_model(REFERENCE, pretrained=False)
            self.entries[key] = self._time(model, (torch.randn(self.batch_size, *shape),))
            self.save()
        return self.entries[key]

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
        return 1000 * min(times)
