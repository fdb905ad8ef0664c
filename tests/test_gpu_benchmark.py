"""``python -m benchmarks.gpu``: the peak table and MFU, the choice of rows, and its CPU dry run end to end (tiny
models through the same code paths; a worker that crashes in a row costs that row only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu

REPO = Path(__file__).parents[1]


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989.4),  # SXM
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.4),
    ("NVIDIA GH200 480GB", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", 362.1),
])
def test_the_dense_bf16_peak_is_read_from_the_device_name(name: str, peak: float) -> None:
    assert gpu.peak_tflops(name) == (peak, gpu.peak_tflops(name)[1])
    assert gpu.peak_tflops(name)[0] == peak


def test_an_unknown_gpu_has_no_peak_unless_one_is_given() -> None:
    value, why = gpu.peak_tflops("NVIDIA GeForce RTX 4090")
    assert value is None and "--peak-tflops" in why
    assert gpu.peak_tflops("NVIDIA GeForce RTX 4090", 165.2) == (165.2, "--peak-tflops")
    assert gpu.peak_tflops("NVIDIA H100 PCIe", 500.0)[0] == 500.0  # the option wins over the table
    with pytest.raises(ValueError, match="--peak-tflops"):
        gpu.peak_tflops("NVIDIA L4", 0.0)


def test_mfu_is_achieved_flops_over_the_peak() -> None:
    # ViT-B/16 training at 224²: about 3 x 35.1 GFLOP per image; 3000 images/s on a 989.4 TFLOP/s H100
    assert gpu.mfu(105.3e9, 3000.0, 989.4) == pytest.approx(105.3e9 * 3000 / 989.4e12)
    assert gpu.mfu(105.3e9, 3000.0, None) is None
    assert gpu.mfu(None, 3000.0, 989.4) is None


def test_batches_follow_the_gpu_memory() -> None:
    ctx = gpu.Context("cuda", False, 989.4, 79.1, Path("."))  # H100 80GB: the batches as written
    assert ctx.batch(256, 2) == 256 and ctx.batch(4, 1) == 4
    ctx.memory_gib = 139.8  # H200
    assert ctx.batch(256, 2) == 256 and ctx.batch(4, 1) == 4
    ctx.memory_gib = 39.4  # A100 40GB
    assert ctx.batch(256, 2) == 128 and ctx.batch(4, 1) == 2
    ctx.memory_gib = 22.0  # L4
    assert ctx.batch(256, 2) == 64 and ctx.batch(4, 1) == 1
    ctx.dry_run = True
    assert ctx.batch(256, 2) == 2


def test_rows_run_most_important_first_and_only_picks_by_pattern() -> None:
    ids = [r.id for r in gpu.all_rows()]
    assert ids[:3] == ["vit_b16/bf16-mixed/eager", "vitg_memory", "vit_b16/bf16-mixed/compile"]
    assert len(ids) == len(set(ids))
    for bench in gpu.SPEED_BENCHES:
        assert {f"{bench}/{p}/{m}" for p in gpu.PRECISIONS for m in ("eager", "compile")} <= set(ids)
    assert {f"loss20/{t}" for t in gpu.LOSS_TASKS} | {f"outputs/{p}" for p in gpu.OUTPUT_PAIRS} <= set(ids)
    picked = [r.id for r in gpu.select_rows(["loss20", "vit_b16/*/compile"])]
    loss_rows = [f"loss20/{t}" for t in gpu.LOSS_TASKS]
    assert picked == ["vit_b16/bf16-mixed/compile", *loss_rows, "vit_b16/16-mixed/compile"]
    with pytest.raises(SystemExit, match="matches no row"):
        gpu.select_rows(["nothing"])


def run_script(out: Path, *args: str, fault: str = "", row_timeout: str = "", oom: str = "") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "VISION_SUITE_GPU_BENCH_FAULT": fault, "VISION_SUITE_GPU_BENCH_ROW_TIMEOUT": row_timeout,
           "VISION_SUITE_GPU_BENCH_OOM": oom}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--out", str(out), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert gpu.GPU_COMMAND in done.stdout  # the one command to run on a GPU machine
    return json.loads((out / "gpu_results.json").read_text())


def test_without_time_every_row_says_why_it_was_not_measured(tmp_path: Path) -> None:
    report = run_script(tmp_path, "--dry-run", "--time-limit", "0")
    rows = report["rows"]
    assert [r["id"] for r in rows] == [r.id for r in gpu.all_rows()]
    assert all(r["result"]["status"] == "not measured" and "time budget" in r["result"]["reason"] for r in rows)
    text = (tmp_path / "gpu_results.md").read_text()
    for r in rows:
        reason = "not measured: time budget"
        assert f"| {r['id']} | {reason}" in text or f"## {r['id']}\n\n{reason}" in text


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_cuda_every_row_says_so(tmp_path: Path) -> None:
    report = run_script(tmp_path, "--only", "vit_b16/*", "vitg_memory")
    assert len(report["rows"]) == 5
    for row in report["rows"]:
        assert row["result"] == {"status": "not measured", "reason": "CUDA is not available (use --dry-run on a CPU)"}


DRY_ROWS = ["vit_b16/bf16-mixed/eager", "vitg_memory", "vit_b16/bf16-mixed/compile", "outputs/vit_timm",
            "token_merging/bf16-mixed/eager", "loss20/classification", "vit_b16/16-mixed/eager",
            "dynamicvit_s/16-mixed/eager", "segformer_b0/bf16-mixed/compile"]


@pytest.mark.slow
def test_the_dry_run_takes_every_kind_of_row_and_survives_a_crash_and_a_hang(tmp_path: Path) -> None:
    report = run_script(tmp_path, "--dry-run", "--peak-tflops", "1", "--only", *DRY_ROWS,
                        fault="vit_b16/16-mixed/eager:timm=raise,dynamicvit_s/16-mixed/eager=crash,"
                              "segformer_b0/bf16-mixed/compile=hang",
                        row_timeout="segformer_b0/bf16-mixed/compile=2",
                        oom="vitg_memory=5,vit_b16/16-mixed/eager=1")  # CUDA's out-of-memory error, simulated
    rows = {r["id"]: r["result"] for r in report["rows"]}
    assert list(rows) == DRY_ROWS
    crashed = rows.pop("dynamicvit_s/16-mixed/eager")  # the worker died in it; a fresh one took the rest
    assert crashed["status"] == "failed" and "exited with code 7" in crashed["reason"]
    hung = rows.pop("segformer_b0/bf16-mixed/compile")  # killed at its time limit, in the fresh worker
    assert hung == {"status": "failed", "reason": "killed after its time limit of 2 s", "log": hung["log"]}
    merging = rows.pop("token_merging/bf16-mixed/eager")
    assert merging["status"] == "measured" or "no token merging" in merging["reason"]
    assert {r["status"] for r in rows.values()} == {"measured"}, rows
    for row_id in ("vit_b16/bf16-mixed/eager", "vit_b16/bf16-mixed/compile", "vit_b16/16-mixed/eager"):
        models = {m["name"]: m for m in rows[row_id]["models"]}
        for m in models.values() if row_id != "vit_b16/16-mixed/eager" else [models["ours"]]:
            assert m["infer_samples_per_s"] > 0 and m["mfu_infer"] > 0 and m["fwd_gflop_per_sample"] > 0
            assert m["infer_peak_gib"] is None  # no CUDA memory on a CPU
    vit = {m["name"]: m for m in rows["vit_b16/bf16-mixed/eager"]["models"]}
    assert vit["ours"]["train_gflop_per_sample"] == pytest.approx(vit["timm"]["train_gflop_per_sample"], rel=0.01)
    assert vit["ours"]["ours vs it, train"] == 1.0 and vit["timm"]["ours vs it, train"] > 0
    assert rows["outputs/vit_timm"]["pass"] and {c["case"] for c in rows["outputs/vit_timm"]["checks"]} == {
        "fp32", "torch.bfloat16", "torch.float16"}
    loss = rows["loss20/classification"]
    assert loss["pass"] and len(loss["losses"]["32-true"]) == len(loss["losses"]["bf16-mixed"]) == loss["steps"]
    halved = rows["vit_b16/16-mixed/eager"]  # out of memory at batch 2: measured at 1; timm fails, ours stands
    assert halved["batch"] == 1 and halved["notes"][0] == "batch 2 ran out of memory: halved"
    assert halved["models"][1] == {"name": "timm",
                                   "error": "RuntimeError: injected fault in vit_b16/16-mixed/eager:timm"}
    vitg = rows["vitg_memory"]  # doubling to the first failure, bisection, the largest fit again, half of it
    assert (vitg["largest_batch"], vitg["first_failure"]) == (5, 6)
    assert [(t["batch"], t["fits"]) for t in vitg["tries"]] == [
        (1, True), (2, True), (4, True), (8, False), (6, False), (5, True), (5, True), (2, True)]
    text = (tmp_path / "gpu_results.md").read_text()
    for row_id in DRY_ROWS:
        assert row_id in text
    assert "failed: the worker exited with code 7" in text and "failed: killed after its time limit" in text
    assert "| vit_b16/16-mixed/eager | timm | 1 | failed: RuntimeError: injected fault" in text
    assert "## Goals (issue 24)" in text
