"""Speed of DynamicViT token pruning: the pruned ViT-S/16 (rho 0.7 before blocks 3, 6, 9) against the dense one, ours
and timm's, side by side in one process. Inference gathers the kept tokens (197 -> 138 -> 97 -> 68); training runs
the masked forward (every token kept, decisions as an attention policy), so it costs at least the dense step.

    flock /tmp/vs-bench.lock python -m benchmarks.bench_token_pruning --results benchmarks/RESULTS.md
    ... --video   (also TimeSformer-B, 8x224², batch 1, divided and joint attention: pruned vs dense; slow on a CPU)

With divided attention every block is linear in the token count, so pruning saves at most its token fraction
(about 35 %); with joint attention the space-time attention over 8x197 tokens is quadratic and falls faster.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F

from benchmarks.harness import Entry, bench_parser, compare, cpu_kernels, parse_bench_args, write_section
from tasks.classification import ClassificationModule
from tasks.video import VideoClassificationModule

PRUNED = "dynamicvit"


def run_image(batch: int, size: int, keep_ratio: float, steps: int, warmup: int) -> str:
    torch.manual_seed(0)
    kwargs = {"backbone": "vit_small_patch16", "backbone_kwargs": {"img_size": size}, "num_classes": 1000,
              "cpu_kernels": cpu_kernels()}
    pruned = ClassificationModule(**kwargs, token_pruning=True, keep_ratio=keep_ratio)
    dense = ClassificationModule(**kwargs)
    dense.load_state_dict({k: v for k, v in pruned.state_dict().items() if ".predictors." not in k})
    reference = timm.create_model("vit_small_patch16_224", img_size=size)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    entries = [Entry(PRUNED, pruned, pruned), Entry("ours", dense, dense), Entry("timm", reference, reference)]
    title = (f"vit_small_patch16 with token pruning (rho {keep_ratio}, blocks 3/6/9) vs ours dense and timm "
             f"`vit_small_patch16_224`, {size}x{size}, batch {batch}")
    return compare(entries, x, y, F.cross_entropy, steps=steps, warmup=warmup, title=title, baseline=PRUNED)


def run_video(keep_ratio: float, steps: int, warmup: int, attention: str) -> str:
    torch.manual_seed(0)
    kwargs = {"backbone": "timesformer_base_patch16", "backbone_kwargs": {"attention": attention}, "num_classes": 400,
              "cpu_kernels": cpu_kernels()}
    pruned = VideoClassificationModule(**kwargs, token_pruning=True, keep_ratio=keep_ratio)
    dense = VideoClassificationModule(**kwargs)
    dense.load_state_dict({k: v for k, v in pruned.state_dict().items() if ".predictors." not in k})
    x, y = torch.randn(1, 3, 8, 224, 224), torch.randint(0, 400, (1,))
    entries = [Entry(PRUNED, pruned, pruned), Entry("ours", dense, dense)]
    units = "whole positions across frames" if attention == "divided" else "all 8x196 tokens"
    title = (f"timesformer_base_patch16 ({attention} attention) with token pruning (rho {keep_ratio}, {units}) vs dense, "
             "8x224x224, batch 1")
    return compare(entries, x, y, F.cross_entropy, steps=steps, warmup=warmup, title=title, baseline=PRUNED)


def main() -> None:
    parser = bench_parser(__doc__, steps=5, warmup=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--keep_ratio", type=float, default=0.7)
    parser.add_argument("--video", action="store_true", help="also time TimeSformer-B with and without pruning")
    parser.add_argument("--note", default="", help="a sentence on the machine's state, written above the tables")
    args = parse_bench_args(parser)
    tables = [run_image(args.batch, args.size, args.keep_ratio, args.steps, args.warmup)]
    if args.video:
        tables += [run_video(args.keep_ratio, args.steps, args.warmup, attention) for attention in ("divided", "joint")]
    body = "`python -m benchmarks.bench_token_pruning`\n\n" + (f"{args.note}\n\n" if args.note else "") + "\n\n".join(tables)
    print(body)
    if args.results:
        write_section(args.results, "Token pruning (DynamicViT)", body)


if __name__ == "__main__":
    main()
