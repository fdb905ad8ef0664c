"""Run-state that is the same on every process and across restarts: dynamic choices drawn from (seed, epoch,
batch), never the rank; auxiliary losses added and logged by the shared step; a frozen backbone that stays a
linear probe."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from cli_runs import finish, read_metrics, run_task, write_shapes
from dynamic_probe import read_records  # also registers the probe backbones

from tasks.classification import ClassificationModule

TINY = {"img_size": 32, "embed_dim": 48, "num_heads": 2}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes"), train_per_class=8, val_per_class=4)  # 3 steps of 8


def fit_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "fit", "--seed_everything=5", "--model.backbone=probe_depth_drawing_vit", "--model.backbone_kwargs={img_size: 32}",
        f"--data.root={root}", "--data.image_size=32", "--data.batch_size=8", "--data.num_workers=0",
        "--trainer.max_epochs=3", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.logger=false", f"--trainer.default_root_dir={out}",
        "--checkpoint.every_n_train_steps=2",
        "--trainer.callbacks+=tests.dynamic_probe.RecordSubnets", f"--trainer.callbacks.path={out / 'draws'}", *extra,
    ]


@pytest.mark.distributed
def test_ddp_processes_draw_the_same_subnet_every_step(shapes: Path, tmp_path: Path, synthetic_cache: str) -> None:
    ddp = ["--trainer.devices=2", "--trainer.strategy=ddp", "--data.batch_size=4", "--trainer.max_epochs=2"]
    run_task("classification", fit_args(shapes, tmp_path, *ddp), cache=synthetic_cache)
    rank0, rank1 = read_records(tmp_path / "draws", 0), read_records(tmp_path / "draws", 1)
    assert rank0 == rank1 and len(rank0) == 6
    assert len(set(rank0.values())) > 1  # the choices really change from step to step


@pytest.mark.slow
def test_resumed_run_draws_what_the_uninterrupted_run_drew(shapes: Path, tmp_path: Path, synthetic_cache: str) -> None:
    full, broken = tmp_path / "full", tmp_path / "broken"
    kill = ["--trainer.callbacks+=tests.fault_injection.KillAtStep", "--trainer.callbacks.step=5"]
    uninterrupted = run_task("classification", fit_args(shapes, full), cache=synthetic_cache, wait=False)
    finish(run_task("classification", fit_args(shapes, broken, *kill), cache=synthetic_cache, wait=False), expect_rc=-9)
    before = read_records(broken / "draws")
    run_task("classification", [*fit_args(shapes, broken), "--ckpt_path=last"], cache=synthetic_cache)
    finish(uninterrupted)
    drawn, resumed = read_records(full / "draws"), read_records(broken / "draws")
    assert len(drawn) == 9 and resumed == drawn and len(before) == 5
    a = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(broken / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def tiny_trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_steps=3, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path, log_every_n_steps=1,
        logger=L.pytorch.loggers.CSVLogger(tmp_path), **kwargs,
    )


def shape_data(root: Path):
    from datamodules.classification import ClassificationDataModule

    return ClassificationDataModule(str(root), image_size=32, batch_size=8, num_workers=0)


@pytest.mark.parametrize("loss_weights", [None, {"token_norm": 2.0}])
def test_auxiliary_losses_are_added_with_their_weights_and_logged(shapes: Path, tmp_path: Path, loss_weights) -> None:
    module = ClassificationModule(backbone="probe_token_norm_vit", backbone_kwargs={"img_size": 32}, num_classes=3,
                                  loss_weights=loss_weights)
    tiny_trainer(tmp_path).fit(module, shape_data(shapes))
    rows = [r for r in read_metrics(tmp_path) if "train/loss_token_norm_step" in r]
    weight = (loss_weights or {}).get("token_norm", 0.1)
    assert len(rows) == 3
    for row in rows:
        expected = row["train/loss_task_step"] + weight * row["train/loss_token_norm_step"]
        assert row["train/loss_step"] == pytest.approx(expected, rel=1e-5)


def test_unknown_loss_weight_is_named(shapes: Path, tmp_path: Path) -> None:
    module = ClassificationModule(backbone="probe_token_norm_vit", backbone_kwargs={"img_size": 32}, num_classes=3,
                                  loss_weights={"keep_ratio": 1.0})
    with pytest.raises(ValueError, match=r"loss_weights names \['keep_ratio'\].*\['token_norm'\]"):
        tiny_trainer(tmp_path).fit(module, shape_data(shapes))


class BackboneModes(L.Callback):
    def __init__(self) -> None:
        self.training: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.training.append(pl_module.backbone.training)


def test_frozen_backbone_is_a_real_linear_probe(shapes: Path, tmp_path: Path) -> None:
    kwargs = {**TINY, "depth": 2, "drop_rate": 0.3, "drop_path_rate": 0.5}
    module = ClassificationModule(backbone="vit_tiny_patch16", backbone_kwargs=kwargs, num_classes=3, freeze_backbone=True)
    module.train()
    x = torch.randn(4, 3, 32, 32)
    assert not module.backbone.training and module.head.training
    assert torch.equal(module.backbone.forward_tokens(x), module.backbone.forward_tokens(x))  # no dropout, no drop path
    backbone_before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    head_before = module.head.fc.weight.clone()
    modes = BackboneModes()
    tiny_trainer(tmp_path, callbacks=[modes]).fit(module, shape_data(shapes))
    assert modes.training == [False, False, False]
    assert all(torch.equal(v, backbone_before[k]) for k, v in module.backbone.state_dict().items())
    assert not torch.equal(module.head.fc.weight, head_before)
