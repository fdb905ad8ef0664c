"""Running a task's CLI in a subprocess (a real process to kill, or several under DDP) and reading its metrics."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from datamodules.synthetic import shape_image

REPO = Path(__file__).parents[1]
TINY_VIT = "--model.backbone_kwargs={img_size: 32, depth: 1, embed_dim: 48, num_heads: 2}"


def write_shapes(root: Path, *, train_per_class: int, val_per_class: int, classes=("circle", "square", "triangle")) -> Path:
    """A small ImageFolder of 32x32 synthetic shapes; odd validation counts exercise uneven shards."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for kind in classes:
            (root / split / kind).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                shape_image(rng, kind, 32).save(root / split / kind / f"{i}.png")
    return root


def run_task(
    task: str, args: list[str], *, cache: str, expect_rc: int = 0, timeout: float = 300, wait: bool = True
) -> subprocess.Popen | subprocess.CompletedProcess:
    """``python -m tasks.<task> <args>`` from the repository root; fails the test with the output on a bad rc."""
    env = {**os.environ, "VISION_SUITE_CACHE": cache, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", f"tasks.{task}", *args]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return finish(process, expect_rc, timeout) if wait else process


def finish(process: subprocess.Popen, expect_rc: int = 0, timeout: float = 300) -> subprocess.CompletedProcess:
    output, _ = process.communicate(timeout=timeout)
    if process.returncode != expect_rc:
        raise AssertionError(f"exit code {process.returncode}, expected {expect_rc}:\n{output[-6000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, output)


def read_metrics(save_dir: Path) -> list[dict[str, float]]:
    """Rows of the CSVLogger's ``metrics.csv`` under ``save_dir`` (the latest version), empty cells dropped."""
    path = sorted(save_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)[-1]
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def last_value(rows: list[dict[str, float]], key: str) -> float:
    return [r[key] for r in rows if key in r][-1]


def assert_trained(cli) -> None:
    """A one-epoch fit through the CLI (``fast_dev_run``) made an optimizer step for every training batch, with a
    finite training loss, and validated."""
    trainer = cli.trainer
    steps = trainer.num_training_batches // trainer.accumulate_grad_batches
    assert steps >= 1 and trainer.global_step == steps, f"{trainer.global_step} optimizer steps, expected {steps}"
    loss = trainer.callback_metrics.get("train/loss")
    assert loss is not None and bool(torch.isfinite(loss)), f"train/loss is {loss}"
    assert any(k.startswith("val/") for k in trainer.callback_metrics), sorted(trainer.callback_metrics)
