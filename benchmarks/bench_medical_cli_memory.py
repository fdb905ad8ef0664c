"""Peak host memory of ``python -m tasks.medical validate|predict --config configs/unetr_btcv.yaml`` (UNETR-Base, the
BTCV recipe's windows: 96³, overlap 0.5, Gaussian) on one 512x512x200 CT volume with 14 classes, each in a fresh
process (``ru_maxrss``): the whole path a user runs (CLI, data module, cache, batch, stitching, loss, Dice/HD95,
writing the NIfTI), not only the stitching of ``bench_medical_memory.py``.

    python -m benchmarks.bench_medical_cli_memory                      # oracle passes, then real-model passes
    python -m benchmarks.bench_medical_cli_memory --real all           # the real model on every window (hours)

UNETR-Base takes seconds per 96³ window on a CPU and the volume has 400 of them, so by default the real model runs
on some window batches only (``HybridPredictor``): a first run with the oracle alone records the process's RSS as
each batch starts (the stitching state then alive); a second run runs the real model's forward on the ``--top``
batches where that state was largest, and the first one, its output dropped for the oracle's logits. The peak of a
pass is the largest stitching state plus the model's activations, and the model's activations are the same on every
batch (same shapes), so the second run's peak is the pass's peak; labels are checked against the volume's (the
written NIfTI for ``predict``, the metric's input for ``validate``). ``--data.num_workers 0`` by default: all in one
process, so one ``ru_maxrss`` counts everything once (with loader workers the main process receives the volume
through shared memory, and the worker holds the preprocessing).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_medical_memory import Oracle, current_gib, gib, organ_boxes, run_fresh
from benchmarks.harness import bench_parser, cpu_kernels, parse_bench_args


class HybridPredictor:
    """The windows' predictor of a pass measured with the real model on some window batches only: on the batches in
    ``real`` (all with ``real=None``) the model's forward runs (its activations come and go as in a real pass) and its
    output is dropped; every batch returns the oracle's logits, so the labels stay checkable and organ-shaped, as a
    trained model's would be. Records the process's current RSS as each batch starts (the stitching state)."""

    def __init__(self, model_forward: Callable[[torch.Tensor], torch.Tensor], oracle: Oracle, real: set[int] | None) -> None:
        self.model_forward, self.oracle, self.real = model_forward, oracle, real
        self.rss: list[float] = []
        self.real_seconds = 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.rss.append(current_gib())
        if self.real is None or len(self.rss) - 1 in self.real:
            t = time.perf_counter()
            del_me = self.model_forward(x)
            del del_me
            self.real_seconds += time.perf_counter() - t
        return self.oracle(x)



def write_volume_folder(shape: tuple[int, int, int]) -> Path:
    """A Decathlon folder (cached under /tmp) with one CT case of ``shape`` at the recipe's 1.5 x 1.5 x 2 mm grid (so
    resampling keeps its size) whose HU encode its labels inside the recipe's window: listed for validation and as a
    test image. After windowing to [0, 1] the input is ``(label + 0.5) / 14`` (read back by ``CT_ORACLE``)."""
    import numpy as np

    from datamodules.synthetic_volumes import write_case

    root = Path(tempfile.gettempdir()) / f"vs_memory_volume_{'x'.join(map(str, shape))}"
    if (root / "dataset.json").is_file():
        return root
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    labels = organ_boxes(shape)[0, 0].numpy()
    hu = np.round(-175.0 + 425.0 * (labels.astype(np.float32) + 0.5) / 14).astype(np.int16)
    write_case(root / "imagesTr" / "case.nii.gz", hu, (1.5, 1.5, 2.0), lps=False, label=False)
    write_case(root / "labelsTr" / "case.nii.gz", labels, (1.5, 1.5, 2.0), lps=False, label=True)
    pair = {"image": "./imagesTr/case.nii.gz", "label": "./labelsTr/case.nii.gz"}
    meta = {"labels": {str(c): f"organ{c}" for c in range(14)}, "modality": {"0": "CT"}, "training": [pair],
            "validation": [pair], "test": [pair["image"]]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


CT_ORACLE = {"scale": 14.0, "offset": 0.5}


def cli_child(stage: str, shape: tuple[int, int, int], real: list[int] | None, extra: list[str]) -> dict[str, Any]:
    """``python -m tasks.medical <stage> --config configs/unetr_btcv.yaml`` (UNETR-Base, its recipe's windows) on the
    volume of ``write_volume_folder`` in this process, windows predicted by ``HybridPredictor``; labels checked."""
    import nibabel as nib

    from tasks import medical

    root, out = write_volume_folder(shape), Path(tempfile.mkdtemp())
    hybrid = HybridPredictor(lambda x: x, Oracle(14, **CT_ORACLE), None if real is None else set(real))
    forward, metric_inputs, checked = medical.MedicalSegmentationModule.forward, medical.MedicalSegmentationModule.metric_inputs, []

    def patched_forward(module: Any, x: torch.Tensor) -> torch.Tensor:
        hybrid.model_forward = lambda w: forward(module, w)
        return hybrid(x)

    def checked_metric_inputs(module: Any, output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = metric_inputs(module, output, target)
        checked.append(torch.equal(inputs[0].reshape(inputs[1].shape), inputs[1].to(inputs[0].dtype)))
        return inputs

    medical.MedicalSegmentationModule.forward = patched_forward
    medical.MedicalSegmentationModule.metric_inputs = checked_metric_inputs
    before = gib()
    t = time.perf_counter()
    medical.main([
        stage, "--config", "configs/unetr_btcv.yaml", "--data.root", str(root), "--data.fold", "null",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(out),
        "--predictions.output_dir", str(out / "predictions"), "--model.cpu_kernels", cpu_kernels(), *extra,
    ])
    seconds = time.perf_counter() - t
    if stage == "predict":
        written = nib.load(out / "predictions" / "case.nii.gz").get_fdata(dtype="float32")
        checked.append(bool((torch.from_numpy(written).byte() == organ_boxes(shape)[0, 0]).all()))
    assert checked and all(checked), "the oracle's labels must come back"
    peak = max(hybrid.rss)
    return {
        "peak_gib": gib(), "before_gib": before, "seconds": seconds, "passes": len(hybrid.rss),
        "real_passes": sorted(hybrid.real) if hybrid.real is not None else "all", "real_seconds": hybrid.real_seconds,
        "top_passes": sorted(range(len(hybrid.rss)), key=lambda i: -hybrid.rss[i])[:8], "max_pass_rss_gib": peak,
    }


def run_child(stage: str, shape: tuple[int, ...], real: list[int] | None, extra: list[str]) -> dict[str, Any]:
    return run_fresh("benchmarks.bench_medical_cli_memory", "cli_child", stage, tuple(shape), real, extra)


def window_throughput(steps: int, sizes: tuple[int, ...] = (1, 2, 4)) -> list[str]:
    """UNETR-Base inference seconds per 96³ window at ``sizes`` windows per pass, interleaved, medians of ``steps``:
    wall clock and this process's CPU time (less distorted by a loaded machine)."""
    import statistics

    from tasks.medical import MedicalSegmentationModule

    torch.manual_seed(0)
    module = MedicalSegmentationModule(
        backbone="unetr_vit_base", backbone_kwargs={"img_size": 96}, num_classes=14, feature_size=16,
        cpu_kernels=cpu_kernels(),
    ).eval()
    wall: dict[int, list[float]] = {n: [] for n in sizes}
    cpu: dict[int, list[float]] = {n: [] for n in sizes}
    with torch.inference_mode():
        module(torch.rand(1, 1, 96, 96, 96))
        for _ in range(steps):
            for n in sizes:
                x = torch.rand(n, 1, 96, 96, 96)
                t, c = time.perf_counter(), time.process_time()
                module(x)
                wall[n].append((time.perf_counter() - t) / n)
                cpu[n].append((time.process_time() - c) / n)
    base = statistics.median(wall[sizes[0]])
    rows = ["| windows per pass | s per window (wall) | CPU s per window | windows/s vs 1 per pass |", "|---|---|---|---|"]
    for n in sizes:
        w, c = statistics.median(wall[n]), statistics.median(cpu[n])
        rows.append(f"| {n} | {w:.2f} | {c:.2f} | {base / w:.2f}x |")
    return rows


def main() -> None:
    parser = bench_parser(__doc__, steps=1, warmup=0)
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 200])
    parser.add_argument("--stages", nargs="+", choices=("validate", "predict"), default=["validate", "predict"])
    parser.add_argument("--real", choices=("top", "all", "none"), default="top")
    parser.add_argument("--top", type=int, default=3, help="window batches run by the real model (--real top)")
    parser.add_argument("cli_args", nargs="*", help="more CLI options after --, e.g. -- --model.sw_batch_size 4")
    parser.add_argument("--throughput", action="store_true", help="time 1/2/4 windows per pass instead (--steps each)")
    args = parse_bench_args(parser)
    if args.throughput:
        print(f"UNETR-Base, {torch.get_num_threads()} thread(s)", *window_throughput(args.steps), sep="\n")
        return
    shape, extra = tuple(args.shape), ["--data.num_workers", "0", *args.cli_args]
    rows = ["| stage | options | real-model window batches | peak RSS GiB | before GiB | seconds |", "|---|---|---|---|---|---|"]
    for stage in args.stages:
        runs = []
        if args.real in ("top", "none"):
            runs.append(run_child(stage, shape, [], extra))
        if args.real == "top":
            runs.append(run_child(stage, shape, sorted({0, *runs[0]["top_passes"][: args.top]}), extra))
        if args.real == "all":
            runs.append(run_child(stage, shape, None, extra))
        for r in runs:
            real = r["real_passes"] if r["real_passes"] == "all" else f"{len(r['real_passes'])} of {r['passes']}"
            rows.append(
                f"| {stage} | {' '.join(args.cli_args) or 'defaults'} | {real} | **{r['peak_gib']:.2f}** | "
                f"{r['before_gib']:.2f} | {r['seconds']:.0f} |"
            )
            print(rows[-1], json.dumps(r), flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
