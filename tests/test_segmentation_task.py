"""SegmentationModule end to end: sliding-window inference, predict outputs, a short fit, and the configs."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.label_maps import voc_palette
from datamodules.segmentation import SegmentationDataModule
from engine.predict import PredictionWriter
from tasks.segmentation import SegmentationCLI, SegmentationModule, main

TINY = {"embed_dims": (16, 32, 64, 128), "depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 4), "drop_path_rate": 0.0}
CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("segformer_*.yaml"))


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def tiny_module(**kwargs) -> SegmentationModule:
    return SegmentationModule(backbone="mit_b0", backbone_kwargs=TINY, decoder_dim=32, **{"num_classes": 5, **kwargs})


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


@torch.no_grad()
def test_sliding_window_equals_whole_image_when_the_window_covers_it() -> None:
    model = tiny_module(inference="slide", window_size=(64, 96), window_stride=(32, 32)).eval()
    x = torch.randn(2, 3, 64, 96)
    whole = model(x)
    assert torch.allclose(model.forward_stage(x, "val"), whole, atol=1e-6)
    model.hparams.window_size = (512, 512)  # larger than the image: the window shrinks to it, nothing is padded
    assert torch.allclose(model.forward_stage(x, "test"), whole, atol=1e-6)


@torch.no_grad()
def test_sliding_window_averages_windows_on_mmsegs_grid() -> None:
    model = tiny_module(inference="slide", window_size=(32, 32), window_stride=(24, 24)).eval()
    x = torch.randn(1, 3, 48, 80)
    total, count = torch.zeros(1, 5, 48, 80), torch.zeros(1, 1, 48, 80)
    for y in (0, 16):  # the last window of each axis sits flush with the border
        for x0 in (0, 24, 48):
            total[..., y : y + 32, x0 : x0 + 32] += model(x[..., y : y + 32, x0 : x0 + 32])
            count[..., y : y + 32, x0 : x0 + 32] += 1
    assert torch.allclose(model.forward_stage(x, "val"), total / count, atol=1e-5)


@pytest.mark.slow
def test_predict_writes_palette_masks_at_the_original_size(tmp_path: Path) -> None:
    images = tmp_path / "images"
    sizes = {"a": (40, 56), "sub/b": (50, 30)}
    for name, (h, w) in sizes.items():
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"{name}.jpg")
    dm = SegmentationDataModule(predict_dir=str(images), eval_scale=(64, 32), num_workers=0)
    model = tiny_module(num_classes=dm.num_classes, save_overlay=True)
    out = tmp_path / "out"
    trainer(callbacks=[PredictionWriter(str(out))]).predict(model, datamodule=dm, return_predictions=False)
    palette = [c for rgb in voc_palette() for c in rgb]
    for name, (h, w) in sizes.items():
        with Image.open(out / "masks" / f"{name}.png") as mask:
            assert mask.mode == "P" and mask.size == (w, h)
            assert mask.getpalette()[:30] == palette[:30]
            assert 1 <= np.asarray(mask).min() and np.asarray(mask).max() <= dm.num_classes  # ADE20K: class + 1
        with Image.open(out / "overlays" / f"{name}.jpg") as overlay:
            assert overlay.size == (w, h)
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]).stem for r in rows] == ["a", "b"]
    assert [(int(r["height"]), int(r["width"])) for r in rows] == list(sizes.values())


@pytest.mark.slow
def test_short_fit_on_synthetic_scenes_raises_miou() -> None:
    """50 steps on 16 scenes, measured on those scenes: the loop, loss and metrics work end to end
    (generalisation is the default run's job: configs/segformer_b0.yaml)."""
    torch.manual_seed(0)
    dm = SegmentationDataModule(synthetic_size=64, synthetic_train=16, synthetic_val=2, val_split="training",
                                crop_size=(64, 64), ratio_range=(1.0, 1.25), photometric=False, batch_size=8,
                                val_batch_size=16, num_workers=0)
    model = SegmentationModule(backbone="mit_b0", backbone_kwargs={"drop_path_rate": 0.0}, decoder_dim=64,
                               num_classes=dm.num_classes, lr=2e-3, schedule="constant", warmup_steps=8)
    run = trainer(max_epochs=25, num_sanity_val_steps=0, check_val_every_n_epoch=25)
    start = run.validate(copy.deepcopy(model), datamodule=dm, verbose=False)[0]["val/miou"]  # fresh metric states
    run.fit(model, datamodule=dm)
    end = run.validate(model, datamodule=dm, verbose=False)[0]["val/miou"]
    assert end > start + 0.2 and end > 3 * start, (start, end)


def test_dice_and_lovasz_losses_honour_ignore_index() -> None:
    model = tiny_module(dice_weight=0.5, lovasz_weight=0.5, class_weights=[1.0, 2.0, 1.0, 1.0, 1.0])
    x, target = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    target[:, :8] = 255
    logits = model(x)
    loss = model.compute_loss(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and loss > model.hparams.ce_weight * torch.nn.functional.cross_entropy(
        logits.detach(), target, weight=model.class_weights, ignore_index=255
    )
    with pytest.raises(ValueError, match="class_weights has 2 entries for 5 classes"):
        tiny_module(class_weights=[1.0, 2.0])


def test_evaluation_options_stay_out_of_checkpoints(tmp_path: Path) -> None:
    """LightningCLI overrides the command line with a checkpoint's hyperparameters; how to evaluate is not kept."""
    dm = SegmentationDataModule(synthetic_size=32, synthetic_train=4, synthetic_val=2, crop_size=(32, 32), num_workers=0)
    model = tiny_module(num_classes=dm.num_classes, inference="slide", save_overlay=True)
    run = trainer(max_steps=1, limit_val_batches=0)
    run.fit(model, datamodule=dm)
    run.save_checkpoint(tmp_path / "model.ckpt")
    saved = torch.load(tmp_path / "model.ckpt", weights_only=True)["hyper_parameters"]
    assert saved["decoder_dim"] == 32 and not set(saved) & {"inference", "window_size", "save_overlay"}
    assert SegmentationModule.load_from_checkpoint(tmp_path / "model.ckpt").hparams.inference == "whole"


def test_ignore_index_must_agree_with_the_data() -> None:
    dm = SegmentationDataModule(ignore_index=0, synthetic_size=16, synthetic_train=4, synthetic_val=2)
    with pytest.raises(ValueError, match="data.ignore_index=0 but model.ignore_index=255"):
        trainer(max_steps=1).validate(tiny_module(num_classes=6), datamodule=dm)


def test_cli_links_the_datas_ignore_index_into_the_model() -> None:
    args = ["--config", str(CONFIGS[0]), "--trainer.logger", "false", "--data.ignore_index", "0"]
    cli = SegmentationCLI(
        SegmentationModule, SegmentationDataModule, run=False, auto_configure_optimizers=False, args=args
    )
    assert cli.datamodule.ignore_index == cli.model.hparams.ignore_index == 0
    assert cli.model.metrics["val_metrics"]["miou"].ignore_index == 0


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_parses_and_instantiates(config: Path, tmp_path: Path) -> None:
    args = ["--config", str(config), "--trainer.logger", "false"]
    args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"]  # recipes name 8 GPUs
    if "ade20k" in config.stem or "cityscapes" in config.stem:  # the real data's folders, empty
        (tmp_path / ("leftImg8bit" if "cityscapes" in config.stem else "images")).mkdir()
        (tmp_path / "annotations").mkdir()
        args += ["--data.root", str(tmp_path)]
    with torch.device("meta"):  # B3-B5 are large; their weights need not exist to check the recipe
        cli = SegmentationCLI(
            SegmentationModule, SegmentationDataModule, run=False, auto_configure_optimizers=False, args=args
        )
    assert cli.model.num_classes == cli.datamodule.num_classes
    assert cli.model.hparams.ignore_index == cli.datamodule.ignore_index
    assert cli.model.hparams.backbone.startswith(("mit_b", "efficientformerv2_"))


def test_print_config_runs_through_main(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(CONFIGS[0]), "--print_config"])
    assert stop.value.code == 0 and "backbone: mit_b" in capsys.readouterr().out
