"""Speed of our EfficientFormerV2 against timm's: the fused inference form, and the training step, side by side.

    flock /tmp/vs-bench.lock python -m benchmarks.bench_efficientformer_v2 --results benchmarks/RESULTS.md

Inference compares our fused network (``backbone.fuse()``), our unfused one and timm's, interleaved, under
``torch.inference_mode``; training (and unfused inference) goes through ``harness.compare``. All with the
1000-class classifier and its distillation twin, which both models have.
"""

from __future__ import annotations

import copy
import datetime
import statistics
import time

import timm
import torch
import torch.nn.functional as F

from benchmarks.harness import cpu_model, Entry, bench_parser, compare, cpu_kernels, parse_bench_args, write_section
from tasks.classification import ClassificationModule

MODELS = ("efficientformerv2_s0", "efficientformerv2_s1", "efficientformerv2_s2", "efficientformerv2_l")


def time_inference(entries: list[Entry], x: torch.Tensor, *, steps: int, warmup: int) -> dict[str, float]:
    """Samples/s of each entry's forward pass (median), interleaved, each going first as often."""
    times: dict[str, list[float]] = {e.name: [] for e in entries}
    for step in range(warmup + steps):
        for e in entries if step % 2 else entries[::-1]:
            t = time.perf_counter()
            with torch.inference_mode():
                e.forward(x)
            if step >= warmup:
                times[e.name].append(time.perf_counter() - t)
    return {name: x.shape[0] / statistics.median(t) for name, t in times.items()}


def time_blocked(entries: list[Entry], x: torch.Tensor, *, steps: int, warmup: int, rounds: int = 2) -> dict[str, float]:
    """Samples/s of each entry's forward pass (median of the rounds' medians), each model run alone for ``steps``
    passes in turn, ``rounds`` times: how a user runs one model. Pass-by-pass interleaving of models with other
    memory layouts (the fused one is channels-last) makes each pay the other's cache and oneDNN-primitive misses,
    which moved the same model's rate by up to 2x between a two- and a three-model loop on this CPU."""
    rates: dict[str, list[float]] = {e.name: [] for e in entries}
    with torch.inference_mode():
        for _ in range(rounds):
            for e in entries:
                for _ in range(warmup):
                    e.forward(x)
                times = []
                for _ in range(steps):
                    t = time.perf_counter()
                    e.forward(x)
                    times.append(time.perf_counter() - t)
                rates[e.name].append(x.shape[0] / statistics.median(times))
    return {name: statistics.median(r) for name, r in rates.items()}


def run(name: str, batch: int, size: int, steps: int, warmup: int) -> tuple[str, str]:
    torch.manual_seed(0)
    module = ClassificationModule(
        backbone=name, backbone_kwargs={"img_size": size}, num_classes=1000, cpu_kernels=cpu_kernels()
    )
    reference = timm.create_model(name, img_size=size)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    fused = copy.deepcopy(module).eval()
    fused.backbone.fuse()
    reference.eval()
    module.eval()
    with torch.inference_mode():  # the fused form is the same function
        diff = (fused(x) - module(x)).abs().max().item()
    rates = time_blocked(
        [Entry("ours fused", fused, fused), Entry("ours", module, module), Entry("timm", reference, reference)],
        x, steps=steps, warmup=warmup,
    )
    row = (
        f"| {name} | {rates['ours fused']:.1f} | {rates['ours']:.1f} | {rates['timm']:.1f} | "
        f"{rates['ours fused'] / rates['timm']:.2f}x | {rates['ours'] / rates['timm']:.2f}x | {diff:.1e} |"
    )
    title = f"{name} (1000 classes, unfused) vs timm `{name}`, {size}x{size}, batch {batch}"
    table = compare([Entry("ours", module, module), Entry("timm", reference, reference)], x, y, F.cross_entropy,
                    steps=steps, warmup=warmup, title=title)
    return row, table


def main() -> None:
    parser = bench_parser(__doc__, steps=7, warmup=2)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--note", default="", help="a line about the machine's state, printed under the heading")
    args = parse_bench_args(parser)
    results = [run(m, args.batch, args.size, args.steps, args.warmup) for m in args.models]
    header = (
        f"Inference, {args.size}x{args.size}, batch {args.batch}; fp32, {torch.get_num_threads()} thread(s), each model "
        f"alone for {args.steps} passes after {args.warmup} warm-up, in turn, twice (median); {cpu_model()}, "
        f"torch {torch.__version__}, {datetime.date.today()}.\n\n"
        "| model | ours fused samples/s | ours samples/s | timm samples/s | fused vs timm | unfused vs timm | "
        "max abs diff fused vs unfused (logits) |\n|---|---|---|---|---|---|---|"
    )
    body = "`python -m benchmarks.bench_efficientformer_v2`\n\n" + (f"{args.note}\n\n" if args.note else "")
    body += header + "\n" + "\n".join(r for r, _ in results) + "\n\nTraining step (and unfused inference):\n\n"
    body += "\n\n".join(t for _, t in results)
    print(body)
    if args.results:
        write_section(args.results, "EfficientFormerV2", body)


if __name__ == "__main__":
    main()
