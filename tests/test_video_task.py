"""The video task: multi-view testing, skipped clips, prediction CSV, configs, and a short fit."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from datamodules.synthetic_videos import MOTION_CLASSES, deforming_shape_clip, write_motion_videos, write_mp4
from datamodules.video import VideoDataModule
from engine.cli import TaskCLI
from tasks.video import VideoClassificationModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def tiny_module(**kw) -> VideoClassificationModule:
    return VideoClassificationModule(
        backbone="timesformer_nano_patch8", backbone_kwargs={**TINY, "num_frames": 4}, num_classes=4, **kw
    )


def test_multi_view_test_averages_every_view() -> None:
    torch.manual_seed(0)
    module = tiny_module(views_per_forward=4).eval()
    calls: list[int] = []
    original = module.backbone.forward_tokens
    module.backbone.forward_tokens = lambda x: calls.append(x.shape[0]) or original(x)
    views = torch.randn(2, 6, 3, 4, 32, 32)  # 2 videos x (2 clips x 3 crops)
    with torch.no_grad():
        out = module.forward_stage(views, "test")
        assert calls == [4, 4, 4]  # all 12 clips, at most 4 per forward pass
        per_view = torch.stack([module(views[:, v]).softmax(-1) for v in range(6)], 1)
    torch.testing.assert_close(out.exp(), per_view.mean(1))
    assert not torch.allclose(out.exp(), per_view[:, 0], atol=1e-3)


@pytest.fixture(scope="module")
def clip_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight 64x64 synthetic clips, a list naming them and a truncated copy of one."""
    root = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    lines = []
    for n in range(8):
        write_mp4(root / f"{n}.mp4", deforming_shape_clip(rng, MOTION_CLASSES[n % 4], num_frames=10))
        lines.append(f"{n}.mp4 {n % 4}")
    data = (root / "0.mp4").read_bytes()
    (root / "broken.mp4").write_bytes(data[: len(data) // 2])
    (root / "classes.txt").write_text("\n".join(MOTION_CLASSES) + "\n")
    (root / "train.txt").write_text("\n".join(lines) + "\nbroken.mp4 0\n")
    (root / "val.txt").write_text("\n".join(lines[:4]) + "\n")
    return root


def small_data(root: Path, **kw) -> VideoDataModule:
    args = dict(
        train_list="train.txt", val_list="val.txt", class_names="classes.txt", num_frames=4, sampling_rate=2,
        jitter_scales=(32, 36), crop_size=32, hflip=False, batch_size=3, num_workers=0,
    )
    return VideoDataModule(str(root), **{**args, **kw})


def trainer(tmp_path: Path, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, **kw,
    )


def test_skipped_clips_are_counted_per_epoch(clip_root: Path, tmp_path: Path) -> None:
    module = tiny_module()
    run = trainer(tmp_path, max_epochs=1, num_sanity_val_steps=0)
    with pytest.warns(UserWarning, match="broken.mp4"):  # 1 of 9 clips: within a ceiling of 0.2; found in training
        run.fit(module, small_data(clip_root, max_skipped_fraction=0.2, check_files="none"))
    assert run.callback_metrics["train/skipped_clips"] == 1
    assert run.callback_metrics["val/skipped_clips"] == 0
    assert run.callback_metrics["train/clips_read_by_decord"] == 8 and run.callback_metrics["train/clips_read_by_pyav"] == 0


def test_test_and_predict_use_multi_view(clip_root: Path, tmp_path: Path) -> None:
    from engine.predict import PredictionWriter

    data = small_data(clip_root, test_clips=2, test_crops=3)
    module = tiny_module(class_names=data.class_names)  # what the CLI links from the data
    results = trainer(tmp_path).test(module, data)
    assert {"test/top1", "test/mean_class_acc", "test/loss"} <= set(results[0])
    writer = PredictionWriter(str(tmp_path / "out"))
    trainer(tmp_path, callbacks=[writer]).predict(module, data, return_predictions=False)
    rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    assert len(rows) == 4 and list(rows[0]) == ["path", "top5_classes", "top5_probabilities"]
    classes, probs = rows[0]["top5_classes"].split(";"), [float(p) for p in rows[0]["top5_probabilities"].split(";")]
    assert sorted(classes) == sorted(MOTION_CLASSES) and probs == sorted(probs, reverse=True)
    assert abs(sum(probs) - 1) < 1e-4


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("timesformer*.yaml")))
def test_configs_instantiate(name: str, clip_root: Path, tmp_path: Path) -> None:
    from datamodules.video import VideoDataModule as DataModule

    args = ["--config", str(CONFIGS / name), "--data.root", str(clip_root), "--data.train_list", "train.txt",
            "--data.val_list", "val.txt", "--data.class_names", "classes.txt", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"]
    if "nano" not in name:
        args += ["--model.backbone_kwargs.depth", "1"]  # the recipe's model at a depth a test can build
    cli = TaskCLI(VideoClassificationModule, DataModule, run=False, args=args, auto_configure_optimizers=False)
    assert cli.model.num_classes == 4 and cli.datamodule.num_classes == 4
    assert cli.model.backbone.spatial_dims == 3




@pytest.mark.slow
def test_short_fit_on_synthetic_videos_learns_the_order(tmp_path: Path, one_thread: None) -> None:
    """Growing vs shrinking: the two classes hold the same frames in opposite orders (chance: 50%)."""
    L.seed_everything(0)
    write_motion_videos(tmp_path, train_per_class=32, val_per_class=16, classes=MOTION_CLASSES[:2])
    data = VideoDataModule(
        str(tmp_path), train_list="train.txt", val_list="val.txt", class_names="classes.txt", num_frames=8,
        sampling_rate=1, jitter_scales=(32, 36), crop_size=32, hflip=False, batch_size=16, num_workers=0,
    )
    module = VideoClassificationModule(
        backbone="timesformer_nano_patch8", backbone_kwargs={"embed_dim": 64, "depth": 2, "time_embed_std": 0.5},
        num_classes=2, lr=2e-3, weight_decay=0.01, schedule="constant",
    )
    run = trainer(tmp_path, max_steps=120, num_sanity_val_steps=0, check_val_every_n_epoch=1000)
    before = run.validate(module, data, verbose=False)[0]["val/top1"]
    run.fit(module, data)
    after = run.validate(module, data, verbose=False)[0]["val/top1"]
    assert after >= 0.8 > before + 0.2, (before, after)


def test_video_student_distils_from_a_frozen_video_teacher(tmp_path: Path) -> None:
    teacher = tiny_module()
    path = tmp_path / "teacher.pth"
    torch.save(teacher.state_dict(), path)
    module = tiny_module(
        teacher="timesformer_nano_patch8", teacher_kwargs={**TINY, "num_frames": 4}, teacher_pretrained=str(path),
        distillation="soft", distillation_tau=2.0,
    )
    clip = torch.randn(2, 3, 4, 32, 32)
    torch.testing.assert_close(module.teacher(clip), teacher.eval()(clip))  # the file's weights, frozen
    module.train()
    losses = module.auxiliary_losses({"input": clip}, module.forward_stage(clip, "train"), "train")
    assert losses["distill"].value > 0 and module.task_loss_weight("train") == 0.5
    assert not any("teacher" in k for k in module.state_dict())
    with pytest.raises(ValueError, match="cutmix_alpha is for images"):
        tiny_module(cutmix_alpha=1.0)
