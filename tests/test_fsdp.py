"""``--trainer.strategy fsdp`` (FSDP2 through ``engine.distributed.FullyShardedStrategy``): two CPU processes (gloo)
with sharded weights, gradients and optimizer state, and activation checkpointing on, train like one process
with the global batch; the checkpoint is one ordinary file that resumes under FSDP and loads into one process."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

from backbones.layers import Block
from datamodules.classification import ClassificationDataModule
from tasks.classification import ClassificationModule, main
from engine.cli import run_cli
from engine.distributed import FullyShardedStrategy

from cli_runs import TINY_VIT, run_task, write_shapes

TINY = TINY_VIT.replace("depth: 1", "depth: 2")  # two blocks: two sharded units besides the root


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes"), train_per_class=8, val_per_class=5)  # 24 / 15 images


def cli_args(root: Path, out: Path) -> list[str]:
    """big_vision's Adafactor (factored, momentum in bf16: its state must survive sharding and gathering); a constant
    learning rate, so a run of one epoch and its resumption to two follow the two-epoch run's schedule."""
    return [
        "--seed_everything=3", "--model.backbone=vit_tiny_patch16", TINY, "--model.schedule=constant",
        "--model.optimizer=adafactor_bv", f"--data.root={root}",
        "--data.image_size=32", "--data.num_workers=0", "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={out}",
        f"--trainer.default_root_dir={out}",
    ]


def all_metrics(save_dir: Path) -> list[dict[str, float]]:
    """The rows of every ``metrics.csv`` under ``save_dir``, oldest run first (a resumed run logs a new version)."""
    rows = []
    for path in sorted(save_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime):
        with open(path) as f:
            rows += [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    return rows


def series(rows: list[dict[str, float]], key: str) -> list[float]:
    return [r[key] for r in rows if key in r]


@pytest.fixture(scope="module")
def fsdp_fit(shapes: Path, tmp_path_factory: pytest.TempPathFactory, synthetic_cache: str) -> Path:
    """Two processes, batch 4 each: one epoch, then a second one resumed from the first one's ``last.ckpt``."""
    out = tmp_path_factory.mktemp("fsdp")
    fsdp = ["--trainer.devices=2", "--trainer.strategy=fsdp", "--model.activation_checkpointing=true", "--data.batch_size=4"]
    run_task("classification", ["fit", *cli_args(shapes, out), "--trainer.max_epochs=1", *fsdp], cache=synthetic_cache)
    shutil.copy(out / "checkpoints" / "last.ckpt", out / "epoch1.ckpt")
    run_task("classification", ["fit", *cli_args(shapes, out), "--trainer.max_epochs=2", *fsdp,
                                f"--ckpt_path={out / 'epoch1.ckpt'}"], cache=synthetic_cache)
    return out


@pytest.mark.distributed
def test_fsdp_trains_and_resumes_like_one_process(fsdp_fit: Path, shapes: Path, tmp_path: Path) -> None:
    """Epoch 1 from the first run, epoch 2 from the resumed one: the losses of one process with batch 8, no
    checkpointing, to float rounding (the reduce-scatter sums in another order)."""
    main(["fit", *cli_args(shapes, tmp_path), "--trainer.max_epochs=2", "--data.batch_size=8", "--trainer.devices=1"])
    one, two = all_metrics(tmp_path), all_metrics(fsdp_fit)
    for key in ("train/loss_epoch", "val/loss"):
        assert len(series(two, key)) == 2
        assert series(two, key) == pytest.approx(series(one, key), rel=1e-5)
    assert series(two, "val/top1") == series(one, "val/top1")


@pytest.mark.distributed
def test_fsdp_checkpoint_is_one_full_file_that_one_process_loads(fsdp_fit: Path, shapes: Path, tmp_path: Path) -> None:
    path = fsdp_fit / "epoch1.ckpt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    weight = checkpoint["state_dict"]["backbone.blocks.1.mlp.fc1.weight"]
    assert type(weight) is torch.Tensor and weight.shape == (192, 48)  # whole, not a shard or a DTensor
    optimizer = checkpoint["optimizer_states"][0]
    assert len(optimizer["state"]) == len(list(ClassificationModule(
        backbone="vit_tiny_patch16", backbone_kwargs={"img_size": 32, "depth": 2, "embed_dim": 48, "num_heads": 2},
        num_classes=3).parameters()))  # every parameter's state, gathered
    fc1 = [s for s in optimizer["state"].values() if s["exp_avg"].shape == (192, 48)]
    assert len(fc1) == 2 and all("exp_avg_sq" not in s for s in fc1)  # factored, not full
    assert all(s["exp_avg_sq_r"].shape == (1, 48) and s["exp_avg_sq_c"].shape == (192, 1) for s in fc1)
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in fc1) and optimizer["param_groups"][0]["momentum_dtype"] == torch.bfloat16
    main(["validate", *cli_args(shapes, tmp_path), "--data.batch_size=4", f"--ckpt_path={path}"])
    first_epoch_val = series(all_metrics(fsdp_fit), "val/loss")[0]
    assert series(all_metrics(tmp_path), "val/loss")[-1] == pytest.approx(first_epoch_val, rel=1e-6)


def test_cli_strategy_fsdp_is_fsdp2_sharding_the_blocks() -> None:
    args = ["--model.backbone=vit_tiny_patch16", TINY, "--trainer.strategy=fsdp", "--trainer.devices=1",
            "--trainer.accelerator=cpu", "--trainer.logger=false"]
    cli = run_cli(ClassificationModule, ClassificationDataModule, args=args, run=False)
    assert isinstance(cli.trainer.strategy, FullyShardedStrategy)
    units = cli.model.backbone.sharding_units()
    assert len(units) == 2 and all(isinstance(u, Block) for u in units)
