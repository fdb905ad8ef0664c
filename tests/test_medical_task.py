"""The medical task: metrics with known answers, sliding windows, NIfTI predictions, a short fit, the configs."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch

from datamodules.medical import MedicalDataModule
from datamodules.synthetic_volumes import synthetic_case, write_case, write_decathlon_folder
from engine.cli import run_cli
from tasks.medical import MedicalCLI, MedicalSegmentationModule
from engine.volume_metrics import metric_suffixes, volume_metrics, volume_scores
from engine.predict import PredictionWriter

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("unetr*.yaml"))
TINY_VIT = dict(img_size=32, embed_dim=96, depth=4, num_heads=2, out_indices=[0, 1, 2, 3])


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def tiny_module(**kwargs) -> MedicalSegmentationModule:
    args = dict(backbone="unetr_vit_base", backbone_kwargs=TINY_VIT, num_classes=5, feature_size=8)
    return MedicalSegmentationModule(**{**args, **kwargs})


# --- metrics -------------------------------------------------------------------------------------------------


def test_dice_and_hd95_known_answers():
    target = torch.zeros(1, 20, 20, 20, dtype=torch.long)
    pred = torch.zeros_like(target)
    target[0, 2:12, 2:12, 2:12] = pred[0, 2:12, 2:12, 2:12] = 1  # class 1: perfect
    target[0, 5, 5, 14], pred[0, 5, 5, 18] = 2, 2  # class 2: one voxel, 4 slices away
    target[0, 14:18, 14:18, 4:6] = 3  # class 3: missed entirely
    pred[0, 15:17, 0:2, 0:2] = 4  # class 4: predicted where there is none
    spacing = torch.tensor([[1.0, 1.0, 2.0]])
    dice, hd = volume_scores(pred, target, 5, spacing)
    diagonal = math.sqrt(20**2 + 20**2 + 40**2)
    torch.testing.assert_close(dice[0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(hd[0], torch.tensor([0.0, 8.0, diagonal, diagonal]))


def test_shifted_cube_and_the_mean_counts_missed_structures(monkeypatch):
    import engine.volume_metrics

    scored = []
    monkeypatch.setattr(engine.volume_metrics, "volume_scores", lambda *a, **k: scored.append(1) or volume_scores(*a, **k))
    target = torch.zeros(2, 16, 16, 16, dtype=torch.long)
    pred = torch.zeros_like(target)
    target[:, 2:12, 2:12, 2:12] = 1
    pred[:, 2:12, 2:12, 4:14] = 1  # shifted by 2 of 10 voxels: Dice 0.8
    target[:, 13:15, 13:15, 13:15] = 2
    pred[1, 13:15, 13:15, 13:15] = 2  # found in volume 1, missed in volume 0: class mean 0.5
    metrics = volume_metrics(4)
    metrics.update(pred, target, torch.ones(2, 3))
    out = {k: float(v) for k, v in metrics.compute().items()}
    assert out["dice_1"] == pytest.approx(0.8) and out["dice_2"] == pytest.approx(0.5)
    assert math.isnan(out["dice_3"])  # never present, never predicted: no information
    assert out["dice"] == pytest.approx((0.8 + 0.5) / 2)  # not (0.8 + 1.0) / 2: the miss counts as 0
    assert out["hd95_2"] == pytest.approx(math.sqrt(3 * 16**2) / 2)  # mean of 0 and the volume diagonal
    assert len(metrics.compute_groups) == 1 and len(scored) == 1  # scored once for all classes and kinds



def test_scores_on_each_class_box_equal_monais_on_the_whole_volume():
    """volume_scores crops each class to its box before MONAI's Dice and HD95: the same numbers as on the full
    volumes, also for structures that touch the volume's border."""
    from monai.metrics import compute_dice, compute_hausdorff_distance

    g = torch.Generator().manual_seed(0)
    target = torch.zeros(1, 23, 19, 17, dtype=torch.uint8)
    target[0, 0:6, 3:11, 10:17] = 1  # touches two borders
    target[0, 12:20, 8:19, 2:9] = 2
    pred = target.clone()
    noise = torch.rand(target.shape, generator=g) < 0.08
    pred[noise] = torch.randint(0, 3, target.shape, generator=g, dtype=torch.uint8)[noise]
    spacing = torch.tensor([[0.8, 1.2, 2.5]])
    dice, hd = volume_scores(pred, target, 3, spacing)
    for c in (1, 2):
        p, t = (pred == c)[:, None].float(), (target == c)[:, None].float()
        assert dice[0, c - 1] == compute_dice(p, t).item()
        assert hd[0, c - 1] == compute_hausdorff_distance(p, t, percentile=95, spacing=[0.8, 1.2, 2.5]).item()

# --- sliding window and predictions ----------------------------------------------------------------------


@pytest.mark.slow
def test_sliding_window_covers_any_volume_size():
    module = tiny_module(sw_overlap=0.25, sw_stitch_on_cpu=True).eval()
    x = torch.randn(1, 1, 40, 50, 36)
    with torch.no_grad():
        out = module.sliding_window(x)
        single = torch.randn(1, 1, 32, 32, 32)
        torch.testing.assert_close(module.sliding_window(single), module(single), atol=1e-5, rtol=1e-4)
    assert out.shape == (1, 5, 40, 50, 36) and out.device.type == "cpu"


def write_oracle_set(root: Path) -> list[tuple[Path, np.ndarray]]:
    """Volumes whose channels are the one-hot labels, so the prediction can be read off the input;
    anisotropic voxels, one stored in RAS and one in LPS order."""
    import json

    rng = np.random.default_rng(1)
    meta = {"labels": {str(i): f"c{i}" for i in range(5)}, "modality": {str(i): "CT" for i in range(5)},
            "training": [], "test": []}
    cases = []
    for n, lps in enumerate((False, True)):
        spacing = (1.4, 1.4, 2.6)
        _, labels = synthetic_case(rng, (40, 40, 24), spacing)
        image = root / "imagesTs" / f"case{n}.nii.gz"
        image.parent.mkdir(parents=True, exist_ok=True)
        write_case(image, np.eye(5, dtype=np.float32)[labels], spacing, lps=lps, label=False)  # [X, Y, Z, 5]
        meta["test"].append(f"./imagesTs/case{n}.nii.gz")
        cases.append((image, labels[::-1, ::-1] if lps else labels))
    (root / "dataset.json").write_text(json.dumps(meta))
    return cases


def test_predict_writes_nifti_in_the_inputs_space(tmp_path):
    cases = write_oracle_set(tmp_path / "data")
    dm = MedicalDataModule(
        str(tmp_path / "data"), spacing=(1.4, 1.4, 1.3), roi_size=(32, 32, 32), num_workers=0, ct_window=(0.0, 1.0)
    )  # slices resampled to half their thickness: every original voxel centre is on the model's grid
    module = tiny_module()
    module.forward = lambda x: x  # an oracle: each window of the resampled one-hot input is its prediction
    trainer = L.Trainer(logger=False, enable_progress_bar=False, callbacks=[PredictionWriter(str(tmp_path / "out"))])
    trainer.predict(module, datamodule=dm)
    for image, labels in cases:
        written = nib.load(tmp_path / "out" / image.name)
        source = nib.load(image)
        np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
        assert written.shape == source.shape[:3] and int(written.header["sform_code"]) == 1
        pred = np.asanyarray(written.dataobj)
        assert pred.dtype == np.uint8
        np.testing.assert_array_equal(pred, labels)  # voxel for voxel: no flip, shift or crop left over
    rows = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert rows[0] == "path,prediction,classes_found" and len(rows) == 3


# --- training ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_short_fit_raises_dice(tmp_path):
    write_decathlon_folder(tmp_path, num_train=6, num_test=1, size=48)
    dm = MedicalDataModule(
        str(tmp_path), fold=0, num_folds=6, spacing=(3.0, 3.0, 3.0), roi_size=(24, 24, 24), num_samples=2,
        batch_size=2, num_workers=0, flip_prob=0.0, rot90_prob=0.0,
    )
    torch.manual_seed(0)
    vit = dict(img_size=24, patch_size=8, embed_dim=48, depth=3, num_heads=2, out_indices=[0, 1, 2])
    module = tiny_module(backbone_kwargs=vit, lr=5e-3, weight_decay=1e-5, warmup_steps=2, sw_overlap=0.25)
    trainer = L.Trainer(
        max_steps=150, logger=False, enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
        check_val_every_n_epoch=1000, enable_model_summary=False, inference_mode=False,  # validate, fit, validate
    )
    before = trainer.validate(module, datamodule=dm, verbose=False)[0]
    trainer.fit(module, datamodule=dm)
    after = trainer.validate(module, datamodule=dm, verbose=False)[0]
    assert after["val/dice"] > before["val/dice"] + 0.12, (before, after)
    assert after["val/dice_1"] > 0.6, after  # the liver, the largest organ, is learnt first (no names given here)
    assert after["val/hd95_1"] < before["val/hd95_1"]


# --- configs -----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_configs_instantiate(config, tmp_path, monkeypatch):
    monkeypatch.setenv("VISION_SUITE_CACHE", str(tmp_path))
    monkeypatch.setenv("VISION_SUITE_RUNS", str(tmp_path / "runs"))
    cli = run_cli(MedicalSegmentationModule, MedicalDataModule, args=["--config", str(config)], cli_class=MedicalCLI,
                  run=False)
    assert cli.model.num_classes == cli.datamodule.num_classes
    assert cli.model.roi_size == tuple(cli.datamodule.hparams.roi_size)
    assert cli.model.backbone.in_chans == cli.datamodule.in_channels


def test_cli_links_mri_channels(tmp_path, monkeypatch):
    monkeypatch.setenv("VISION_SUITE_CACHE", str(tmp_path))
    monkeypatch.setenv("VISION_SUITE_RUNS", str(tmp_path / "runs"))
    args = ["--config", str(CONFIGS[0]), "--data.synthetic_channels", "3"]
    cli = run_cli(MedicalSegmentationModule, MedicalDataModule, args=args, cli_class=MedicalCLI, run=False)
    assert cli.model.backbone.in_chans == 3 and cli.model.head.input_block.layer.conv1.conv.in_channels == 3
    # class names come from the data too, and name the per-class metrics
    assert cli.model.class_names == ["background", "liver", "spleen", "kidney", "aorta"]
    assert {"dice_liver", "hd95_aorta", "dice"} <= set(cli.model.metrics["val_metrics"].keys(keep_base=True))


def test_per_class_metric_names() -> None:
    assert metric_suffixes(4, ["background", "Left Kidney", "IVC", "portal vein/splenic vein"]) == [
        "left_kidney", "ivc", "portal_vein_splenic_vein"
    ]
    assert metric_suffixes(3, ["bg", "a", "A"]) == ["1", "2"]  # the same name twice once cleaned: indices
    assert metric_suffixes(3, None) == metric_suffixes(3, ["bg", "a"]) == ["1", "2"]


@pytest.mark.parametrize("size", [0, -2, "fast", 1.5])
def test_bad_sw_batch_size_is_named(size) -> None:
    with pytest.raises(ValueError, match="sw_batch_size must be 'auto' or a number of windows >= 1"):
        tiny_module(sw_batch_size=size)
