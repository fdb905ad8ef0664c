"""What ``--model.compile true`` gives per task on this machine: each task's module eager against the same module
compiled (``torch.compile``, inductor by default), same weights, timed interleaved in one process
(``benchmarks/harness.py``), plus the time the first compiled steps take.

    flock /tmp/vs-bench.lock python -m benchmarks.bench_compile --results benchmarks/RESULTS.md

``--tiny`` runs every task at toy sizes (a smoke test of the script, not a measurement).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from benchmarks.harness import Entry, bench_parser, compare, cpu_kernels, parse_bench_args, write_section
from tasks.classification import ClassificationModule
from tasks.medical import MedicalSegmentationModule
from tasks.module import TaskModule
from tasks.segmentation import SegmentationModule
from tasks.video import VideoClassificationModule

# task -> (module class, its arguments, input shape, number of classes); the paper models at CPU-friendly batches
TASKS: dict[str, tuple[type[TaskModule], dict[str, Any], tuple[int, ...], int]] = {
    "classification": (ClassificationModule, {"backbone": "vit_small_patch16"}, (8, 3, 224, 224), 1000),
    "video": (VideoClassificationModule, {"backbone": "timesformer_base_patch16"}, (1, 3, 8, 224, 224), 400),
    "segmentation": (SegmentationModule, {"backbone": "mit_b0"}, (2, 3, 512, 512), 19),
    "medical": (MedicalSegmentationModule, {"backbone": "unetr_vit_base"}, (1, 1, 96, 96, 96), 14),
}
TINY: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    "classification": ({"backbone": "vit_tiny_patch16", "backbone_kwargs": {"img_size": 32, "depth": 2}}, (2, 3, 32, 32)),
    "video": (
        {"backbone": "timesformer_nano_patch8", "backbone_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "num_frames": 2}},
        (1, 3, 2, 32, 32),
    ),
    "segmentation": ({"backbone": "mit_b0"}, (1, 3, 64, 64)),
    "medical": (
        {"backbone": "unetr_vit_base", "feature_size": 8,
         "backbone_kwargs": {"img_size": 32, "embed_dim": 96, "depth": 4, "num_heads": 2, "out_indices": [0, 1, 2, 3]}},
        (1, 1, 32, 32, 32),
    ),
}


def loss_and_target(task: str, shape: tuple[int, ...], classes: int) -> tuple[Any, torch.Tensor]:
    if task in ("classification", "video"):
        return F.cross_entropy, torch.randint(0, classes, (shape[0],))
    if task == "segmentation":
        return F.cross_entropy, torch.randint(0, classes, (shape[0], *shape[2:]))
    return DiceCELoss(to_onehot_y=True, softmax=True), torch.randint(0, classes, (shape[0], 1, *shape[2:]))


def run(task: str, *, tiny: bool, steps: int, warmup: int, options: dict[str, Any]) -> str:
    cls, kwargs, shape, classes = TASKS[task]
    if tiny:
        kwargs, shape = TINY[task]
    torch.manual_seed(0)
    eager = cls(**kwargs, num_classes=classes, cpu_kernels=cpu_kernels())
    compiled = cls(**kwargs, num_classes=classes, compile=True, compile_options=options)  # plain PyTorch, compiled
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(shape)
    loss, y = loss_and_target(task, shape, classes)
    first = {}
    for mode in ("train", "infer"):  # the compilations, timed apart from the steady state
        t = time.perf_counter()
        if mode == "train":
            compiled.train()
            loss(compiled(x), y).backward()
            compiled.zero_grad(set_to_none=True)
        else:
            compiled.eval()
            with torch.inference_mode():
                compiled(x)
        first[mode] = time.perf_counter() - t
    title = f"{task}: `{kwargs['backbone']}` eager vs `--model.compile true` ({options or 'inductor'}), input {list(shape)}"
    table = compare(
        [Entry("compiled", compiled, compiled), Entry("eager", eager, eager)], x, y, loss, steps=steps, warmup=warmup,
        title=title, baseline="compiled",
    )
    return f"{table}\n\nFirst compiled steps (compilation included): train {first['train']:.0f} s, inference {first['infer']:.0f} s."


def main() -> None:
    parser = bench_parser(__doc__, steps=5, warmup=1)
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--tiny", action="store_true", help="toy sizes: check the script runs")
    parser.add_argument("--mode", default=None, help="torch.compile mode (default, reduce-overhead, max-autotune)")
    args = parse_bench_args(parser)
    options = {"mode": args.mode} if args.mode else {}
    parts = ["`python -m benchmarks.bench_compile`"]
    for task in args.tasks:
        parts.append(run(task, tiny=args.tiny, steps=args.steps, warmup=args.warmup, options=options))
        print(parts[-1], flush=True)
    if args.results and not args.tiny:
        write_section(args.results, "Compilation (--model.compile)", "\n\n".join(parts))


if __name__ == "__main__":
    main()
