"""Classification: heads, optimisation recipe, ImageFolder data and its errors, the CLI end to end."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runs import assert_trained
from PIL import Image

from datamodules.classification import ClassificationDataModule
from datamodules.common import DataError
from engine.optimization import build_schedule
from tasks.classification import ClassificationModule, main

TINY_VIT = {"img_size": 32, "depth": 2, "embed_dim": 48, "num_heads": 2}


def tiny_module(**kwargs) -> ClassificationModule:
    defaults = dict(backbone="vit_tiny_patch16", backbone_kwargs=TINY_VIT, num_classes=5)
    return ClassificationModule(**{**defaults, **kwargs})


def test_vit_parameter_counts_match_the_paper_models() -> None:
    for backbone, millions in (("vit_small_patch16", 22.05), ("vit_base_patch16", 86.57)):
        with torch.device("meta"):  # shapes only: no time spent initialising 86M weights
            module = ClassificationModule(backbone=backbone, num_classes=1000)
        count = sum(p.numel() for p in module.parameters())
        assert round(count / 1e6, 2) == millions, count


@pytest.mark.parametrize("pool", ["cls", "avg", "map"])
def test_pooling_heads(pool: str) -> None:
    module = tiny_module(pool=pool)
    out = module(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 5)
    out.sum().backward()
    assert module.head.fc.weight.grad is not None


def test_native_pool_for_timm_and_avg_for_maps() -> None:
    module = ClassificationModule(backbone="timm:efficientformerv2_s0", backbone_kwargs={"img_size": 64}, num_classes=3)
    assert module.head.pool == "native" and module(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    module = ClassificationModule(
        backbone="timm:efficientformerv2_s0", backbone_kwargs={"img_size": 64}, num_classes=3, pool="avg"
    )
    assert module(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    with pytest.raises(ValueError, match="pool='cls' needs a token backbone"):
        ClassificationModule(backbone="timm:efficientformerv2_s0", num_classes=3, pool="cls")


def test_parameter_groups_exempt_norms_biases_and_embeddings() -> None:
    module = tiny_module(lr=1e-3, head_lr_mult=10.0, weight_decay=0.05, head_weight_decay=0.0)
    groups = {g["name"]: g for g in module.parameter_groups()}
    assert groups["backbone"]["weight_decay"] == 0.05 and groups["backbone_no_decay"]["weight_decay"] == 0.0
    assert groups["head"]["lr"] == pytest.approx(1e-2) and groups["head"]["weight_decay"] == 0.0
    no_decay = {id(p) for p in groups["backbone_no_decay"]["params"]}
    bb = module.backbone
    for p in (bb.pos_embed, bb.cls_token, bb.norm.weight, bb.blocks[0].attn.qkv.bias):
        assert id(p) in no_decay
    assert id(bb.blocks[0].attn.qkv.weight) not in no_decay
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(module.parameters()))


def test_frozen_backbone_trains_only_the_head() -> None:
    module = tiny_module(freeze_backbone=True)
    assert {g["name"] for g in module.parameter_groups()} == {"head", "head_no_decay"}


@pytest.mark.parametrize("schedule", ["cosine", "linear", "poly"])
def test_warmup_then_decay_to_zero(schedule: str) -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_schedule(opt, total_steps=100, warmup_steps=10, schedule=schedule, warmup_start_ratio=0.01)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.01)
    assert max(lrs) == pytest.approx(1.0) and lrs.index(max(lrs)) == 10
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)


def test_step_schedule_drops_at_milestones() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_schedule(opt, total_steps=30, warmup_steps=0, schedule="step", milestones=[10, 20], gamma=0.1)
    lrs = []
    for _ in range(30):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[9] == 1.0 and lrs[10] == pytest.approx(0.1) and lrs[20] == pytest.approx(0.01)


def test_label_smoothing_and_mixup_losses() -> None:
    module = tiny_module(label_smoothing=0.1)
    logits, target = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    expected = torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.1)
    assert torch.allclose(module.compute_loss(logits, target), expected)
    module = tiny_module(mixup_alpha=0.8, cutmix_alpha=1.0)
    batch = module.prepare_batch({"input": torch.randn(4, 3, 32, 32), "target": target}, "train")
    assert batch["loss_target"].shape == (4, 5) and torch.allclose(batch["loss_target"].sum(1), torch.ones(4))
    with pytest.raises(ValueError, match="even batch size"):
        module.prepare_batch({"input": torch.randn(3, 3, 32, 32), "target": target[:3]}, "train")


def write_image_folder(root: Path, classes=("a", "b"), per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")
    return root


def test_image_folder_datamodule_reads_classes_and_batches(tmp_path: Path) -> None:
    dm = ClassificationDataModule(str(write_image_folder(tmp_path)), image_size=32, batch_size=4, num_workers=0)
    assert dm.num_classes == 2 and dm.class_names == ["a", "b"]
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (4, 3, 32, 32) and batch["input"].dtype == torch.float32
    assert set(batch["target"].tolist()) <= {0, 1}


def test_unreadable_image_is_named_before_training(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path)
    bad = root / "train" / "b" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    dm = ClassificationDataModule(str(root), image_size=32, num_workers=0)
    with pytest.raises(DataError, match=r"(?s)unreadable image.*broken\.png: OSError"):
        dm.setup("fit")


def test_empty_class_folder_and_missing_root_are_named(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path)
    (root / "train" / "empty_class").mkdir()
    with pytest.raises(DataError, match=r"class folder .*empty_class holds no image files"):
        ClassificationDataModule(str(root), num_workers=0).setup("fit")
    with pytest.raises(DataError, match="image folder not found"):
        ClassificationDataModule(str(tmp_path / "missing"))


@pytest.mark.slow
def test_cli_fit_test_predict_end_to_end(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "data", classes=("cat", "dog", "owl"), per_class=4)
    common = [
        "--model.backbone=vit_tiny_patch16", "--model.backbone_kwargs={img_size: 32, depth: 1}",
        f"--data.root={root}", "--data.image_size=32", "--data.batch_size=4", "--data.num_workers=0",
        f"--trainer.default_root_dir={tmp_path / 'runs'}", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
    ]
    main(["fit", *common, "--trainer.max_epochs=1", "--trainer.enable_checkpointing=true"])
    ckpt = next((tmp_path / "runs").rglob("*.ckpt"))
    main(["test", *common, f"--ckpt_path={ckpt}"])
    out = tmp_path / "preds"
    main(["predict", *common, f"--ckpt_path={ckpt}", f"--predictions.output_dir={out}"])
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 12 and set(rows[0]) == {"path", "predicted_class", "probability"}
    assert {r["predicted_class"] for r in rows} <= {"cat", "dog", "owl"}
    assert all(0.0 < float(r["probability"]) <= 1.0 for r in rows)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in (root / "val").rglob("*.png"))


@pytest.mark.slow
def test_default_config_fast_dev_run_on_synthetic_shapes(tmp_path: Path) -> None:
    cli = main([
        "fit", "--config=configs/vit_small_patch16.yaml", "--trainer.fast_dev_run=2", "--data.num_workers=0",
        "--model.backbone_kwargs={img_size: 64, depth: 2}", f"--trainer.default_root_dir={tmp_path}",
        "--data.synthetic_train_per_class=8",
    ])
    assert_trained(cli)
