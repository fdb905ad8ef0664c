"""Peak memory per process of ViT training on CPU: one process, two-process DDP and two-process FSDP (FSDP2, the
``--trainer.strategy fsdp`` of the CLI), each with and without activation checkpointing, beside the analytical
breakdown (parameters, gradients, AdamW state, activations).

Each configuration runs in processes of its own (``--worker``) for a few training steps of ``ClassificationModule``
on random images through the same Lightning ``Trainer`` the CLI builds; every rank reports its RSS high-water mark
(``getrusage``) and the RSS it had after the imports, before the model was built. Memory is not distorted by load,
so a shared machine serves; a configuration is skipped when the machine has not the memory it needs free.

    python -m benchmarks.bench_memory                       # ViT-L/16, 224², batch 4 per process, 2 steps
    python -m benchmarks.bench_memory --model vit_tiny_patch16 --image-size 64 --steps 1   # smoke run
    python -m benchmarks.bench_memory --only ddp ddp+ckpt     # a subset: single, ddp, fsdp, each [+ckpt]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

from benchmarks.harness import cpu_model
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = [(1, "single"), (2, "ddp"), (2, "fsdp")]
GIB = 2**30


def rss_now() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def available_memory() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, count: int, size: int, num_classes: int) -> None:
        self.count, self.size, self.num_classes = count, size, num_classes

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        g = torch.Generator().manual_seed(i)
        return {"input": torch.randn(3, self.size, self.size, generator=g), "target": i % self.num_classes}


def build(args: argparse.Namespace, checkpointing: bool) -> torch.nn.Module:
    from tasks.classification import ClassificationModule

    return ClassificationModule(
        backbone=args.model, backbone_kwargs={"img_size": args.image_size}, num_classes=args.num_classes,
        schedule="constant", activation_checkpointing=checkpointing,
    )


def worker(args: argparse.Namespace) -> None:
    """One configuration: ``args.devices`` processes under ``args.strategy``; each rank writes its figures."""
    import lightning as L

    from engine.distributed import FullyShardedStrategy

    torch.set_num_threads(args.threads)
    baseline = rss_now()
    module = build(args, args.checkpointing)
    data = RandomImages(args.batch * args.steps * args.devices, args.image_size, args.num_classes)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, num_workers=0)
    strategy = {"single": "auto", "ddp": "ddp", "fsdp": FullyShardedStrategy()}[args.strategy]
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    out = Path(args.out) / f"rank{trainer.global_rank}.json"
    out.write_text(json.dumps({"rank": trainer.global_rank, "peak": peak, "baseline": baseline}))


def activation_bytes(args: argparse.Namespace, checkpointing: bool) -> int:
    """Bytes autograd keeps for the backward pass in one training forward pass at ``args.batch`` (distinct
    storages of the saved tensors), measured in this process."""
    module = build(args, checkpointing).train()
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = module(x).logsumexp(1).mean()
    del loss
    return sum(seen.values())


def breakdown(args: argparse.Namespace) -> dict[str, float]:
    """Analytical per-process GiB of one process (FSDP over N processes holds 1/N of the first three)."""
    with torch.device("meta"):
        module = build(args, False)
    params = sum(p.numel() for p in module.parameters())
    return {
        "params_m": params / 1e6,
        "params": 4 * params / GIB,
        "grads": 4 * params / GIB,
        "adamw": 8 * params / GIB,
        "activations": activation_bytes(args, False) / GIB,
        "activations_ckpt": activation_bytes(args, True) / GIB,
    }


def common_args(args: argparse.Namespace) -> list[str]:
    return [f"--model={args.model}", f"--image-size={args.image_size}", f"--batch={args.batch}", f"--steps={args.steps}",
            f"--threads={args.threads}", f"--num-classes={args.num_classes}"]


def in_subprocess(command: list[str], args: argparse.Namespace) -> None:
    """Run ``python -m benchmarks.bench_memory <command>`` in fresh processes, so this one stays small."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(args.threads)}
    full = [sys.executable, "-m", "benchmarks.bench_memory", *command, *common_args(args)]
    subprocess.run(full, check=True, env=env, cwd=Path(__file__).parents[1])


def run_config(args: argparse.Namespace, devices: int, strategy: str, checkpointing: bool, need: float) -> list[dict]:
    waited = 0
    while available_memory() < need * GIB and waited < args.wait:
        time.sleep(10)
        waited += 10
    if available_memory() < need * GIB:
        print(f"skipped {strategy} x{devices} ckpt={checkpointing}: {available_memory() / GIB:.1f} GiB free, "
              f"about {need:.1f} GiB needed", flush=True)
        return []
    with tempfile.TemporaryDirectory() as out:
        flags = [f"--devices={devices}", f"--strategy={strategy}", *(["--checkpointing"] if checkpointing else [])]
        try:
            in_subprocess(["--worker", f"--out={out}", *flags], args)
        except subprocess.CalledProcessError as error:  # the kernel's OOM killer on a shared machine
            print(f"failed {strategy} x{devices} ckpt={checkpointing}: {error}", flush=True)
            return []
        return [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_large_patch16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4, help="per process")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="per process")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--breakdown-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="single", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--margin", type=float, default=3.0, help="GiB left free for the rest of the machine")
    parser.add_argument("--wait", type=float, default=0, help="seconds to wait for free memory before skipping")
    parser.add_argument("--only", nargs="*", default=None, help="configurations as <strategy>[+ckpt], e.g. fsdp+ckpt")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.breakdown_only:
        torch.set_num_threads(args.threads)
        return Path(args.out).write_text(json.dumps(breakdown(args)))

    with tempfile.TemporaryDirectory() as out:
        in_subprocess(["--breakdown-only", f"--out={out}/breakdown.json"], args)
        b = json.loads(Path(out, "breakdown.json").read_text())
    state = b["params"] + b["grads"] + b["adamw"]
    print(f"{args.model} ({b['params_m']:.1f} M parameters), {args.image_size}², batch {args.batch} per process, "
          f"{args.steps} AdamW steps, fp32; {cpu_model()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / GIB:.0f} GiB, torch {torch.__version__}, "
          f"{datetime.date.today()}.\n")
    print(f"Analytical, per process: parameters {b['params']:.2f} GiB, gradients {b['grads']:.2f}, AdamW state "
          f"{b['adamw']:.2f} (sum {state:.2f}; FSDP over 2: {state / 2:.2f}); DDP adds gradient buckets "
          f"{b['grads']:.2f}; activations kept for backward {b['activations']:.2f} GiB, with checkpointing "
          f"{b['activations_ckpt']:.2f} GiB.\n")
    print("| processes | strategy | activation checkpointing | peak RSS per process, GiB | above baseline, GiB | "
          "analytical (state + activations), GiB |")
    print("|---|---|---|---|---|---|")
    for devices, strategy in CONFIGS:
        for checkpointing in (False, True):
            if args.only is not None and f"{strategy}{'+ckpt' if checkpointing else ''}" not in args.only:
                continue
            shards = devices if strategy == "fsdp" else 1
            act = b["activations_ckpt"] if checkpointing else b["activations"]
            expected = state / shards + (b["grads"] if strategy == "ddp" else 0.0) + act
            ranks = run_config(args, devices, strategy, checkpointing, need=devices * (expected + 1.0) + args.margin)
            if not ranks:
                continue
            peaks = " / ".join(f"{r['peak'] / GIB:.2f}" for r in ranks)
            above = " / ".join(f"{(r['peak'] - r['baseline']) / GIB:.2f}" for r in ranks)
            print(f"| {devices} | {strategy} | {'yes' if checkpointing else 'no'} | {peaks} | {above} | {expected:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
