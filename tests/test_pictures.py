"""What a run leaves besides checkpoints: TensorBoard and CSV logs in one run folder, the task's pictures at every
validation (to loggers that take images), the final curves as PNG, and a model summary with real FLOPs."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from unittest.mock import MagicMock

import numpy as np
import pytest
from lightning.pytorch.loggers import MLFlowLogger, WandbLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engine.pictures import log_image

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def tiny_videos(root: Path) -> list[str]:
    from datamodules.synthetic_videos import write_motion_videos

    root.mkdir()
    write_motion_videos(root, train_per_class=1, val_per_class=1, size=32, num_frames=8)
    return [f"--data.root={root}", "--data.train_list=train.txt", "--data.val_list=val.txt",
            "--data.class_names=classes.txt", "--data.batch_size=4"]


# per task: a tiny variant of its default recipe and the pictures its validation logs
TASKS: dict[str, tuple[list[str], set[str]]] = {
    "classification": ([
        "--config=configs/vit_small_patch16.yaml", "--model.backbone=vit_tiny_patch16",
        "--model.backbone_kwargs={img_size: 32, depth: 1, embed_dim: 48, num_heads: 2}", "--data.image_size=32",
        "--data.synthetic_size=32", "--data.synthetic_train_per_class=4", "--data.batch_size=8",
    ], {"val/confusion_matrix", "val/misclassified"}),
    "segmentation": ([
        "--config=configs/segformer_b0.yaml", "--model.decoder_dim=16",
        "--model.backbone_kwargs={embed_dims: [8, 16, 32, 32], depths: [1, 1, 1, 1], num_heads: [1, 1, 1, 1]}",
        "--data.synthetic_size=48", "--data.synthetic_train=4", "--data.synthetic_val=2", "--data.crop_size=[48, 48]",
        "--data.batch_size=2", "--data.val_batch_size=2",
    ], {"val/segmentation"}),
    "video": ([
        "--config=configs/timesformer_nano.yaml",
        "--model.backbone_kwargs={img_size: 32, num_frames: 4, embed_dim: 32, depth: 1, num_heads: 2}",
        "--data.num_frames=4", "--data.jitter_scales=[32, 32]", "--data.test_crops=1",
    ], {"val/per_class_accuracy", "val/misclassified_clips"}),
    "medical": ([
        "--config=configs/unetr.yaml", "--model.feature_size=4",
        "--model.backbone_kwargs={img_size: 16, patch_size: 8, embed_dim: 32, depth: 3, num_heads: 2, out_indices: [0, 1, 2]}",
        "--data.roi_size=[16, 16, 16]", "--data.synthetic_num_train=3", "--data.synthetic_size=24", "--data.num_samples=1",
        "--trainer.val_check_interval=null", "--trainer.check_val_every_n_epoch=1",
    ], {"val/slices"}),
}
COMMON = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--data.num_workers=0", "--trainer.max_epochs=1",
          "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
          "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false"]


def fit(task: str, tmp_path: Path, *extra: str) -> None:
    args, _ = TASKS[task]
    if task == "video":
        args = [*args, *tiny_videos(tmp_path / "videos")]
    importlib.import_module(f"tasks.{task}").main(["fit", *args, *COMMON, f"--trainer.default_root_dir={tmp_path}", *extra])


def summary_flops(printed: str) -> str:
    """The model summary's FLOP count as printed (Lightning's plain or rich summary)."""
    found = re.search(r"Total FLOPs: ([\d.]+ ?\w?)", printed) or re.search(r"([\d.]+ ?\w?)\s+Total Flops", printed)
    assert found, printed[-3000:]
    return found.group(1).strip()


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TASKS))
def test_fit_logs_pictures_curves_and_flops(task: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fit(task, tmp_path)
    assert summary_flops(capsys.readouterr().out) not in ("0", "0.0")
    (run,) = (tmp_path / "lightning_logs").iterdir()  # TensorBoard and CSV share one version folder
    assert (run / "metrics.csv").is_file() and list(run.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run), size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == TASKS[task][1]
    for tag in TASKS[task][1]:
        (image,) = events.Images(tag)  # one validation, one picture each, at its step
        assert image.step == 1 and image.width > 100 and image.height > 100
    with Image.open(run / "curves.png") as curves:
        assert curves.size[0] > 500 and np.asarray(curves.convert("L")).std() > 10  # drawn, not blank


@pytest.mark.slow
def test_a_csv_only_run_skips_pictures_and_still_writes_the_curves(tmp_path: Path) -> None:
    fit("classification", tmp_path, "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}", "--trainer.enable_model_summary=false")
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
    (run,) = (tmp_path / "lightning_logs").iterdir()
    assert (run / "metrics.csv").is_file() and (run / "curves.png").is_file()


def test_pictures_reach_wandb_and_mlflow_in_their_own_calls() -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    wandb, mlflow = MagicMock(spec=WandbLogger), MagicMock(spec=MLFlowLogger)
    mlflow.run_id = "run-1"
    log_image(wandb, "val/slices", image, 7)
    log_image(mlflow, "val/slices", image, 7)
    wandb.log_image.assert_called_once_with(key="val/slices", images=[image], step=7)
    mlflow.experiment.log_image.assert_called_once_with("run-1", image, "val/slices/step_00000007.png")


def test_the_curve_history_survives_a_weights_only_checkpoint(tmp_path: Path) -> None:
    """A resumed fit draws the whole run: the history is checkpoint state that ``weights_only`` loading accepts."""
    import torch

    from engine.pictures import FinalCurves

    curves = FinalCurves()
    curves.history = {"train/loss": [(3, 1.25), (6, 1.0)], "val/top1": [(3, 0.5)]}
    torch.save({"callbacks": {"FinalCurves": curves.state_dict()}}, tmp_path / "last.ckpt")
    restored = FinalCurves()
    restored.load_state_dict(torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]["FinalCurves"])
    assert restored.history == curves.history
