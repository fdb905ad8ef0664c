"""Peak host memory of whole-volume inference on a large CT volume: MONAI's full stitching against the
region-wise stitching of ``engine/sliding_window.py``, each in a fresh process (``ru_maxrss``).

    python -m benchmarks.bench_medical_memory --results benchmarks/RESULTS.md

Modes (``--modes``):

- ``monai``: ``MedicalSegmentationModule.sliding_window(x).argmax(1)``, the whole stitched logit volume in CPU
  memory (the task's path before region-wise stitching).
- ``monai_buffered``: the same with MONAI's ``buffer_steps=1, buffer_dim=0`` (windows gathered per slab on the window
  device, then written into the same full output).
- ``regions``: ``sliding_window_labels`` as ``predict`` runs it: ``uint8`` labels only.
- ``validate``: the validation step's work: region-wise labels and the DiceCE loss summed while stitching, then
  per-class Dice and HD95 from the label volume (``volume_scores``, what each metric's update computes).
- ``model``: one forward pass of the model on ``sw_batch_size`` windows (its activations).

With ``--predictor model`` the windows run the task's model: our decoder at UNETR-Base width (feature size 16) on a
small ViT (``SW_MODEL``); a full UNETR-Base would need hundreds of 96³ windows of ~150 GFLOP each. Even so one pass
takes minutes of CPU, hours on a loaded machine, so ``--predictor oracle`` (the default) stands a cheap predictor in
for the model: logits ``-(x - c)²`` per class ``c`` of an input that holds the labels of 13 box-shaped organs, with the
model's output shape ``[n, 14, 96, 96, 96]``. That measures stitching, loss and metrics; the ``model`` mode measures
what the model's activations add on top of the interpreter; the peak of a pass with the model is at most the sum.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from typing import Any

import torch

from benchmarks.bench_medical import SW_MODEL
from benchmarks.harness import bench_parser, cpu_kernels, parse_bench_args, write_section

MODES = ("monai", "monai_buffered", "regions", "validate", "model")


def gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


class Oracle(torch.nn.Module):
    """Logits ``-(scale * x - offset - c)²`` for classes ``c = 0..num_classes-1``: the class the input encodes wins, at
    no cost (``scale=1, offset=0``: the input holds the labels)."""

    def __init__(self, num_classes: int, scale: float = 1.0, offset: float = 0.0) -> None:
        super().__init__()
        self.scale, self.offset = scale, offset
        self.register_buffer("classes", torch.arange(num_classes, dtype=torch.float32).view(1, -1, 1, 1, 1) + offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.scale - self.classes).square_().neg_()


def run_fresh(module: str, function: str, *args: Any) -> dict[str, Any]:
    """``module.function(*args)`` in a fresh interpreter, so its ``ru_maxrss`` peak is that call's alone; the JSON
    dict it returns comes back through the child's last ``RESULT`` line (``args`` must round-trip through repr)."""
    code = f"import json; from {module} import {function}; print('RESULT', json.dumps({function}(*{args!r})))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(next(line for line in reversed(out.stdout.splitlines()) if line.startswith("RESULT"))[7:])


def current_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def organ_boxes(shape: tuple[int, int, int]) -> torch.Tensor:
    """``uint8`` labels ``[1, 1, *shape]``: 13 organ-like boxes on background."""
    target = torch.zeros(1, 1, *shape, dtype=torch.uint8)
    for c in range(1, 14):
        lo = [int(s * (0.05 + 0.06 * c)) for s in shape]
        target[(0, 0, *(slice(a, a + max(s // 8, 1)) for a, s in zip(lo, shape)))] = c
    return target


def child(mode: str, shape: tuple[int, int, int], overlap: float, sw_batch_size: int, predictor: str) -> dict[str, float]:
    """One pass of ``mode`` in this (fresh) process: peak RSS before and after, seconds."""
    from monai.inferers import sliding_window_inference

    from tasks.medical import MedicalSegmentationModule
    from engine.volume_metrics import volume_scores

    torch.manual_seed(0)
    module = MedicalSegmentationModule(
        backbone="unetr_vit_base", backbone_kwargs=SW_MODEL, num_classes=14, feature_size=16,
        sw_overlap=overlap, sw_batch_size=sw_batch_size, sw_stitch_on_cpu=True, cpu_kernels=cpu_kernels(),
    ).eval()
    target = organ_boxes(shape)
    if predictor == "oracle":
        oracle = Oracle(14)
        module.forward = lambda w: oracle(w)  # the windows' predictor (a plain function: a Module would be a child)
        x = target.float()
    else:
        x = torch.rand(1, 1, *shape)
    before = gib()
    t = time.perf_counter()
    with torch.inference_mode():
        if mode == "monai":
            labels = module.sliding_window(x).argmax(1)
        elif mode == "monai_buffered":
            hp = module.hparams
            labels = sliding_window_inference(
                x, module.roi_size, hp.sw_batch_size, module, overlap=hp.sw_overlap, mode=hp.sw_mode,
                buffer_steps=1, buffer_dim=0,
            ).argmax(1)
        elif mode == "regions":
            labels = module.sliding_window_labels(x)[0]
        elif mode == "validate":
            batch = module.prepare_batch({"input": x, "target": target}, "val")
            labels = module.forward_stage(batch["input"], "val")
            loss = module.compute_loss(labels, target)
            # what each VolumeMetric's update computes (the collection shares it once its compute groups are known)
            pred, truth, spacing = module.metric_inputs(labels, target)
            dice, hd = volume_scores(pred, truth, 14, spacing)
            assert torch.isfinite(loss) and (hd >= 0).all() and (dice >= 0).all()
        elif mode == "model":
            labels = module(torch.rand(sw_batch_size, 1, *module.roi_size)).argmax(1)
        else:
            raise ValueError(f"unknown mode {mode}; choose from {MODES}")
    if predictor == "oracle" and mode != "model":
        assert torch.equal(labels.reshape(target.shape).byte(), target), "the oracle's labels must come back"
    return {"peak_gib": gib(), "before_gib": before, "seconds": time.perf_counter() - t, "voxels": labels.numel()}


def run_child(mode: str, shape: tuple[int, int, int], overlap: float, sw_batch_size: int, predictor: str) -> dict[str, float]:
    return run_fresh("benchmarks.bench_medical_memory", "child", mode, tuple(shape), overlap, sw_batch_size, predictor)


def main() -> None:
    parser = bench_parser(__doc__, steps=1, warmup=0)
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 200])
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--predictor", choices=("oracle", "model"), default="oracle")
    args = parse_bench_args(parser)
    shape = tuple(args.shape)
    logits_gib = 14 * torch.Size(shape).numel() * 4 / 2**30
    rows = ["| mode | predictor | peak RSS GiB | before the pass GiB | seconds |", "|---|---|---|---|---|"]
    for mode in args.modes:
        predictor = "model" if mode == "model" else args.predictor
        r = run_child(mode, shape, args.overlap, args.sw_batch_size, predictor)
        rows.append(f"| {mode} | {predictor} | **{r['peak_gib']:.2f}** | {r['before_gib']:.2f} | {r['seconds']:.0f} |")
        print(rows[-1], flush=True)
    body = "\n".join([
        "`python -m benchmarks.bench_medical_memory`",
        "",
        (
            f"Whole-volume inference, {'x'.join(map(str, shape))} volume, 14 classes, 96³ windows, overlap "
            f"{args.overlap}, Gaussian blending, {args.sw_batch_size} windows per pass, stitched in CPU memory (the "
            f"full fp32 logits alone: {logits_gib:.2f} GiB); peak RSS of a fresh process (interpreter, model and "
            f"input included); predictor `{args.predictor}` (see the script's docstring), `model`: one forward pass of "
            f"our decoder at UNETR-Base width (feature size 16) on a small ViT ({SW_MODEL['embed_dim']} wide, "
            f"{SW_MODEL['depth']} blocks) on {args.sw_batch_size} windows; {torch.get_num_threads()} thread(s)."
        ),
        "",
        *rows,
    ])
    print(body)
    if args.results:
        write_section(args.results, "Medical: whole-volume inference memory", body)


if __name__ == "__main__":
    main()
