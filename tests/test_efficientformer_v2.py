"""EfficientFormerV2: timm's checkpoints give timm's logits (the release's: test_release_formats), any input size,
the fused form."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from cli_runs import assert_trained

from backbones import create_backbone
from backbones.efficientformer_v2 import AttentionDownsample, TalkingHeadAttention
from backbones.weights import load_pretrained
from tasks.classification import ClassificationModule
from tasks.classification import main as classification_main
from tasks.segmentation import main as segmentation_main

PRESETS = ("efficientformerv2_s0", "efficientformerv2_s1", "efficientformerv2_s2", "efficientformerv2_l")
# timm's parameter counts with the 1000-class classifier and distillation classifier (the 3.60M ...),
# and without them (num_classes=0): our backbone's
TIMM_PARAMS = {
    "efficientformerv2_s0": (3_600_256, 3_246_256), "efficientformerv2_s1": (6_185_560, 5_735_560),
    "efficientformerv2_s2": (12_710_112, 12_132_112), "efficientformerv2_l": (26_322_288, 25_552_288),
}

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights far from the initial ones (layer scales 1e-5 make every block close to the identity), with
    activations staying of order one."""
    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        if name.endswith(("running_var", "bn.weight", "norm.weight")):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif name.endswith(("gamma", "layer_scale_1", "layer_scale_2")):
            t.copy_(torch.rand(t.shape, generator=g) * 0.4 + 0.1)
        elif name.endswith(("bias", "running_mean", "attention_biases")):
            t.copy_(torch.randn(t.shape, generator=g) * 0.2)


def timm_model(name: str, img_size: int, num_classes: int = 10) -> torch.nn.Module:
    model = timm.create_model(name, num_classes=num_classes, img_size=img_size)
    randomize(model)
    return model.eval()


@pytest.mark.parametrize("name", PRESETS)
def test_parameter_counts_equal_timms(name: str) -> None:
    with torch.device("meta"):
        ours = create_backbone(name)
        reference = timm.create_model(name, num_classes=0)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with_head, backbone = TIMM_PARAMS[name]
    assert count(ours) == count(reference) == backbone
    # the distilled classification head: two linear classifiers over the pooled features
    assert backbone + 2 * (ours.num_features * 1000 + 1000) == with_head
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_logits_equal_timms_after_loading_its_checkpoint(name: str, tmp_path: Path) -> None:
    reference = timm_model(name, img_size=128)
    path = tmp_path / "timm.pth"
    torch.save(reference.state_dict(), path)
    module = ClassificationModule(backbone=name, backbone_kwargs={"img_size": 128}, num_classes=10, pretrained=str(path))
    assert module.head.fc_dist is not None and module.head.pool == "native"
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        expected = reference(x)
        assert (module.eval()(x) - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())


def test_default_size_pooled_features_equal_timms_pre_logits(tmp_path: Path) -> None:
    reference = timm_model("efficientformerv2_s0", img_size=224)
    torch.save(reference.state_dict(), tmp_path / "s0.pth")
    ours = create_backbone("efficientformerv2_s0", pretrained=str(tmp_path / "s0.pth")).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(x), pre_logits=True)
        assert torch.allclose(ours.forward_pooled(x), expected, atol=1e-4)
        assert torch.allclose(ours(x)[-1].mean((2, 3)), expected, atol=1e-4)  # the last map is normed too


def test_bias_tables_of_another_grid_are_resampled_on_load(tmp_path: Path) -> None:
    torch.save(timm_model("efficientformerv2_s0", img_size=224).state_dict(), tmp_path / "s0.pth")
    report = load_pretrained(create_backbone("efficientformerv2_s0", img_size=128), tmp_path / "s0.pth")
    assert len(report.adapted) == 5 and all(k.endswith("attention_biases") for k in report.adapted)


@torch.no_grad()
def test_any_input_size_and_the_bias_tables_are_interpolated_not_cropped() -> None:
    model = create_backbone("efficientformerv2_s0").eval()
    randomize(model)
    for h, w in ((256, 256), (320, 448), (512, 512)):
        feats = model(torch.randn(1, 3, h, w))
        assert [tuple(f.shape) for f in feats] == [(1, c, h // s, w // s) for c, s in zip((32, 48, 96, 176), (4, 8, 16, 32))]
    attn = model.stages[2].blocks[-1].token_mixer
    down = model.stages[3].downsample.attn
    assert isinstance(attn, TalkingHeadAttention) and isinstance(down, AttentionDownsample)
    assert attn.table_grid == (7, 7) and down.table_grid == (14, 14)
    table = attn.attention_biases.reshape(8, 7, 7)
    for grid in ((16, 16), (10, 14), (2, 2)):  # 512², 320x448 and 64² inputs
        expected = F.interpolate(table[None], size=grid, mode="bicubic", align_corners=False)[0]
        assert torch.allclose(attn.bias_table(grid), expected.reshape(8, -1), atol=1e-6)
    assert torch.equal(attn.bias_table((7, 7)), attn.attention_biases)  # the trained grid: the table itself
    # entries follow |dy| * w + |dx|: query (0, 0) against key (1, 2) of a 10 x 14 grid
    bias = attn.attention_bias((10, 14))
    assert bias.shape == (8, 140, 140) and torch.equal(bias[:, 0, 1 * 14 + 2], attn.bias_table((10, 14))[:, 1 * 14 + 2])
    # a small grid still sees the far corner of the table, which cropping would drop
    before = attn.bias_table((2, 2)).clone()
    attn.attention_biases.reshape(8, 7, 7)[:, 6, 6] += 10.0
    assert (attn.bias_table((2, 2)) - before)[:, -1].abs().min() > 0.1
    assert down.attention_bias((32, 32), query_stride=2).shape == (8, 256, 1024)


def test_input_sides_must_be_multiples_of_32() -> None:
    model = create_backbone("efficientformerv2_s0")
    with pytest.raises(ValueError, match="multiple of 32"):
        model(torch.randn(1, 3, 100, 96))


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_fused_equals_unfused(name: str) -> None:
    model = create_backbone(name, img_size=64).eval()
    randomize(model, seed=1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats, pooled = model(x), model.forward_pooled(x)
        model.fuse()
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.stages.modules())
        x_cl = x.contiguous(memory_format=torch.channels_last)  # the layout the fused form runs in, not copied
        for a, b in zip(feats, model(x_cl)):  # every stage output whole, though blocks add residuals in place
            assert (a - b).abs().max() <= 1e-5 * max(1.0, a.abs().max().item())
        assert torch.equal(x_cl, x)
        assert (pooled - model.forward_pooled(x)).abs().max() <= 1e-5 * max(1.0, pooled.abs().max().item())
        block = model.stages[-1].blocks[-1]  # a block run on its own leaves its input alone
        h = torch.ones(2, block.mlp.fc1.conv.in_channels, 2, 2).contiguous(memory_format=torch.channels_last)
        block(h)
        assert (h == 1).all()
    # with autograd on, the fused form runs conv and GELU apart (the oneDNN post-op path is inference only)
    assert (model(x)[-1].detach() - feats[-1]).abs().max() <= 1e-5 * max(1.0, feats[-1].abs().max().item())
    with pytest.raises(RuntimeError, match="fused"):
        model.train()


def test_fused_network_follows_weights_loaded_after_it_ran() -> None:
    """The fused form keeps its convolution weights in oneDNN's layout after a first pass; new weights replace them."""
    a, b = (create_backbone("efficientformerv2_s0", img_size=64).eval() for _ in range(2))
    randomize(b, seed=2)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        a.fuse(), b.fuse()
        a(x), a(x)
        a.load_state_dict(b.state_dict())
        for fa, fb in zip(a(x), b(x)):
            assert torch.allclose(fa, fb, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_contract(name: str) -> None:
    model = create_backbone(name)
    assert [i.stride for i in model.feature_info] == [(4, 4), (8, 8), (16, 16), (32, 32)]
    x = torch.randn(2, 3, 64, 96)
    feats = model(x)
    for f, info in zip(feats, model.feature_info):
        assert f.shape == (2, info.channels, 64 // info.stride[0], 96 // info.stride[1]) and torch.isfinite(f).all()
    sum(f.square().mean() for f in feats).backward()
    biases = [m.attention_biases.grad for m in model.modules() if hasattr(m, "attention_biases")]
    assert biases and all(g is not None and g.abs().sum() > 0 for g in biases)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert {n for n in model.no_weight_decay()} == {n for n, _ in model.named_parameters() if "attention_biases" in n}


@pytest.mark.slow
def test_segmentation_and_classification_train(tmp_path: Path) -> None:
    cli = segmentation_main([
        "fit", "--config=configs/segformer_efficientformerv2_s0.yaml", "--trainer.fast_dev_run=1",
        "--data.synthetic_size=64", "--data.synthetic_train=2", "--data.synthetic_val=2", "--data.crop_size=[64, 64]",
        "--data.batch_size=2", "--data.val_batch_size=2", "--data.num_workers=0", f"--trainer.default_root_dir={tmp_path}",
    ])
    assert_trained(cli)
    cli = classification_main([
        "fit", "--config=configs/efficientformerv2_s0.yaml", "--model.backbone=efficientformerv2_s0",
        "--model.backbone_kwargs={img_size: 64}", "--trainer.fast_dev_run=1", "--data.num_workers=0",
        "--data.synthetic_train_per_class=4", "--data.batch_size=4", f"--trainer.default_root_dir={tmp_path}",
    ])
    assert_trained(cli)
