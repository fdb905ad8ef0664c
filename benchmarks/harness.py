"""Side-by-side timing of our models against reference implementations, in one process.

Models are timed interleaved (one step of each in turn) so a noisy, shared machine slows them alike;
medians over the timed steps after warm-up. "Train" is forward + loss + backward + AdamW step; "infer" a
forward pass under ``torch.inference_mode``. FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``
(2 x multiply-accumulate; matmul, convolution, attention), corrected for its over-count of grouped
convolutions' weight gradients (it ignores ``groups``). MFU divides achieved FLOP/s by a measured fp32
2048x2048 matmul (the better of MKL's and oneDNN's), the ceiling of this machine. ``--cpu-kernels`` builds our
models with ``ops/``' hand-written kernels ``off`` (the default, plain PyTorch), ``on`` or ``auto``, so tables can be
taken both ways; the reference implementations are never changed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from engine.machine import cpu_model
from ops import CPU_KERNELS, CpuKernels
from ops.kernels import check_cpu_kernels
from ops.onednn_linear import onednn_linear

Forward = Callable[[torch.Tensor], torch.Tensor]
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Entry:
    """A model under test: the module (for parameters and the optimizer) and how to call it."""

    name: str
    module: nn.Module
    forward: Forward


_CPU_KERNELS_ENV = "VISION_SUITE_BENCH_CPU_KERNELS"


def cpu_kernels() -> CpuKernels:
    """The running script's ``--cpu-kernels``: what our task modules are built with. ``parse_bench_args`` puts it in
    the environment, so the fresh processes a script starts (memory measurements) build theirs the same way."""
    return check_cpu_kernels(os.environ.get(_CPU_KERNELS_ENV, "off"))


def matmul_peak(repeats: int = 5, n: int = 2048) -> float:
    """Measured fp32 matmul throughput in GFLOP/s (median of ``repeats``), the better of PyTorch's two CPU GEMMs:
    ``torch.mm`` (MKL, which runs its AVX2 code on AMD processors) and oneDNN's (``ops/onednn_linear.py``, where this
    PyTorch has it: ``F.linear`` otherwise)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    products = [lambda: a @ b, lambda: onednn_linear(a, b, None, "on")]
    best = 0.0
    for product in products:
        product()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            product()
            times.append(time.perf_counter() - t)
        best = max(best, 2 * n**3 / statistics.median(times) / 1e9)
    return best


def count_flops(entry: Entry, x: torch.Tensor, y: torch.Tensor, loss: Loss) -> tuple[float, float]:
    """Forward and training-step FLOPs per sample, grouped-convolution weight gradients corrected."""
    grouped: list[float] = []

    def hook(m: nn.Module, inputs: tuple[torch.Tensor], out: torch.Tensor) -> None:
        grouped.append(2.0 * out.numel() * m.weight[0].numel() * (m.groups - 1))  # over-count: (g - 1) x forward

    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    handles = [m.register_forward_hook(hook) for m in entry.module.modules() if isinstance(m, convs) and m.groups > 1]
    entry.module.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fwd:
        entry.forward(x)
    grouped.clear()
    entry.module.train()
    with FlopCounterMode(display=False) as train:
        loss(entry.forward(x), y).backward()
    entry.module.zero_grad(set_to_none=True)
    for h in handles:
        h.remove()
    b = x.shape[0]
    return fwd.get_total_flops() / b, (train.get_total_flops() - sum(grouped)) / b


def compare(
    entries: list[Entry], x: torch.Tensor, y: torch.Tensor, loss: Loss, *, steps: int, warmup: int, title: str,
    baseline: str = "ours",
) -> str:
    """Time every entry's training step and inference, interleaved; return a markdown table with ratios."""
    opts = {e.name: torch.optim.AdamW(e.module.parameters(), lr=1e-4) for e in entries}
    flops = {e.name: count_flops(e, x, y, loss) for e in entries}
    times: dict[str, dict[str, list[float]]] = {e.name: {"train": [], "infer": []} for e in entries}
    peak = matmul_peak()
    for step in range(warmup + steps):
        for e in entries if step % 2 else entries[::-1]:  # each goes first as often: no order advantage
            e.module.train()
            t = time.perf_counter()
            loss(e.forward(x), y).backward()
            opts[e.name].step()
            opts[e.name].zero_grad(set_to_none=True)
            train_s = time.perf_counter() - t
            e.module.eval()
            t = time.perf_counter()
            with torch.inference_mode():
                e.forward(x)
            infer_s = time.perf_counter() - t
            if step >= warmup:
                times[e.name]["train"].append(train_s)
                times[e.name]["infer"].append(infer_s)
    peak = max(peak, matmul_peak())  # measured before and after; the better one is the ceiling
    batch = x.shape[0]
    rate = {k: {s: batch / statistics.median(v) for s, v in t.items()} for k, t in times.items()}
    lines = [
        f"{title}; fp32, {torch.get_num_threads()} thread(s), our CPU kernels {cpu_kernels()}, median of {steps} "
        f"interleaved steps after {warmup} warm-up; {cpu_model()}, "
        f"torch {torch.__version__}, {datetime.date.today()}. "
        f"Ceiling: fp32 2048x2048 matmul {peak:.1f} GFLOP/s (the better of MKL and oneDNN).",
        "",
        "| model | params M | fwd GFLOP | train GFLOP | infer samples/s | train samples/s | "
        f"{baseline} vs it, infer | {baseline} vs it, train | MFU infer | MFU train |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        fwd, train = flops[e.name]
        params = sum(p.numel() for p in e.module.parameters()) / 1e6
        r = rate[e.name]
        lines.append(
            f"| {e.name} | {params:.2f} | {fwd / 1e9:.1f} | {train / 1e9:.1f} | {r['infer']:.2f} | {r['train']:.2f} | "
            f"{rate[baseline]['infer'] / r['infer']:.2f}x | {rate[baseline]['train'] / r['train']:.2f}x | "
            f"{fwd * r['infer'] / 1e9 / peak:.0%} | {train * r['train'] / 1e9 / peak:.0%} |"
        )
    return "\n".join(lines)


def interleaved_medians(calls: dict[str, Callable[[], object]], steps: int, warmup: int) -> dict[str, float]:
    """Median seconds of each call over ``steps`` rounds after ``warmup``, the calls interleaved in each round (each
    goes first as often: no order advantage)."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    names = list(calls)
    for step in range(warmup + steps):
        for name in names if step % 2 else names[::-1]:
            start = time.perf_counter()
            calls[name]()
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_parser(doc: str | None, *, steps: int, warmup: int) -> argparse.ArgumentParser:
    """The options every benchmark script shares; add the script's own, then call ``parse_bench_args``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per model (medians are reported)")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed steps before them")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--results", type=Path, default=None, help="write the tables into this markdown file")
    parser.add_argument("--cpu-kernels", choices=CPU_KERNELS, default="off",
                        help="our models' hand-written CPU kernels (ops/): off (plain PyTorch), on, or auto (timed)")
    return parser


def parse_bench_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ[_CPU_KERNELS_ENV] = args.cpu_kernels
    return args


def write_section(path: Path, heading: str, body: str) -> None:
    """Replace (or append) the ``## <heading>`` section of a markdown results file."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    section = f"## {heading}\n\n{body}\n"
    pattern = rf"## {re.escape(heading)}\n.*?(?=\n## |\Z)"
    if re.search(pattern, text, flags=re.S):
        text = re.sub(pattern, lambda m: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
