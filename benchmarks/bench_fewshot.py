"""Few-shot feature extraction (``engine.fewshot.extract_features``) against plain inference: the same model, the
same batches, the same batch size, timed interleaved in one process. Extraction must keep up (goal >= 0.95x).

Plain inference is a forward pass per batch under ``torch.inference_mode``; extraction is what the CLI and the
``FewShotEvaluator`` callback run: a forward pass per batch under ``no_grad`` with the pre-logits hook, the
features and labels kept on the device, concatenated and copied to the CPU once at the end. The batches are in
memory (pinned on a GPU), so the comparison is of the hot path, not of image decoding.

    flock /tmp/vs-bench.lock python -m benchmarks.bench_fewshot --results benchmarks/RESULTS.md
    python -m benchmarks.bench_fewshot --device cuda --backbone vit_base_patch16 --batch 256 --batches 20  # a GPU
"""

from __future__ import annotations

import datetime
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.harness import cpu_model, bench_parser, cpu_kernels, parse_bench_args, write_section
from tasks.classification import ClassificationModule
from engine.fewshot import extract_features


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def run(backbone: str, size: int, batch: int, batches: int, steps: int, warmup: int, device: torch.device, amp: bool) -> str:
    torch.manual_seed(0)
    module = ClassificationModule(
        backbone=backbone, backbone_kwargs={"img_size": size}, num_classes=1000, pool="avg", cpu_kernels=cpu_kernels()
    )
    module = module.to(device).eval()
    pin = device.type == "cuda"
    data = [{"input": torch.randn(batch, 3, size, size), "target": torch.randint(0, 1000, (batch,))} for _ in range(batches)]
    if pin:
        data = [{k: v.pin_memory() for k, v in b.items()} for b in data]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    def plain() -> None:
        with torch.inference_mode(), autocast:
            for b in data:
                module(b["input"].to(device, non_blocking=True))

    def extract() -> None:
        with autocast:
            feats, labels = extract_features(module, data)
        feats.cpu(), labels.cpu()

    times: dict[str, list[float]] = {"inference": [], "extraction": []}
    for step in range(warmup + steps):
        order = [("inference", plain), ("extraction", extract)]
        for name, fn in order if step % 2 else order[::-1]:  # each goes first as often
            seconds = timed(fn, device)
            if step >= warmup:
                times[name].append(seconds)
    rate = {k: batch * batches / statistics.median(v) for k, v in times.items()}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_model()}, {torch.get_num_threads()} thread(s)"
    return "\n".join([
        (f"{backbone} at {size}x{size}, batch {batch} x {batches} batches per pass, {'bf16 autocast' if amp else 'fp32'}; "
        f"median of {steps} interleaved passes after {warmup} warm-up; {where}, torch {torch.__version__}, {datetime.date.today()}."),
        "",
        "| path | images/s | vs plain inference |",
        "|---|---|---|",
        f"| plain inference (forward, inference_mode) | {rate['inference']:.1f} | 1.00x |",
        f"| few-shot feature extraction | {rate['extraction']:.1f} | {rate['extraction'] / rate['inference']:.3f}x |",
    ])


def main() -> None:
    parser = bench_parser(__doc__, steps=7, warmup=2)
    parser.add_argument("--backbone", default="vit_small_patch16")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4, help="batches per timed pass")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for both paths")
    args = parse_bench_args(parser)
    table = run(args.backbone, args.size, args.batch, args.batches, args.steps, args.warmup, torch.device(args.device), args.amp)
    body = "`python -m benchmarks.bench_fewshot`\n\n" + table
    print(body)
    if args.results:
        write_section(args.results, "Few-shot feature extraction", body)


if __name__ == "__main__":
    main()
