"""Mixed precision: every task trains under ``bf16-mixed`` on CPU (``16-mixed`` needs a GPU), with its loss and
metrics computed in fp32."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_runs import assert_trained

from tasks.classification import ClassificationModule

TINY_VIT = {"img_size": 32, "depth": 1, "embed_dim": 48, "num_heads": 2}


def tiny_videos(tmp_path: Path) -> list[str]:
    from datamodules.synthetic_videos import write_motion_videos

    (tmp_path / "videos").mkdir()
    write_motion_videos(tmp_path / "videos", train_per_class=2, val_per_class=1, size=32, num_frames=8)
    lists = ["--data.train_list=train.txt", "--data.val_list=val.txt", "--data.class_names=classes.txt"]
    return [f"--data.root={tmp_path / 'videos'}", *lists, "--data.batch_size=4"]


# per task: a small, fast variant of its default recipe (and, where the default data set is large, tiny data)
TASK_RUNS: dict[str, list[str] | Callable[[Path], list[str]]] = {
    "classification": [
        "--config=configs/vit_small_patch16.yaml", "--model.backbone=vit_tiny_patch16",
        "--model.backbone_kwargs={img_size: 32, depth: 1, embed_dim: 48, num_heads: 2}", "--data.image_size=32",
        "--data.synthetic_train_per_class=8", "--data.batch_size=4",
    ],
    "segmentation": [
        "--config=configs/segformer_b0.yaml", "--model.decoder_dim=32",
        "--model.backbone_kwargs={embed_dims: [16, 32, 64, 128], depths: [1, 1, 1, 1], num_heads: [1, 1, 2, 4]}",
        "--data.synthetic_size=64", "--data.synthetic_train=8", "--data.synthetic_val=4", "--data.crop_size=[64, 64]",
        "--data.batch_size=4", "--data.val_batch_size=2",
    ],
    "video": lambda tmp_path: ["--config=configs/timesformer_nano.yaml", *tiny_videos(tmp_path)],
    "medical": [
        "--config=configs/unetr.yaml",
        "--model.backbone_kwargs={img_size: 32, embed_dim: 96, depth: 4, num_heads: 2, out_indices: [0, 1, 2, 3]}",
        "--data.roi_size=[32, 32, 32]", "--data.synthetic_num_train=4", "--data.synthetic_size=32",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TASK_RUNS))
def test_bf16_mixed_fast_dev_run(task: str, tmp_path: Path) -> None:
    run = TASK_RUNS[task]
    args = run(tmp_path) if callable(run) else run
    cli = importlib.import_module(f"tasks.{task}").main([
        "fit", *args, "--trainer.precision=bf16-mixed", "--trainer.fast_dev_run=2", "--trainer.accelerator=cpu",
        "--trainer.devices=1", "--data.num_workers=0", f"--trainer.default_root_dir={tmp_path}",
    ])
    assert_trained(cli)
    assert cli.trainer.precision == "bf16-mixed"


def test_loss_and_metrics_run_in_fp32_under_autocast() -> None:
    module = ClassificationModule(backbone="vit_tiny_patch16", backbone_kwargs=TINY_VIT, num_classes=3)
    seen: dict[str, object] = {}
    compute_loss, update = module.compute_loss, module.metrics["val_metrics"].update

    def loss_spy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        seen["loss"] = (output.dtype, torch.is_autocast_enabled("cpu"))
        return compute_loss(output, target)

    def metric_spy(output: torch.Tensor, target: torch.Tensor) -> None:
        seen["metrics"] = (output.dtype, torch.is_autocast_enabled("cpu"))
        update(output, target)

    module.compute_loss, module.metrics["val_metrics"].update = loss_spy, metric_spy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert module(torch.randn(2, 3, 32, 32)).dtype == torch.bfloat16
        loss = module.shared_step({"input": torch.randn(2, 3, 32, 32), "target": torch.tensor([0, 2])}, "val")
    assert loss.dtype == torch.float32
    assert seen == {"loss": (torch.float32, False), "metrics": (torch.float32, False)}
