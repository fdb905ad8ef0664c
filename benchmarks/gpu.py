"""Every GPU figure of the suite in one short run: ours against the reference implementations, side by side.

    python -m benchmarks.gpu --out gpu_out                      # one CUDA GPU, 8 minutes in all (--time-limit 480)
    python -m benchmarks.gpu --out /tmp/dry --dry-run           # the same code paths on the CPU, tiny models, ~30 s

Rows, in order of importance (a row that does not fit in the time left is written "not measured: <why>"):

- speed rows ``<bench>/<precision>/<eager|compile>``: training step (forward, cross-entropy, backward, AdamW) and
  inference (``torch.no_grad``) of ours and the reference on the same weights and inputs, under ``bf16-mixed`` or
  ``16-mixed`` autocast (fp16 with a ``GradScaler``), eager or ``torch.compile`` (inductor): samples/s, peak GPU
  memory (``torch.cuda.max_memory_allocated``, each model alone on the GPU: weights, optimizer state, activations)
  and MFU against the GPU's dense bf16 tensor-core peak (``PEAK_BF16_TFLOPS`` by ``torch.cuda.get_device_name()``;
  ``--peak-tflops`` overrides). FLOPs per sample are counted once per model with ``torch.utils.flop_counter`` (eager,
  2 x multiply-accumulate; grouped convolutions' weight gradients corrected as in ``harness.py``). Benches:
  ViT-B/16 vs timm 224²; SegFormer-B0 vs smp (same weights) and transformers 512²; UNETR-Base vs MONAI 96³;
  TimeSformer-B vs transformers 8x224²; ViT-ResNAS-S vs DeiT-B (timm); DynamicViT ViT-S rho 0.7 vs the dense ViT-S
  (same weights); EfficientFormerV2-L fused and unfused vs timm (same weights); token merging vs dense ViT-B when
  ``backbones.token_merging`` exists. Batches are sized to the GPU's memory and halved on an out-of-memory error.
- ``outputs/<pair>``: a training step of ours equals the reference's under bf16 and fp16 autocast, within a multiple of
  the reference's own mixed-precision error (``benchmarks/reference_pairs.py``, the paper sizes).
- ``loss20/<task>``: each task's training loss after 20 steps on its built-in data (the recipe in ``configs/``),
  bf16-mixed against 32-true, same seed: within 2 %.
- ``vitg_memory``: ViT-g/14 (the ``configs/vit_giant_patch14_scaling.yaml`` model: MAP head, 21,843 classes, sigmoid
  loss, big_vision's Adafactor), FSDP2 + activation checkpointing + bf16-mixed, one training step at the largest batch
  that fits (doubling, then bisection, out-of-memory errors caught), its measured peak against README's memory table.

Each row runs in a worker process; an out-of-memory error costs the row a smaller batch, any other error or a crash
costs that row only (a fresh worker takes the rest), and a row over its own time limit is killed. Writes
``gpu_results.json`` and ``gpu_results.md`` (GPU, driver, CUDA, torch and package versions, every row) to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import fnmatch
import functools
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GPU_COMMAND = "python -m benchmarks.gpu --out gpu_out"
REPO = Path(__file__).resolve().parents[1]

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets, matched in order against
# torch.cuda.get_device_name() (case-insensitive substrings; the SXM H100 calls itself "NVIDIA H100 80GB HBM3").
# fp16 has the same dense peak on all of them, so 16-mixed rows use it too.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM5
    ("H800", 989.4),
    ("A100", 312.0),  # SXM4 and PCIe, 40 and 80 GB
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
]


def peak_tflops(device_name: str, override: float | None = None) -> tuple[float | None, str]:
    """The dense bf16 peak of ``device_name`` and where it comes from; ``override`` (``--peak-tflops``) wins."""
    if override is not None:
        if not override > 0:
            raise ValueError(f"--peak-tflops must be positive, got {override}")
        return override, "--peak-tflops"
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value, f"table: {key}"
    return None, f"{device_name!r} is not in the table; pass --peak-tflops"


def mfu(flop_per_sample: float | None, samples_per_s: float | None, peak: float | None) -> float | None:
    """Model FLOP utilisation: achieved FLOP/s over the peak (TFLOP/s); ``None`` where a figure is missing."""
    if not flop_per_sample or not samples_per_s or not peak:
        return None
    return flop_per_sample * samples_per_s / (peak * 1e12)


# --- rows ----------------------------------------------------------------------------------------------------------

PRECISIONS = ("bf16-mixed", "16-mixed")
SPEED_BENCHES = ("vit_b16", "segformer_b0", "unetr_base", "timesformer_b", "vit_resnas_s", "dynamicvit_s",
                 "efficientformerv2_l", "token_merging")
OUTPUT_PAIRS = ("vit_timm", "segformer_smp", "unetr_monai", "timesformer_hf")
LOSS_TASKS = ("classification", "segmentation", "video", "medical")


@dataclass(frozen=True)
class Row:
    id: str
    kind: str  # speed, outputs, loss20, vitg_memory
    needs_s: float  # about the least time it takes: a row is not started with less left
    timeout_s: float  # killed after this long
    bench: str = ""
    precision: str = ""
    compiled: bool = False


def all_rows() -> list[Row]:
    """Every row, most important first."""
    def speed(bench: str, precision: str, compiled: bool) -> Row:
        mode = "compile" if compiled else "eager"
        return Row(f"{bench}/{precision}/{mode}", "speed", 60 if compiled else 15, 240 if compiled else 120, bench,
                   precision, compiled)

    rows = [speed("vit_b16", "bf16-mixed", False), Row("vitg_memory", "vitg_memory", 40, 150),
            speed("vit_b16", "bf16-mixed", True)]
    rows += [Row(f"outputs/{p}", "outputs", 8, 90, p) for p in OUTPUT_PAIRS]
    rows += [speed(b, "bf16-mixed", False) for b in SPEED_BENCHES[1:]]
    rows += [Row(f"loss20/{t}", "loss20", 15, 150, t) for t in LOSS_TASKS]
    rows += [speed(b, "16-mixed", False) for b in SPEED_BENCHES]
    rows += [speed(b, "bf16-mixed", True) for b in SPEED_BENCHES[1:]]
    rows += [speed(b, "16-mixed", True) for b in SPEED_BENCHES]
    return rows


def select_rows(only: list[str] | None) -> list[Row]:
    """The rows ``--only`` names (``fnmatch`` patterns or prefixes: ``vit_b16/*``, ``loss20``, ``vitg_memory``), in the
    order of ``all_rows``."""
    rows = all_rows()
    if not only:
        return rows
    kept = [r for r in rows if any(fnmatch.fnmatchcase(r.id, p) or r.id.startswith(p + "/") for p in only)]
    if not kept:
        raise SystemExit(f"--only {' '.join(only)} matches no row; rows: {', '.join(r.id for r in rows)}")
    return kept


class NotMeasured(Exception):
    """A row that cannot be taken here (a missing module, a dry run's limits): written "not measured: <why>"."""


# --- the worker: one process that runs rows in turn ----------------------------------------------------------------


@dataclass
class Context:
    device: str
    dry_run: bool
    peak: float | None
    memory_gib: float | None
    tmp: Path
    flops: dict[tuple[str, str], tuple[float, float | None]] = field(default_factory=dict)

    def batch(self, full: int, tiny: int) -> int:
        """``full`` is for an 80 GB GPU (79.1 GiB as CUDA counts it): scaled to this one's memory, a power of two."""
        if self.dry_run:
            return tiny
        scaled = full * min(2.0, (self.memory_gib or 76.0) / 76.0)
        return max(1, 2 ** math.floor(math.log2(max(1.0, scaled))))

    def sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()


@dataclass
class Model:
    name: str
    module: Any  # nn.Module: parameters, train/eval, device
    forward: Callable[[Any], Any]
    trains: bool = True


@dataclass
class Bench:
    title: str
    models: list[Model]
    x: Any
    y: Any
    baseline: str
    notes: list[str] = field(default_factory=list)


def _classification_target(classes: int, batch: int):
    import torch

    return torch.randint(0, classes, (batch,))


def build_vit_b16(ctx: Context, batch: int) -> Bench:
    from benchmarks.reference_pairs import vit_pair

    scale = "tiny" if ctx.dry_run else "full"
    reference, run, ours, x = vit_pair(ctx.tmp, scale, batch)
    classes = 5 if ctx.dry_run else 1000
    return Bench(f"ViT-B/16 vs timm `vit_base_patch16_224`, {x.shape[-1]}², {classes} classes, same weights",
                 [Model("ours", ours, ours), Model("timm", reference, run)], x, _classification_target(classes, batch),
                 "ours")


def build_segformer_b0(ctx: Context, batch: int) -> Bench:
    import torch
    import torch.nn.functional as F

    from benchmarks.reference_pairs import segformer_pair

    reference, run, ours, x = segformer_pair(ctx.tmp, "tiny" if ctx.dry_run else "full", batch)
    classes = ours.num_classes
    models = [Model("ours", ours, ours), Model("smp", reference, run)]
    notes = []
    try:
        from transformers import SegformerConfig, SegformerForSemanticSegmentation
    except ImportError:
        notes.append("transformers is not installed: no transformers column")
    else:
        hf = SegformerForSemanticSegmentation(SegformerConfig(num_labels=classes))

        def hf_forward(x: torch.Tensor) -> torch.Tensor:
            return F.interpolate(hf(pixel_values=x).logits, size=x.shape[2:], mode="bilinear", align_corners=False)

        models.append(Model("transformers", hf, hf_forward))
        notes.append("transformers' SegFormer has its own initial weights (speed only); its 1/4-resolution logits are "
                     "upsampled as in its loss")
    y = torch.randint(0, classes, (batch, *x.shape[2:]))
    return Bench(f"SegFormer-B0 vs smp (same weights) and transformers, {x.shape[-1]}², {classes} classes",
                 models, x, y, "ours", notes)


def build_unetr_base(ctx: Context, batch: int) -> Bench:
    import torch

    from benchmarks.reference_pairs import unetr_pair

    reference, run, ours, x = unetr_pair(ctx.tmp, "tiny" if ctx.dry_run else "full", batch)
    y = torch.randint(0, ours.num_classes, (batch, *x.shape[2:]))
    return Bench(f"UNETR-Base vs MONAI `UNETR`, {x.shape[-1]}³, {ours.num_classes} classes, same weights",
                 [Model("ours", ours, ours), Model("monai", reference, run)], x, y, "ours")


def build_timesformer_b(ctx: Context, batch: int) -> Bench:
    from benchmarks.reference_pairs import timesformer_pair

    reference, run, ours, x = timesformer_pair(ctx.tmp, "tiny" if ctx.dry_run else "full", batch)
    return Bench(f"TimeSformer-B vs transformers `TimesformerForVideoClassification`, {x.shape[2]}x{x.shape[-1]}², "
                 f"divided attention, {ours.num_classes} classes, same weights",
                 [Model("ours", ours, ours), Model("transformers", reference, run)], x,
                 _classification_target(ours.num_classes, batch), "ours")


def build_vit_resnas_s(ctx: Context, batch: int) -> Bench:
    import timm
    import torch

    from tasks.classification import ClassificationModule

    if ctx.dry_run:
        size, ours_name, deit = 56, "vit_resnas_tiny", "deit_tiny_patch16_224"
    else:
        size, ours_name, deit = 224, "vit_resnas_small", "deit_base_patch16_224"
    torch.manual_seed(0)
    ours = ClassificationModule(backbone=ours_name, backbone_kwargs={"img_size": size}, num_classes=1000)
    reference = timm.create_model(deit, img_size=size)
    return Bench(f"{ours_name} vs timm `{deit}`, {size}², 1000 classes (different networks)",
                 [Model("ours", ours, ours), Model("deit", reference, reference)], torch.randn(batch, 3, size, size),
                 _classification_target(1000, batch), "ours")


def build_dynamicvit_s(ctx: Context, batch: int) -> Bench:
    import torch

    from tasks.classification import ClassificationModule

    if ctx.dry_run:
        size, kwargs, prune = 32, {"img_size": 32, "patch_size": 8, "depth": 2}, {"prune_at": (1,)}
        name = "vit_tiny_patch16"
    else:
        size, kwargs, prune, name = 224, {"img_size": 224}, {}, "vit_small_patch16"
    torch.manual_seed(0)
    pruned = ClassificationModule(backbone=name, backbone_kwargs=kwargs, num_classes=1000, token_pruning=True,
                                  keep_ratio=0.7, **prune)
    dense = ClassificationModule(backbone=name, backbone_kwargs=kwargs, num_classes=1000)
    dense.load_state_dict({k: v for k, v in pruned.state_dict().items() if ".predictors." not in k})
    return Bench(f"DynamicViT {name} (rho 0.7, blocks {prune.get('prune_at', (3, 6, 9))}) vs the dense network, same "
                 f"weights, {size}², 1000 classes", [Model("dynamicvit", pruned, pruned), Model("dense", dense, dense)],
                 torch.randn(batch, 3, size, size), _classification_target(1000, batch), "dynamicvit",
                 ["training runs the masked forward (every token kept, decisions as an attention policy)"])


def build_efficientformerv2_l(ctx: Context, batch: int) -> Bench:
    import timm
    import torch

    from tasks.classification import ClassificationModule

    name, size = ("efficientformerv2_s0", 32) if ctx.dry_run else ("efficientformerv2_l", 224)
    torch.manual_seed(0)
    reference = timm.create_model(name, img_size=size)
    torch.save(reference.state_dict(), ctx.tmp / "efficientformerv2.pth")
    ours = ClassificationModule(backbone=name, backbone_kwargs={"img_size": size}, num_classes=1000,
                                pretrained=str(ctx.tmp / "efficientformerv2.pth"))
    fused = copy.deepcopy(ours).eval()
    fused.backbone.fuse()
    return Bench(f"{name} fused (inference) and unfused vs timm `{name}`, {size}², 1000 classes, same weights",
                 [Model("ours fused", fused, fused, trains=False), Model("ours", ours, ours),
                  Model("timm", reference, reference)], torch.randn(batch, 3, size, size),
                 _classification_target(1000, batch), "ours fused", ["the fused form is inference only"])


def token_merging_method() -> str:
    """The registered token-merging reduction, or ``NotMeasured`` when this version has none."""
    if importlib.util.find_spec("backbones.token_merging") is None:
        raise NotMeasured("no token merging in this version (backbones.token_merging does not exist)")
    importlib.import_module("backbones.token_merging")
    from backbones.token_reduction import TOKEN_REDUCTIONS

    found = [m for m in TOKEN_REDUCTIONS if "tome" in m.lower() or "merg" in m.lower()]
    if not found:
        raise NotMeasured("backbones.token_merging registers no token reduction named like tome/merge: "
                          f"{sorted(TOKEN_REDUCTIONS)}")
    return found[0]


def build_token_merging(ctx: Context, batch: int) -> Bench:
    import torch

    from tasks.classification import ClassificationModule

    method = token_merging_method()
    if ctx.dry_run:
        size, kwargs, name, r = 32, {"img_size": 32, "patch_size": 8, "depth": 2}, "vit_tiny_patch16", 2
    else:  # ToMe's off-the-shelf ViT-B/16 setting: r = 16 tokens merged in each of the 12 blocks
        size, kwargs, name, r = 224, {"img_size": 224}, "vit_base_patch16", 16
    torch.manual_seed(0)
    merged = ClassificationModule(backbone=name, backbone_kwargs=kwargs, num_classes=1000,
                                  token_reduction={"method": method, "r": r})
    dense = ClassificationModule(backbone=name, backbone_kwargs=kwargs, num_classes=1000)
    result = dense.load_state_dict(merged.state_dict(), strict=False)
    return Bench(f"token merging (`{method}`, r {r} per block) on {name} vs the dense network, same weights, "
                 f"{size}², 1000 classes", [Model(method, merged, merged), Model("dense", dense, dense)],
                 torch.randn(batch, 3, size, size), _classification_target(1000, batch), method,
                 [f"weights the dense network lacks: {len(result.unexpected_keys)}"] if result.unexpected_keys else [])


# bench -> (builder, batch on an 80 GB GPU, batch in the dry run)
BENCHES: dict[str, tuple[Callable[[Context, int], Bench], int, int]] = {
    "vit_b16": (build_vit_b16, 256, 2),
    "segformer_b0": (build_segformer_b0, 32, 1),
    "unetr_base": (build_unetr_base, 4, 1),
    "timesformer_b": (build_timesformer_b, 16, 1),
    "vit_resnas_s": (build_vit_resnas_s, 256, 2),
    "dynamicvit_s": (build_dynamicvit_s, 256, 2),
    "efficientformerv2_l": (build_efficientformerv2_l, 128, 2),
    "token_merging": (build_token_merging, 256, 2),
}


def autocast(ctx: Context, precision: str):
    import torch

    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    return torch.autocast(ctx.device, dtype=dtype) if dtype else contextlib.nullcontext()


def loss_of(output: Any, y: Any):
    import torch.nn.functional as F

    return F.cross_entropy(output.float(), y)


def count_flops(model: Model, x: Any, y: Any) -> tuple[float, float | None]:
    """Forward (eval) and training-step FLOPs per sample, grouped convolutions' weight gradients corrected."""
    import torch
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    grouped: list[float] = []

    def hook(m: nn.Module, inputs: Any, out: torch.Tensor) -> None:
        grouped.append(2.0 * out.numel() * m.weight[0].numel() * (m.groups - 1))  # FlopCounter ignores groups there

    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    handles = [m.register_forward_hook(hook) for m in model.module.modules() if isinstance(m, convs) and m.groups > 1]
    try:
        model.module.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as fwd:
            model.forward(x)
        grouped.clear()
        train = None
        if model.trains:
            model.module.train()
            with FlopCounterMode(display=False) as counter:
                loss_of(model.forward(x), y).backward()
            model.module.zero_grad(set_to_none=True)
            train = (counter.get_total_flops() - sum(grouped)) / x.shape[0]
    finally:
        for h in handles:
            h.remove()
    return fwd.get_total_flops() / x.shape[0], train


def timed(ctx: Context, fn: Callable[[], None], *, warmup: int, target_s: float, max_steps: int) -> dict[str, float]:
    """Seconds per call after ``warmup`` calls (the first timed apart: compilation), over enough calls for
    ``target_s``."""
    ctx.sync()
    t = time.perf_counter()
    fn()
    ctx.sync()
    first = time.perf_counter() - t
    for _ in range(warmup - 1):
        fn()
    steps = 1
    if not ctx.dry_run:  # enough steps for target_s, from one timed step
        ctx.sync()
        t = time.perf_counter()
        fn()
        ctx.sync()
        steps = max(3, min(max_steps, math.ceil(target_s / max(time.perf_counter() - t, 1e-6))))
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    ctx.sync()
    return {"s": (time.perf_counter() - t) / steps, "steps": steps, "first_s": first}


def peak_memory_gib(ctx: Context) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if ctx.device == "cuda" else None


def reset_memory(ctx: Context) -> None:
    import torch

    gc.collect()
    if ctx.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure_model(ctx: Context, row: Row, bench_name: str, model: Model, x: Any, y: Any) -> dict[str, Any]:
    import torch

    module = model.module.to(ctx.device)
    simulated_out_of_memory(row.id, x.shape[0])
    key = (bench_name, model.name)
    if key not in ctx.flops:
        n = min(2, x.shape[0])
        ctx.flops[key] = count_flops(model, x[:n], y[:n])
    fwd_flop, train_flop = ctx.flops[key]
    forward = model.forward
    if row.compiled:
        options = {"backend": "eager"} if ctx.dry_run else {}
        forward = torch.compile(model.forward, **options)
    found: dict[str, Any] = {"name": model.name, "params_m": sum(p.numel() for p in module.parameters()) / 1e6,
                             "fwd_gflop_per_sample": fwd_flop / 1e9,
                             "train_gflop_per_sample": None if train_flop is None else train_flop / 1e9}
    warmup = 1 if ctx.dry_run else (2 if row.compiled else 3)
    if model.trains:
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=ctx.device == "cuda")
        scaler = torch.amp.GradScaler(ctx.device) if row.precision == "16-mixed" else None

        def train() -> None:
            with autocast(ctx, row.precision):
                loss = loss_of(forward(x), y)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad(set_to_none=True)

        module.train()
        reset_memory(ctx)
        t = timed(ctx, train, warmup=warmup, target_s=1.5, max_steps=40)
        found.update(train_samples_per_s=x.shape[0] / t["s"], train_steps=t["steps"], train_first_s=t["first_s"],
                     train_peak_gib=peak_memory_gib(ctx), mfu_train=mfu(train_flop, x.shape[0] / t["s"], ctx.peak))
        del optimizer, scaler, train
        module.zero_grad(set_to_none=True)
    module.eval()
    reset_memory(ctx)

    def infer() -> None:
        with torch.no_grad(), autocast(ctx, row.precision):
            forward(x)

    t = timed(ctx, infer, warmup=warmup, target_s=1.0, max_steps=60)
    found.update(infer_samples_per_s=x.shape[0] / t["s"], infer_steps=t["steps"], infer_first_s=t["first_s"],
                 infer_peak_gib=peak_memory_gib(ctx), mfu_infer=mfu(fwd_flop, x.shape[0] / t["s"], ctx.peak))
    module.to("cpu")
    if row.compiled:
        torch._dynamo.reset()
    reset_memory(ctx)
    return found


def run_speed(ctx: Context, row: Row) -> dict[str, Any]:
    import torch

    if row.compiled and ctx.dry_run and row.id != "vit_b16/bf16-mixed/compile":
        raise NotMeasured("dry run: torch.compile is exercised on vit_b16/bf16-mixed/compile only (dynamo with the "
                          "eager backend; inductor takes minutes on a CPU)")
    build, full, tiny = BENCHES[row.bench]
    batch = ctx.batch(full, tiny)
    notes: list[str] = []
    while True:
        out_of_memory = False
        try:
            torch.manual_seed(0)
            bench = build(ctx, batch)
            x, y = bench.x.to(ctx.device), bench.y.to(ctx.device)
            models = [measure_or_fail(ctx, row, m, x, y) for m in bench.models]
            break
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True
        bench = x = y = None  # free the models before the smaller batch
        if row.compiled:
            torch._dynamo.reset()  # compiled code holds the models too
        reset_memory(ctx)
        if out_of_memory:
            if batch == 1:
                raise RuntimeError("out of memory at batch 1")
            notes.append(f"batch {batch} ran out of memory: halved")
            batch //= 2
    failed = [m for m in models if "error" in m]
    if len(failed) == len(models):
        raise RuntimeError("every model failed: " + "; ".join(f"{m['name']}: {m['error']}" for m in failed))
    base = next(m for m in models if m["name"] == bench.baseline)
    for m in (m for m in models if "error" not in m):
        for mode in ("train", "infer"):
            mine, theirs = base.get(f"{mode}_samples_per_s"), m.get(f"{mode}_samples_per_s")
            m[f"{bench.baseline} vs it, {mode}"] = mine / theirs if mine and theirs else None
    return {"title": bench.title, "batch": batch, "baseline": bench.baseline, "models": models,
            "notes": notes + bench.notes, "restart_worker": bool(failed)}


def measure_or_fail(ctx: Context, row: Row, model: Model, x: Any, y: Any) -> dict[str, Any]:
    """``measure_model``, or the error that stopped it: a reference that does not compile costs its own figures only.
    Out-of-memory errors go up (the row retries at a smaller batch)."""
    import torch

    try:
        fault(f"{row.id}:{model.name}")
        return measure_model(ctx, row, row.bench, model, x, y)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001
        with contextlib.suppress(Exception):
            model.module.to("cpu")
            torch._dynamo.reset()
            reset_memory(ctx)
        return {"name": model.name, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}


def run_outputs(ctx: Context, row: Row) -> dict[str, Any]:
    import torch

    from benchmarks.reference_pairs import PAIRS, check_against_reference

    torch.manual_seed(0)
    pair = PAIRS[row.bench](ctx.tmp, "tiny" if ctx.dry_run else "full")
    checks: list[dict[str, Any]] = []
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # the fp32 results are the yardstick: no TF32 in them
    try:
        for dtype in (torch.bfloat16, torch.float16):
            found = check_against_reference(pair, ctx.device, dtype, strict=False)
            checks += [c for c in found if c["case"] != "fp32" or dtype == torch.bfloat16]  # fp32 (CPU only) once
    finally:
        torch.set_float32_matmul_precision(precision)
    del pair
    reset_memory(ctx)
    passed = all(c["error"] <= c["bound"] for c in checks)
    return {"title": f"{row.bench}: a training step's logits and input gradient, ours vs the reference, same weights "
                     "(bound: 4x the reference's own distance from its fp32 result + 8 eps)",
            "pass": passed, "checks": checks}


# task -> (task module with main(), config, GPU overrides, dry-run overrides); the GPU runs write smaller built-in
# data sets than the configs' (20 steps need no more, and a fresh machine writes them first)
LOSS_RUNS: dict[str, tuple[str, str, list[str], list[str]]] = {
    "classification": ("tasks.classification", "configs/vit_small_patch16.yaml", [
        "--data.synthetic_train_per_class=64"], [
        "--model.backbone_kwargs={img_size: 32, depth: 1, embed_dim: 48, num_heads: 2}", "--data.image_size=32",
        "--data.batch_size=4", "--data.synthetic_train_per_class=4", "--data.num_workers=0"]),
    "segmentation": ("tasks.segmentation", "configs/segformer_b0.yaml", [
        "--data.synthetic_train=64", "--data.synthetic_val=8"], [
        "--data.synthetic_size=64", "--data.synthetic_train=4", "--data.synthetic_val=2", "--data.crop_size=[32, 32]",
        "--data.batch_size=2", "--data.num_workers=0"]),
    "video": ("tasks.video", "configs/timesformer_nano.yaml", ["--data.synthetic_per_class=16"], [
        "--model.backbone_kwargs={img_size: 32, num_frames: 2, embed_dim: 32, depth: 1, num_heads: 2}",
        "--data.num_frames=2", "--data.synthetic_per_class=2", "--data.batch_size=2", "--data.num_workers=0"]),
    "medical": ("tasks.medical", "configs/unetr.yaml", ["--data.synthetic_num_train=8"], [
        "--model.backbone_kwargs={img_size: 32, embed_dim: 32, depth: 4, num_heads: 2, out_indices: [0, 1, 2, 3]}",
        "--model.feature_size=4", "--data.roi_size=[32, 32, 32]", "--data.synthetic_num_train=2",
        "--data.synthetic_size=32", "--data.batch_size=1", "--data.num_samples=1", "--data.cache_rate=0",
        "--data.num_workers=0"]),
}


def fit_losses(ctx: Context, task: str, precision: str, steps: int) -> list[float]:
    """The training loss of each of ``steps`` steps of ``python -m tasks.<task> fit`` with the task's config."""
    import lightning as L
    from lightning.pytorch import Trainer

    class Recorder(L.Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss))

    module, config, gpu_args, dry_args = LOSS_RUNS[task]
    main = importlib.import_module(module).main
    args = ["fit", f"--config={REPO / config}", *(dry_args if ctx.dry_run else gpu_args),
            f"--trainer.max_steps={steps}", f"--trainer.precision={precision}",
            "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={ctx.tmp / 'runs' / task / precision}",
            "--trainer.accelerator=" + ("cpu" if ctx.dry_run else "gpu"), "--trainer.devices=1", "--seed_everything=0"]
    recorder = Recorder()

    original = Trainer.__init__

    @functools.wraps(original)  # the same signature: the CLI reads the trainer's arguments from it
    def with_recorder(self: Any, *a: Any, **kw: Any) -> None:  # the CLI builds the trainer: add the recorder to it
        kw["callbacks"] = [*(kw.get("callbacks") or []), recorder]
        original(self, *a, **kw)

    Trainer.__init__ = with_recorder  # type: ignore[method-assign]
    try:
        main(args)
    finally:
        Trainer.__init__ = original  # type: ignore[method-assign]
    if len(recorder.losses) < steps:
        raise RuntimeError(f"{task} {precision}: {len(recorder.losses)} training steps ran, {steps} asked")
    return recorder.losses


def run_loss20(ctx: Context, row: Row) -> dict[str, Any]:
    steps = 2 if ctx.dry_run else 20
    losses = {p: fit_losses(ctx, row.bench, p, steps) for p in ("32-true", "bf16-mixed")}
    final = {p: v[-1] for p, v in losses.items()}
    relative = abs(final["bf16-mixed"] - final["32-true"]) / abs(final["32-true"])
    config = LOSS_RUNS[row.bench][1]
    return {"title": f"{row.bench}: training loss after {steps} steps on the built-in data ({config}), "
                     "bf16-mixed vs 32-true, same seed", "steps": steps, "losses": losses, "final": final,
            "relative_difference": relative, "pass": relative <= 0.02}


# README "Scaling out", ViT-g/14 at 224², bf16-mixed: per GPU, P = 1,065,780,051 parameters with the head.
README_VITG = {
    "state_gib": 3.97 + 3.97 + 1.99 + 1.99,  # fp32 weights, fp32 gradients, Adafactor, autocast's bf16 weight copies
    "gathered_gib": 0.8,  # root unit + 2 blocks in flight under FSDP (one shard: these are the weights themselves)
    "checkpointed_mib_per_image": 8.98 * 1024 / 128,  # "activations, batch 128, checkpointed: 8.98 GiB"
    "fsdp8_total_gib_at_128": 13.0,
}


@contextlib.contextmanager
def one_process_group(ctx: Context) -> Iterator[Any]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if ctx.device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield init_device_mesh(ctx.device, (1,))
    finally:
        dist.destroy_process_group()


def run_vitg_memory(ctx: Context, row: Row) -> dict[str, Any]:
    import torch

    from engine.distributed import shard_task_module
    from engine.optimization import build_optimizer
    from tasks.classification import ClassificationModule

    size = 28 if ctx.dry_run else 224
    kwargs = {"img_size": size, **({"depth": 2, "embed_dim": 32, "num_heads": 2} if ctx.dry_run else {})}
    classes = 10 if ctx.dry_run else 21843
    cap = 8 if ctx.dry_run else 4096
    tries: list[dict[str, Any]] = []

    with one_process_group(ctx) as mesh:
        state: dict[str, Any] = {}

        def build() -> None:
            state.clear()
            reset_memory(ctx)
            torch.manual_seed(0)
            with torch.device(ctx.device):
                module = ClassificationModule(
                    backbone="vit_giant_patch14", backbone_kwargs=kwargs, num_classes=classes, pool="map",
                    activation_checkpointing=True, loss="sigmoid", optimizer="adafactor_bv", lr=8e-4, momentum=0.9,
                    weight_decay=0.03, head_weight_decay=3.0,
                )
            shard_task_module(module, module.backbone.sharding_units(), mesh)
            module.train()
            state["module"] = module
            state["params"] = sum(p.numel() for p in module.parameters())
            state["optimizer"] = build_optimizer("adafactor_bv", module.parameter_groups(), lr=8e-4, momentum=0.9,
                                                 betas=(0.9, 0.999))

        def step(batch: int, repeats: int = 1) -> dict[str, Any]:
            """One training step at ``batch`` (``repeats`` of them); its peak memory, or None on out-of-memory."""
            if "module" not in state:
                build()
            module, optimizer = state["module"], state["optimizer"]
            out_of_memory = False
            reset_memory(ctx)
            t = time.perf_counter()
            try:
                for _ in range(repeats):
                    simulated_out_of_memory(row.id, batch)
                    x = torch.randn(batch, 3, size, size, device=ctx.device)
                    y = torch.randint(0, classes, (batch,), device=ctx.device)
                    with torch.autocast(ctx.device, dtype=torch.bfloat16):
                        loss = module.compute_loss(module(x), y)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    del x, y, loss
                ctx.sync()
            except torch.cuda.OutOfMemoryError:
                out_of_memory = True
            seconds = (time.perf_counter() - t) / repeats
            peak = peak_memory_gib(ctx)
            if out_of_memory:  # the sharded model's state after a failed step is not trusted: built afresh
                state.clear()
                reset_memory(ctx)
            found = {"batch": batch, "fits": not out_of_memory, "peak_gib": None if out_of_memory else peak,
                     "step_s": None if out_of_memory else seconds}
            tries.append(found)
            return found

        lo, hi = 0, None
        batch = 1 if ctx.dry_run else 8
        while batch <= cap:  # doubling
            if step(batch)["fits"]:
                lo, batch = batch, batch * 2
            else:
                hi = batch
                break
        if lo == 0:
            raise RuntimeError(f"ViT-g/14 does not fit at batch {tries[-1]['batch']}")
        granularity = 1 if ctx.dry_run else 16
        while hi is not None and hi - lo > granularity:  # bisection between the last fit and the first failure
            mid = (lo + hi) // 2 // granularity * granularity
            if mid <= lo:
                break
            if step(mid)["fits"]:
                lo = mid
            else:
                hi = mid
        final = step(lo, repeats=2)  # the largest batch that fits, again after warm-up: its steady peak and time
        while not final["fits"] and lo > granularity:  # a fresh model's allocations fell out otherwise: a step down
            lo -= granularity
            final = step(lo, repeats=2)
        half = step(max(1, lo // 2)) if lo > 1 else None
        params = state.get("params")
    per_image = None
    if final["fits"] and half and half["fits"] and final["peak_gib"] is not None and half["peak_gib"] is not None:
        per_image = (final["peak_gib"] - half["peak_gib"]) * 1024 / (lo - half["batch"])
    predicted = None
    if not ctx.dry_run:
        predicted = (README_VITG["state_gib"] + README_VITG["gathered_gib"]
                     + README_VITG["checkpointed_mib_per_image"] * lo / 1024)
    return {
        "title": "ViT-g/14 (MAP head, 21,843 classes, sigmoid loss, big_vision Adafactor), FSDP2 + activation "
                 f"checkpointing + bf16-mixed, one GPU, {size}²: the largest batch that fits",
        "notes": ["one GPU: FSDP degenerates to one shard (every process holds the whole model; the sharding only adds "
                  "its all-gather copies), so the state is README's DDP column without DDP's buckets",
                  f"batch searched by doubling from {1 if ctx.dry_run else 8} up to {cap}, then bisection to a "
                  f"multiple of {granularity}; an out-of-memory step rebuilds the model"],
        "parameters": params, "largest_batch": lo, "first_failure": hi, "batch_cap": cap, "peak_gib": final["peak_gib"],
        "step_s": final["step_s"], "images_per_s": lo / final["step_s"] if final["step_s"] else None,
        "measured_mib_per_image": per_image, "readme_mib_per_image": README_VITG["checkpointed_mib_per_image"],
        "readme_predicted_gib": predicted,
        "readme_predicted_formula": "3.97 + 3.97 + 1.99 + 1.99 (state) + 0.8 (gathered units) + 71.8 MiB x batch",
        "gpu_memory_gib": ctx.memory_gib, "tries": tries,
    }


RUNNERS: dict[str, Callable[[Context, Row], dict[str, Any]]] = {
    "speed": run_speed, "outputs": run_outputs, "loss20": run_loss20, "vitg_memory": run_vitg_memory,
}


def environment(ctx: Context, override: float | None) -> dict[str, Any]:
    import torch

    found: dict[str, Any] = {"device": ctx.device, "torch": torch.__version__, "cuda": torch.version.cuda,
                             "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if ctx.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        name = torch.cuda.get_device_name(0)
        found.update(gpu=name, gpu_memory_gib=props.total_memory / 2**30, capability=f"{props.major}.{props.minor}",
                     gpu_count=torch.cuda.device_count())
    else:
        name = "cpu (dry run)"
        found.update(gpu=None, gpu_memory_gib=None)
    found["peak_tflops"], found["peak_source"] = peak_tflops(name, override)
    return found


def fault(row_id: str) -> None:
    """A test hook: ``VISION_SUITE_GPU_BENCH_FAULT=<row id>[:<model>]=<crash|hang|raise>[,...]`` makes that row (or
    that model of a speed row) fail so."""
    spec = os.environ.get("VISION_SUITE_GPU_BENCH_FAULT", "")
    for item in filter(None, spec.split(",")):
        target, _, kind = item.rpartition("=")
        if target == row_id:
            if kind == "crash":
                os._exit(7)
            if kind == "hang":
                time.sleep(3600)
            raise RuntimeError(f"injected fault in {row_id}")


def simulated_out_of_memory(row_id: str, batch: int) -> None:
    """A test hook: ``VISION_SUITE_GPU_BENCH_OOM=<row id>=<largest batch>[,...]`` raises CUDA's out-of-memory error
    for any larger batch of that row, so a CPU runs the paths that recover from it."""
    import torch

    for item in filter(None, os.environ.get("VISION_SUITE_GPU_BENCH_OOM", "").split(",")):
        target, _, largest = item.rpartition("=")
        if target == row_id and batch > int(largest):
            raise torch.cuda.OutOfMemoryError(f"simulated: batch {batch} > {largest}")


def worker(args: argparse.Namespace) -> int:
    import torch

    def emit(**event: Any) -> None:
        with open(args.events, "a") as events:
            events.write(json.dumps({"time": time.time(), **event}) + "\n")

    torch.set_float32_matmul_precision("high")
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        emit(event="fatal", reason="CUDA is not available (use --dry-run on a CPU)")
        return 2
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30 if device == "cuda" else None
    tmp = Path(tempfile.mkdtemp(prefix="gpu-bench-"))  # the reference weights' files (GBs at the paper sizes)
    try:
        return run_rows(args, Context(device, args.dry_run, None, memory, tmp), emit)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_rows(args: argparse.Namespace, ctx: Context, emit: Callable[..., None]) -> int:
    env = environment(ctx, args.peak_tflops)
    ctx.peak = env["peak_tflops"]
    emit(event="environment", environment=env)
    rows = {r.id: r for r in all_rows()}
    for row_id in args.rows:
        row = rows[row_id]
        left = args.deadline - time.time()
        if left < row.needs_s:
            emit(event="done", row=row_id, result={"status": "not measured", "reason": (
                f"time budget: {max(0, left):.0f} s left, the row needs about {row.needs_s:.0f} s")})
            continue
        emit(event="start", row=row_id)
        t = time.perf_counter()
        try:
            fault(row_id)
            result = {"status": "measured", **RUNNERS[row.kind](ctx, row)}
        except NotMeasured as e:
            result = {"status": "not measured", "reason": str(e)}
        except Exception as e:  # noqa: BLE001  (any failure costs this row only)
            lines = traceback.format_exc().strip().splitlines()
            result = {"status": "failed", "reason": f"{type(e).__name__}: {str(e)[:500]}", "traceback": lines[-12:]}
        result["seconds"] = time.perf_counter() - t
        restart = result.pop("restart_worker", False)  # a model failed: its CUDA context may be unusable
        emit(event="done", row=row_id, result=result)
        if result["status"] == "failed" or restart:
            return 3  # a CUDA error can leave the context unusable: the parent starts a fresh worker for the rest
    return 0


# --- the parent: starts workers, enforces the limits, writes the results --------------------------------------------


def package_versions() -> dict[str, str | None]:
    names = ["torch", "torchvision", "triton", "lightning", "timm", "transformers", "monai",
             "segmentation-models-pytorch", "numpy", "vision-suite"]
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def nvidia_smi() -> dict[str, str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    if not out:
        return {}
    first = [v.strip() for v in out.splitlines()[0].split(",")]
    return dict(zip(["name", "driver", "memory", "power_limit", "max_sm_clock"], first))


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def run_workers(
    args: argparse.Namespace, rows: list[Row], out: Path, deadline: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``rows`` in worker processes; a crash or a row over its time limit costs that row, a fresh worker goes on."""
    pending = [r.id for r in rows]
    limits = {r.id: r.timeout_s for r in rows}
    for item in filter(None, os.environ.get("VISION_SUITE_GPU_BENCH_ROW_TIMEOUT", "").split(",")):  # a test hook
        row_id, _, seconds = item.rpartition("=")  # <row id>=<seconds>
        limits[row_id] = float(seconds)
    results: dict[str, Any] = {}
    env: dict[str, Any] = {}
    attempt = 0
    while pending and time.time() < deadline - 1 and attempt < 12:
        attempt += 1
        events_path, log_path = out / f"worker-{attempt}.events.jsonl", out / f"worker-{attempt}.log"
        events_path.unlink(missing_ok=True)  # a previous run's, in the same folder
        command = [sys.executable, "-m", "benchmarks.gpu", "--worker", "--events", str(events_path),
                   "--deadline", str(deadline), "--rows", *pending, "--out", str(out)]
        if args.dry_run:
            command.append("--dry-run")
        if args.peak_tflops is not None:
            command += ["--peak-tflops", str(args.peak_tflops)]
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        current, started, position, started_any = None, 0.0, 0, False
        failure = None

        def read_events(events_path: Path = events_path) -> None:
            nonlocal current, started, position, started_any, env
            if not events_path.exists():
                return
            with open(events_path) as f:
                f.seek(position)
                text = f.read()
            complete = text[: text.rfind("\n") + 1]
            position += len(complete)
            for line in complete.splitlines():
                event = json.loads(line)
                if event["event"] == "environment":
                    env = event["environment"]
                elif event["event"] == "start":
                    current, started, started_any = event["row"], time.time(), True
                    print(f"[{time.strftime('%H:%M:%S')}] {current} ...", flush=True)
                elif event["event"] == "done":
                    results[event["row"]] = event["result"]
                    pending.remove(event["row"])
                    r = event["result"]
                    detail = f": {r['reason']}" if r.get("reason") else ""
                    print(f"[{time.strftime('%H:%M:%S')}] {event['row']} {r['status']}{detail}", flush=True)
                    current = None
                elif event["event"] == "fatal":  # nothing can run (no CUDA): every row says why
                    for row_id in pending:
                        results[row_id] = {"status": "not measured", "reason": event["reason"]}
                    pending.clear()

        while True:
            read_events()
            code = process.poll()
            if code is not None:
                read_events()
                break
            now = time.time()
            if current is not None and now - started > limits[current]:
                failure = ("failed", f"killed after its time limit of {limits[current]:.0f} s")
            elif now > deadline:
                failure = ("not measured", f"time budget of {args.time_limit:.0f} s ran out during the row")
            if failure:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                read_events()
                break
            time.sleep(0.2)
        if current is not None:
            status, reason = failure or ("failed", f"the worker exited with code {process.returncode} during the row; "
                                                   f"its log ends: {log_tail(log_path, 6)}")
            results[current] = {"status": status, "reason": reason, "log": str(log_path)}
            pending.remove(current)
        elif process.returncode not in (0, 3) and not started_any and failure is None:
            reason = f"the worker failed before its first row (code {process.returncode}): {log_tail(log_path)}"
            for row_id in pending:
                results[row_id] = {"status": "failed", "reason": reason}
            pending.clear()
    for row_id in pending:
        results[row_id] = {"status": "not measured",
                           "reason": f"time budget: the {args.time_limit:.0f} s limit ran out before this row"}
    return results, env


def _cell(text: str) -> str:
    """Text fit for one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _fmt(value: Any, spec: str = ".1f", suffix: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:{spec}}{suffix}"


def markdown(report: dict[str, Any]) -> str:
    env, rows = report["environment"], report["rows"]
    gpu = env.get("gpu") or "no GPU (dry run on the CPU: figures check the code paths only)"
    packages = ", ".join(f"{k} {v}" for k, v in report["packages"].items() if v)
    lines = [
        f"# GPU benchmark{' (dry run)' if report['dry_run'] else ''}",
        "",
        f"`{report['command']}` on {gpu}"
        + (f" ({_fmt(env.get('gpu_memory_gib'))} GiB, compute capability {env.get('capability')})"
           if env.get("gpu") else "")
        + f"; driver {report['nvidia_smi'].get('driver', '–')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}; "
        f"{packages}; Python {report['python']}; commit {report['commit']}; {report['date']}.",
        f"MFU against {_fmt(env.get('peak_tflops'))} TFLOP/s dense bf16 ({env.get('peak_source')}). Time limit "
        f"{report['time_limit_s']:.0f} s, used {report['elapsed_s']:.0f} s.",
        "",
        "## Speed",
        "",
        "Training step = forward + cross-entropy + backward + AdamW (fused); inference = forward under no_grad; "
        "peak = torch.cuda.max_memory_allocated with the model alone on the GPU.",
        "",
        "| row | model | batch | train samples/s | infer samples/s | vs it, train | vs it, infer | MFU train | "
        "MFU infer | peak GiB train | peak GiB infer | first step s (compile) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    others: list[str] = []
    notes: list[str] = []
    for row in rows:
        r = row["result"]
        if row["kind"] != "speed":
            continue
        if r["status"] != "measured":
            lines.append(f"| {row['id']} | {r['status']}: {_cell(r['reason'])} |" + " |" * 10)
            continue
        notes.append(f"- {row['id']}: {r['title']}" + "".join(f"; {n}" for n in r.get("notes", [])))
        base = r["baseline"]
        for m in r["models"]:
            if "error" in m:
                lines.append(f"| {row['id']} | {m['name']} | {r['batch']} | failed: {_cell(m['error'])} |" + " |" * 8)
                continue
            lines.append(
                f"| {row['id']} | {m['name']} | {r['batch']} | {_fmt(m.get('train_samples_per_s'))} | "
                f"{_fmt(m.get('infer_samples_per_s'))} | {_fmt(m.get(f'{base} vs it, train'), '.2f', 'x')} | "
                f"{_fmt(m.get(f'{base} vs it, infer'), '.2f', 'x')} | {_fmt(m.get('mfu_train'), '.0%')} | "
                f"{_fmt(m.get('mfu_infer'), '.0%')} | {_fmt(m.get('train_peak_gib'), '.2f')} | "
                f"{_fmt(m.get('infer_peak_gib'), '.2f')} | {_fmt(m.get('train_first_s'), '.0f')} / "
                f"{_fmt(m.get('infer_first_s'), '.0f')} |"
            )
    lines += ["", "\"vs it\": the row's first model (the baseline) against this one, samples/s over samples/s.", "",
              *notes, ""]
    for row in rows:
        r = row["result"]
        if row["kind"] == "speed":
            continue
        others.append(f"## {row['id']}")
        others.append("")
        if r["status"] != "measured":
            others += [f"{r['status']}: {r['reason']}", ""]
            continue
        others += [r["title"], ""]
        if row["kind"] == "outputs":
            others += ["| case | quantity | ours' error | reference's error | bound | within |",
                       "|---|---|---|---|---|---|"]
            others += [f"| {c['case']} | {c['quantity']} | {c['error']:.3g} | {c['reference_error']:.3g} | "
                       f"{c['bound']:.3g} | {'yes' if c['error'] <= c['bound'] else 'NO'} |" for c in r["checks"]]
        elif row["kind"] == "loss20":
            f32, b16 = r["final"]["32-true"], r["final"]["bf16-mixed"]
            others.append(f"Loss at step {r['steps']}: 32-true {f32:.4f}, bf16-mixed {b16:.4f} (first step "
                          f"{r['losses']['32-true'][0]:.4f}); difference {r['relative_difference']:.2%}: "
                          f"{'within' if r['pass'] else 'NOT within'} 2 %.")
        elif row["kind"] == "vitg_memory":
            failure = r["first_failure"] or f"none up to {r.get('batch_cap')}"
            others += [f"Largest batch that fits: **{r['largest_batch']}** (first failure: {failure}), "
                       f"peak {_fmt(r['peak_gib'], '.2f')} GiB of {_fmt(r['gpu_memory_gib'], '.1f')} GiB, "
                       f"{_fmt(r['step_s'], '.2f')} s per step ({_fmt(r['images_per_s'])} images/s); "
                       f"{r['parameters']:,} parameters.",
                       f"Activations: measured {_fmt(r['measured_mib_per_image'])} MiB per image (the peaks at the "
                       f"largest batch and half of it), README {r['readme_mib_per_image']:.1f} MiB; README's table "
                       f"predicts {_fmt(r['readme_predicted_gib'], '.1f')} GiB at this batch "
                       f"({r['readme_predicted_formula']}).", "", *[f"- {n}" for n in r["notes"]], "",
                       "| batch | fits | peak GiB | step s |", "|---|---|---|---|"]
            others += [f"| {t['batch']} | {'yes' if t['fits'] else 'out of memory'} | {_fmt(t['peak_gib'], '.2f')} | "
                       f"{_fmt(t['step_s'], '.2f')} |" for t in r["tries"]]
        others.append("")
    lines += others
    lines += ["## Goals (issue 24)", ""]
    if report["dry_run"]:
        lines += ["Dry run: tiny models on a CPU, so these figures say nothing about the goals.", ""]
    lines += [f"- {g}" for g in goals(rows)] + [""]
    return "\n".join(lines)


def goals(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's goals, each with the figure that decides it (or why it is missing)."""
    by_id = {r["id"]: r["result"] for r in rows}

    def model(row_id: str, name: str) -> dict[str, Any] | None:
        r = by_id.get(row_id)
        if not r or r["status"] != "measured":
            return None
        return next((m for m in r["models"] if m["name"] == name), None)

    def check(label: str, value: float | None, target: float, spec: str) -> str:
        if value is None:
            return f"{label}: not measured"
        return f"{label}: {value:{spec}} ({'met' if value >= target else 'NOT met'}, goal {target:{spec}})"

    def ratio(row_id: str, base: str, other: str, mode: str) -> float | None:
        m = model(row_id, other)
        return None if m is None else m.get(f"{base} vs it, {mode}")

    vit = model("vit_b16/bf16-mixed/compile", "ours")
    found = [
        check("ViT-B/16 training MFU, bf16-mixed, compiled", vit and vit.get("mfu_train"), 0.45, ".0%"),
        check("ViT-B/16 training vs timm, bf16-mixed, compiled", ratio("vit_b16/bf16-mixed/compile", "ours", "timm",
                                                                      "train"), 1.0, ".2f"),
        check("SegFormer-B0 training vs smp, bf16-mixed, eager", ratio("segformer_b0/bf16-mixed/eager", "ours", "smp",
                                                                       "train"), 1.2, ".2f"),
        check("UNETR-Base training vs MONAI, bf16-mixed, eager", ratio("unetr_base/bf16-mixed/eager", "ours", "monai",
                                                                       "train"), 1.2, ".2f"),
        check("DynamicViT inference vs dense, bf16-mixed, eager", ratio("dynamicvit_s/bf16-mixed/eager", "dynamicvit",
                                                                        "dense", "infer"), 1.4, ".2f"),
        check("ViT-ResNAS-S inference vs DeiT-B, bf16-mixed, eager", ratio("vit_resnas_s/bf16-mixed/eager", "ours",
                                                                           "deit", "infer"), 3.5, ".2f"),
    ]
    for task in LOSS_TASKS:
        r = by_id.get(f"loss20/{task}")
        if r and r["status"] == "measured":
            found.append(f"{task} loss after {r['steps']} steps, bf16-mixed vs 32-true: {r['relative_difference']:.2%} "
                         f"({'met' if r['pass'] else 'NOT met'}, goal within 2 %)")
        else:
            found.append(f"{task} loss after 20 steps, bf16-mixed vs 32-true: not measured")
    return found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_results.json, gpu_results.md and logs")
    parser.add_argument("--time-limit", type=float, default=480.0, help="seconds for every row together (default 480)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, TFLOP/s")
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU: check the script end to end")
    parser.add_argument("--only", nargs="+", default=None, metavar="ROW",
                        help="rows to run (patterns: vit_b16/*, loss20/*, vitg_memory ...); default all")
    parser.add_argument("--results", type=Path, default=None,
                        help="also write the table as the section '## GPU: <device>' of this Markdown file "
                             "(benchmarks/RESULTS.md)")
    parser.add_argument("--list", action="store_true", help="print the rows in their order and exit")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--events", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--rows", nargs="+", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.list:
        print("\n".join(r.id for r in all_rows()))
        return 0
    if args.peak_tflops is not None:
        peak_tflops("", args.peak_tflops)  # a bad value fails here, not in every worker
    rows = select_rows(args.only)
    out: Path = args.out.resolve()  # the workers run from the repository root
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    dry = " (dry run on the CPU)" if args.dry_run else ""
    print(f"benchmarks.gpu: {len(rows)} rows, {args.time_limit:.0f} s{dry}; "
          f"results in {out}", flush=True)
    results, env = run_workers(args, rows, out, start + args.time_limit)
    command = "python -m benchmarks.gpu " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {
        "command": command.strip(), "dry_run": args.dry_run, "date": datetime.datetime.now(datetime.timezone.utc)
        .strftime("%Y-%m-%d %H:%M UTC"), "time_limit_s": args.time_limit, "elapsed_s": time.time() - start,
        "environment": env, "nvidia_smi": {} if args.dry_run else nvidia_smi(), "packages": package_versions(),
        "python": platform.python_version(), "commit": git_commit(),
        "rows": [{"id": r.id, "kind": r.kind, "result": results[r.id]} for r in rows],
    }
    (out / "gpu_results.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (out / "gpu_results.md").write_text(text)
    print(text)
    if args.results:
        from benchmarks.harness import write_section

        body = "\n".join("##" + line if line.startswith("#") else line for line in text.splitlines()[2:])
        write_section(args.results, f"GPU: {env.get('gpu') or 'dry run on a CPU'}", body.strip() + "\n")
        print(f"written to {args.results}")
    measured = sum(r["result"]["status"] == "measured" for r in report["rows"])
    print(f"\n{measured} of {len(rows)} rows measured; {out / 'gpu_results.md'}")
    print(f"On a GPU machine: {GPU_COMMAND}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
