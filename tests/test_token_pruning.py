"""DynamicViT token pruning: exactness against the dense model, masked training = gathered inference, the compute
it saves, its losses and optimisation recipe in the task, token maps, and the errors that name the option."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from backbones import create_backbone
from backbones.token_pruning import DynamicViT, default_prune_at
from backbones.vit import VisionTransformer
from datamodules.classification import ClassificationDataModule
from tasks.classification import ClassificationModule
from tasks.segmentation import SegmentationModule
from tasks.video import VideoClassificationModule

from cli_runs import read_metrics, write_shapes

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"img_size": 32, "depth": 4, "embed_dim": 48, "num_heads": 2, "patch_size": 4}  # 64 patch tokens
NANO_VIDEO = {"depth": 4, "embed_dim": 48, "num_heads": 2}


def tiny(**kwargs) -> ClassificationModule:
    options = {"backbone": "vit_tiny_patch16", "backbone_kwargs": TINY, "num_classes": 3}
    return ClassificationModule(**{**options, **kwargs})


def tiny_video(attention: str, **kwargs) -> VideoClassificationModule:
    options = {"backbone": "timesformer_nano_patch8", "backbone_kwargs": {**NANO_VIDEO, "attention": attention}, "num_classes": 3}
    return VideoClassificationModule(**{**options, **kwargs})


def decisive(module: ClassificationModule) -> ClassificationModule:
    """Spread the keep scores of freshly initialised predictors, so no near-tie decides a top-k."""
    with torch.no_grad():
        for predictor in module.backbone.predictors:
            predictor.score[4].weight.mul_(100.0)
    return module


def as_dense(pruned: ClassificationModule, **kwargs) -> ClassificationModule:
    """The same network without token pruning (the predictors' weights left out)."""
    dense = type(pruned)(**{**dict(pruned.hparams), "token_pruning": False, **kwargs})
    dense.load_state_dict({k: v for k, v in pruned.state_dict().items() if ".predictors." not in k})
    return dense.eval()


@pytest.mark.parametrize("case", ["image_cls", "image_avg", "deit", "video_joint", "video_divided"])
def test_keep_ratio_one_gives_the_dense_logits(case: str) -> None:
    if case.startswith("video"):
        module, x = tiny_video(case.removeprefix("video_"), token_pruning=True, keep_ratio=1.0), torch.randn(2, 3, 8, 32, 32)
    else:
        kwargs = {"image_avg": {"pool": "avg"}, "deit": {"backbone_kwargs": {**TINY, "distilled": True}}}.get(case, {})
        module, x = tiny(token_pruning=True, keep_ratio=1.0, **kwargs), torch.randn(2, 3, 32, 32)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(x), as_dense(module)(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["image_cls", "image_avg", "deit", "video_joint", "video_divided"])
def test_masked_forward_equals_gathered_forward(case: str) -> None:
    """With the decisions fixed (top-k of the keep scores), training's masked forward and inference's gathered one
    give the same class logits."""
    if case.startswith("video"):
        module, x = tiny_video(case.removeprefix("video_"), token_pruning=True, keep_ratio=0.6), torch.randn(2, 3, 8, 32, 32)
    else:
        kwargs = {"image_avg": {"pool": "avg"}, "deit": {"backbone_kwargs": {**TINY, "distilled": True}}}.get(case, {})
        module, x = tiny(token_pruning=True, keep_ratio=0.5, **kwargs), torch.randn(2, 3, 32, 32)
    decisive(module).eval()
    backbone = module.backbone
    with torch.no_grad():
        masked_tokens = backbone.forward_pruned(x, masked=True, sample=False)
        masked = module.head(masked_tokens, backbone.token_weights)
        masked_kept = backbone.kept_units
        gathered_tokens = backbone.forward_pruned(x, masked=False, sample=False)
        gathered = module.head(gathered_tokens)
    assert gathered_tokens.shape[1] < masked_tokens.shape[1]
    assert all(torch.equal(a, b) for a, b in zip(masked_kept, backbone.kept_units))
    torch.testing.assert_close(masked, gathered, atol=1e-4, rtol=0)
    torch.testing.assert_close(module(x), gathered)  # eval mode gathers


def test_divided_attention_prunes_whole_positions_and_joint_all_tokens() -> None:
    x = torch.randn(2, 3, 8, 32, 32)  # 8 frames of a 4x4 grid
    for attention, units in (("divided", 16), ("joint", 128)):
        module = tiny_video(attention, token_pruning=True, keep_ratio=0.5).eval()
        with torch.no_grad():
            tokens = module.backbone.forward_tokens(x)
        kept = module.backbone.keep_counts(units)[-1]
        assert module.backbone.kept_units[-1].shape == (2, units)
        assert tokens.shape[1] == 1 + (8 * kept if attention == "divided" else kept)


def test_inference_flops_fall_by_the_expected_fraction() -> None:
    """ViT-S/16 at 224², rho 0.7 at blocks 3, 6, 9: 197 -> 138 -> 97 -> 68 tokens, 35.2 % less compute than the
    dense model with the predictors counted (the paper: 37 %, 4.6 -> 2.9 GFLOPs). Counted on the meta device, where
    FlopCounterMode sees attention too (on CPU it misses the fused attention kernel: 33.6 % there)."""
    with torch.device("meta"):
        module = ClassificationModule(backbone="vit_small_patch16", num_classes=1000, token_pruning=True).eval()
        x = torch.randn(1, 3, 224, 224)
    backbone = module.backbone

    def count(fn) -> float:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn(x)
        return counter.get_total_flops()

    dense = count(lambda x: module.head(VisionTransformer.forward_tokens(backbone, x)))
    pruned = count(module)
    c = 384
    tokens = [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3
    predictors = sum(2 * n * (c * c + c * c // 2 + c // 2 * c // 4 + c // 4 * 2) for n in (196, 137, 96))
    fixed = 2 * 196 * c * 768 + 2 * c * 1000  # patch embedding, classifier

    def block(n: int) -> int:
        return 24 * n * c * c + 4 * n * n * c  # projections and MLP, then q·k and attn·v

    expected = 1 - (sum(block(n) for n in tokens) + predictors + fixed) / (12 * block(197) + fixed)
    reduction = 1 - pruned / dense
    assert backbone.keep_counts(196) == [137, 96, 67]
    assert reduction == pytest.approx(expected, abs=0.005) and 0.31 <= reduction <= 0.37, (reduction, expected)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes"), train_per_class=4, val_per_class=2)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dense tiny classifier's state dict: the teacher, and the weights the pruned student starts from."""
    path = tmp_path_factory.mktemp("teacher") / "dense.pth"
    torch.save(tiny().state_dict(), path)
    return path


@pytest.mark.slow
def test_training_losses_logged_and_the_recipe_holds_the_pretrained_network(shapes: Path, teacher_file: Path, tmp_path: Path) -> None:
    module = tiny(
        token_pruning=True, keep_ratio=0.5, pretrained=str(teacher_file), teacher="vit_tiny_patch16", teacher_kwargs=TINY,
        teacher_pretrained=str(teacher_file), distillation="kl", pretrained_lr_mult=0.01, pretrained_frozen_epochs=1,
        lr=1e-2, warmup_steps=0,
    )
    groups = {g["name"]: g for g in module.parameter_groups()}
    assert groups["predictors"]["lr"] == 1e-2 and groups["backbone"]["lr"] == pytest.approx(1e-4)
    assert groups["backbone"]["frozen_epochs"] == 1 and "frozen_epochs" not in groups["predictors"]
    trained = {id(p) for g in groups.values() for p in g["params"]}
    bb = module.backbone
    assert not any(id(p) in trained for p in (bb.cls_token, bb.pos_embed))
    assert module.task_loss_weight("train") == 1.0  # DynamicViT adds its terms to the full cross-entropy

    before = {k: v.clone() for k, v in module.state_dict().items()}
    data = ClassificationDataModule(str(shapes), image_size=32, batch_size=4, num_workers=0)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, enable_progress_bar=False, enable_model_summary=False, logger=L.pytorch.loggers.CSVLogger(tmp_path),
        log_every_n_steps=1, limit_val_batches=1, default_root_dir=tmp_path, num_sanity_val_steps=0,
    )
    trainer.fit(module, data)
    rows = read_metrics(tmp_path)
    for name in ("loss_keep_ratio", "loss_distill", "loss_token_distill", "kept_fraction_0", "kept_fraction_2"):
        assert any(f"train/{name}_step" in r for r in rows), name
    assert any("val/top1" in r for r in rows)
    after = module.state_dict()
    assert torch.equal(after["backbone.blocks.0.attn.qkv.weight"], before["backbone.blocks.0.attn.qkv.weight"])
    assert torch.equal(after["head.fc.weight"], before["head.fc.weight"])
    assert not torch.equal(after["backbone.predictors.0.score.4.weight"], before["backbone.predictors.0.score.4.weight"])


def test_keep_ratio_loss_is_the_release_one() -> None:
    module = tiny(token_pruning=True, keep_ratio=0.5).train()
    module(torch.randn(4, 3, 32, 32))
    losses = module.backbone.pop_auxiliary_losses()
    assert losses["keep_ratio"].weight == 2.0
    decisions = [torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]), torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0] * 4])]
    expected = ((0.0 + 0.25) / 2 + (0.0 + 0.0625) / 2) / 2  # targets 0.5 and 0.25
    assert module.backbone.keep_ratio_loss(decisions).item() == pytest.approx(expected)


def test_predictors_start_at_the_keep_ratio_targets() -> None:
    torch.manual_seed(0)
    module = tiny(token_pruning=True, keep_ratio=0.7).train()
    module(torch.randn(32, 3, 32, 32))
    kept = [k.float().mean().item() for k in module.backbone.kept_units]
    assert kept == pytest.approx([0.7, 0.49, 0.343], abs=0.03)


@pytest.mark.slow
def test_keep_ratio_loss_reaches_its_targets_against_a_dense_teacher(tmp_path: Path) -> None:
    """From the release's start (every unit kept with probability 0.5), the training objective (cross-entropy, keep
    ratio, KL and token MSE to the dense teacher) on a learnable task brings each stage to rho^s, with attention as
    peaked as a trained ViT's: there the release's policy softmax let the other terms drown the keep-ratio loss."""
    torch.manual_seed(0)
    dense = tiny()
    with torch.no_grad():
        for block in dense.backbone.blocks:
            block.attn.qkv.weight[: 2 * TINY["embed_dim"]].mul_(16.0)  # queries and keys: peaked attention
    torch.save(dense.state_dict(), tmp_path / "dense.pth")
    teacher = {"teacher": "vit_tiny_patch16", "teacher_kwargs": TINY, "teacher_pretrained": str(tmp_path / "dense.pth")}
    module = tiny(token_pruning=True, keep_ratio=0.7, pretrained=str(tmp_path / "dense.pth"), distillation="kl", **teacher)
    for predictor in module.backbone.predictors:
        torch.nn.init.zeros_(predictor.score[-2].bias)
    optimizer = torch.optim.AdamW(module.train().parameters(), lr=1e-2)
    generator, kept = torch.Generator().manual_seed(0), []
    for _ in range(30):
        x = torch.randn(16, 3, 32, 32, generator=generator)
        y = (x[:, 0, :16].mean((1, 2)) > 0).long()  # the class: the sign of the top half's mean
        module.step_outputs({"input": x, "target": y}, "train")["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        kept.append([k.float().mean().item() for k in module.backbone.kept_units])
    assert torch.tensor(kept[-5:]).mean(0).tolist() == pytest.approx([0.7, 0.49, 0.343], abs=0.04)


def test_predict_writes_token_maps(tmp_path: Path) -> None:
    module = tiny(token_pruning=True, save_token_maps=True).eval()
    module.predict_output_dir = tmp_path
    batch = {"input": torch.randn(2, 3, 32, 32), "index": torch.tensor([0, 1]), "path": ["a/cat.png", "b/dog.png"]}
    with torch.no_grad():
        rows = module.predict_step(batch, 0)
    assert [Path(r["token_map"]).name for r in rows] == ["0_cat.png", "1_dog.png"]
    stages = len(default_prune_at(TINY["depth"]))
    with Image.open(rows[0]["token_map"]) as picture:
        assert picture.height == 32 and picture.width > 32 * (stages + 1)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"keep_ratio": 0.0}, "keep_ratio must be in"), ({"keep_ratio": 1.5}, "keep_ratio must be in"),
        ({"prune_at": (2, 4)}, r"prune_at must be .* \(depth 4\)"), ({"prune_at": (3, 1)}, "prune_at must be"),
        ({"backbone": "mit_b0", "backbone_kwargs": {}}, "token_pruning needs a ViT backbone"),
        ({"pool": "map"}, "token_pruning with pool='map'"), ({"freeze_backbone": True}, "freeze_backbone"),
        ({"teacher": "timm:resnet18", "distillation": "kl"}, "the teacher must be one of our ViTs"),
    ],
)
def test_bad_options_are_named(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny(token_pruning=True, **options)


def test_options_that_need_token_pruning_are_named() -> None:
    with pytest.raises(ValueError, match="need token_pruning"):
        tiny(save_token_maps=True)


def test_dense_map_tasks_refuse_a_pruned_backbone() -> None:
    module = SegmentationModule(backbone="vit_tiny_patch16", backbone_kwargs=TINY, num_classes=3, decoder_dim=16)
    DynamicViT.from_vit(module.backbone)
    with pytest.raises(ValueError, match="token pruning .* has no dense feature maps"):
        module(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="space_only"):
        DynamicViT.from_vit(create_backbone("timesformer_nano_patch8", attention="space_only"))
