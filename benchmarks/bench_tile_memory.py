"""Peak host memory of ``predict`` with sliding windows on a very large 2-D image (a 10 000 x 10 000 remote-sensing
tile): ``SegmentationModule.predict_step`` with ``inference: slide`` stitches region by region (``engine/sliding_window.py``),
so only the window grid's pending band of logits is alive, never the ``[num_classes, H, W]`` logits (60 GB at 150
classes). Each run in a fresh process (``ru_maxrss``).

    python -m benchmarks.bench_tile_memory --size 10000 --classes 150 19

SegFormer-B0 (``mit_b0``, 512² windows every 341 pixels, one window per pass, the task's defaults) takes about a second
per window and the tile has 900, so the real model runs on some window batches only, as in
``bench_medical_cli_memory.py``: a first run with an oracle (logits that read the class off the input) records the RSS
at each batch; a second runs the real model's forward on the batches where that was largest (and the first), its
output dropped for the oracle's. Labels are checked against those the input encodes.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch

from benchmarks.bench_medical_cli_memory import HybridPredictor
from benchmarks.bench_medical_memory import gib, run_fresh
from benchmarks.harness import bench_parser, cpu_kernels, parse_bench_args


class TileOracle(torch.nn.Module):
    """Logits ``-(x[:, 0] - c)²`` for classes ``c``: the class written in the first channel wins, at no cost."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("classes", torch.arange(num_classes, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, :1] - self.classes).square_().neg_()


def tile_truth(size: int, num_classes: int, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of the tile's labels: blocks of 700 x 900 pixels cycling through the classes."""
    rows = torch.arange(start, min(stop, size))[:, None]
    return (rows // 700 * 7 + torch.arange(size)[None] // 900) % num_classes


def tile_child(size: int, num_classes: int, real: list[int] | None, sw_batch_size: int) -> dict[str, Any]:
    """One ``predict_step`` over a ``size``² RGB tile whose first channel holds block-shaped class labels."""
    from tasks.segmentation import SegmentationModule

    torch.manual_seed(0)
    module = SegmentationModule(
        backbone="mit_b0", num_classes=num_classes, inference="slide", sw_batch_size=sw_batch_size,
        cpu_kernels=cpu_kernels(),
    ).eval()
    x = torch.rand(1, 3, size, size)
    for r in range(0, size, 1000):  # in bands: no full-size temporary raises the peak before the pass
        x[0, 0, r : r + 1000] = tile_truth(size, num_classes, r, r + 1000)
    hybrid = HybridPredictor(module.forward, TileOracle(num_classes), None if real is None else set(real))
    module.forward = hybrid  # the windows' predictor; the real forward stays reachable through ``hybrid``
    batch = {"input": x, "index": torch.tensor([0]), "path": ["tile.tif"], "name": ["tile"], "size": torch.tensor([[size, size]])}
    before = gib()
    t = time.perf_counter()
    with torch.inference_mode():
        label = module.predict_step(batch, 0)[0]["label"]
    seconds, peak = time.perf_counter() - t, gib()
    assert label.dtype.name == "uint8" and all(
        torch.equal(torch.from_numpy(label[r : r + 1000]).long(), tile_truth(size, num_classes, r, r + 1000))
        for r in range(0, size, 1000)
    ), "the oracle's labels must come back"
    return {
        "peak_gib": peak, "before_gib": before, "seconds": seconds, "passes": len(hybrid.rss),
        "real_passes": sorted(hybrid.real) if hybrid.real is not None else "all", "real_seconds": hybrid.real_seconds,
        "top_passes": sorted(range(len(hybrid.rss)), key=lambda i: -hybrid.rss[i])[:8],
    }


def run_child(size: int, num_classes: int, real: list[int] | None, sw_batch_size: int) -> dict[str, Any]:
    return run_fresh("benchmarks.bench_tile_memory", "tile_child", size, num_classes, real, sw_batch_size)


def main() -> None:
    parser = bench_parser(__doc__, steps=1, warmup=0)
    parser.add_argument("--size", type=int, default=10000)
    parser.add_argument("--classes", type=int, nargs="+", default=[150, 19])
    parser.add_argument("--sw-batch-size", type=int, default=1)
    parser.add_argument("--top", type=int, default=3, help="window batches run by the real model")
    args = parse_bench_args(parser)
    logits = args.size**2 * 4 / 2**30
    rows = [
        "| classes | full logits GiB | real-model window batches | peak RSS GiB | before GiB (input, model) | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for classes in args.classes:
        first = run_child(args.size, classes, [], args.sw_batch_size)
        second = run_child(args.size, classes, sorted({0, *first["top_passes"][: args.top]}), args.sw_batch_size)
        for r in (first, second):
            rows.append(
                f"| {classes} | {classes * logits:.1f} | {len(r['real_passes'])} of {r['passes']} | **{r['peak_gib']:.2f}** | "
                f"{r['before_gib']:.2f} | {r['seconds']:.0f} |"
            )
            print(rows[-1], json.dumps(r), flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
