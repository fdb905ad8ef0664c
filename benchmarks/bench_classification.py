"""Speed of our ViTs against timm's, training step and inference, side by side in one process.

    flock /tmp/vs-bench.lock python -m benchmarks.bench_classification --results benchmarks/RESULTS.md
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F

from benchmarks.harness import Entry, bench_parser, compare, cpu_kernels, parse_bench_args, write_section
from tasks.classification import ClassificationModule

MODELS = {"vit_small_patch16": "vit_small_patch16_224", "vit_base_patch16": "vit_base_patch16_224"}


def run(ours: str, batch: int, size: int, steps: int, warmup: int) -> str:
    torch.manual_seed(0)
    module = ClassificationModule(
        backbone=ours, backbone_kwargs={"img_size": size}, num_classes=1000, cpu_kernels=cpu_kernels()
    )
    reference = timm.create_model(MODELS[ours], img_size=size)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    entries = [Entry("ours", module, module), Entry("timm", reference, reference)]
    title = f"{ours} (1000 classes) vs timm `{MODELS[ours]}`, {size}x{size}, batch {batch}"
    return compare(entries, x, y, F.cross_entropy, steps=steps, warmup=warmup, title=title)


def main() -> None:
    parser = bench_parser(__doc__, steps=7, warmup=2)
    parser.add_argument("--models", nargs="+", default=["vit_small_patch16"], choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    args = parse_bench_args(parser)
    tables = [run(m, args.batch, args.size, args.steps, args.warmup) for m in args.models]
    body = "`python -m benchmarks.bench_classification`\n\n" + "\n\n".join(tables)
    print(body)
    if args.results:
        write_section(args.results, "Classification", body)


if __name__ == "__main__":
    main()
