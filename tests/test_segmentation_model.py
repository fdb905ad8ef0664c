"""MiT presets, SegFormerHead, and equality with the reference implementations through our checkpoint loader."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from backbones import create_backbone
from backbones.mix_transformer import MixTransformer
from heads.segformer import SegFormerHead
from tasks.segmentation import SegmentationModule

smp = pytest.importorskip("segmentation_models_pytorch")

PRESETS = {  # widths, depths of the paper / NVlabs release; heads 1/2/5/8 and reductions 8/4/2/1 for all
    "mit_b0": ((32, 64, 160, 256), (2, 2, 2, 2)),
    "mit_b1": ((64, 128, 320, 512), (2, 2, 2, 2)),
    "mit_b2": ((64, 128, 320, 512), (3, 4, 6, 3)),
    "mit_b3": ((64, 128, 320, 512), (3, 4, 18, 3)),
    "mit_b4": ((64, 128, 320, 512), (3, 8, 27, 3)),
    "mit_b5": ((64, 128, 320, 512), (3, 6, 40, 3)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_mit_preset_shapes_and_strides(name: str) -> None:
    widths, depths = PRESETS[name]
    with torch.device("meta"):  # full-size presets without allocating or initialising their weights
        model = create_backbone(name).eval()
        feats = model(torch.empty(1, 3, 64, 96))
    assert [len(s.blocks) for s in model.stages] == list(depths)
    assert [s.blocks[0].attn.num_heads for s in model.stages] == [1, 2, 5, 8]
    assert [s.blocks[0].attn.sr_ratio for s in model.stages] == [8, 4, 2, 1]
    assert [(f.channels, f.stride) for f in model.feature_info] == [(w, (s, s)) for w, s in zip(widths, (4, 8, 16, 32))]
    assert [tuple(f.shape) for f in feats] == [(1, w, 64 // s, 96 // s) for w, s in zip(widths, (4, 8, 16, 32))]


def test_mit_b0_runs_and_trains() -> None:
    model = create_backbone("mit_b0")
    feats = model(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(2, w, 64 // s, 96 // s) for w, s in zip(PRESETS["mit_b0"][0], (4, 8, 16, 32))]
    sum(f.square().mean() for f in feats).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_mit_odd_sizes_out_indices_and_bad_arguments() -> None:
    model = create_backbone("mit_b0", out_indices=(1, 3)).eval()
    assert [f.stride for f in model.feature_info] == [(8, 8), (32, 32)]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 70, 45))  # stride-s maps have ceil(size / s) cells
    assert [tuple(f.shape[2:]) for f in feats] == [(9, 6), (3, 2)]
    with pytest.raises(TypeError, match="unknown arguments"):
        create_backbone("mit_b0", embed_dim=64)
    with pytest.raises(ValueError, match="4 entries"):
        MixTransformer(depths=(1, 1, 1))


def _random_smp(classes: int) -> torch.nn.Module:
    model = smp.Segformer(encoder_name="mit_b0", encoder_weights=None, classes=classes)
    for m in model.modules():  # non-trivial BatchNorm statistics, so the test sees them
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model.eval()


def test_smp_segformer_checkpoint_gives_the_same_logits(tmp_path: Path) -> None:
    ref = _random_smp(19)
    torch.save(ref.state_dict(), tmp_path / "smp.pth")
    ours = SegmentationModule(backbone="mit_b0", num_classes=19, pretrained=str(tmp_path / "smp.pth"), align_corners=True)
    assert ours.load_report.format == "segformer-smp" and not ours.load_report.missing
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = ref(x)
        got = ours.eval()(x)
        ours.head.fold_projections = False
        unfolded = ours(x)
    assert got.shape == expected.shape == (2, 19, 64, 96)
    assert (got - expected).abs().max() <= 1e-4
    assert (unfolded - expected).abs().max() <= 1e-4


def test_hugging_face_checkpoint_loads(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    ref = transformers.SegformerForSemanticSegmentation(transformers.SegformerConfig(num_labels=7)).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = ref(pixel_values=x).logits  # at 1/4 resolution
    for layout, state in (("transformers 5", ref.state_dict()), ("Hub", _hub_names(ref.state_dict()))):
        torch.save(state, tmp_path / "hf.bin")
        ours = SegmentationModule(backbone="mit_b0", num_classes=7, pretrained=str(tmp_path / "hf.bin")).eval()
        assert ours.load_report.format == "segformer-hf" and not ours.load_report.missing, layout
        with torch.no_grad():
            assert (ours.head(ours.backbone(x)) - expected).abs().max() <= 1e-4, layout


def _hub_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 names -> the names in the files on the Hub (``nvidia/segformer-b0-*``)."""
    rules = [(r"stages\.(\d)\.patch_embeddings\.", r"encoder.patch_embeddings.\1."),
             (r"stages\.(\d)\.blocks\.", r"encoder.block.\1."), (r"stages\.(\d)\.layer_norm\.", r"encoder.layer_norm.\1."),
             ("layernorm_before", "layer_norm_1"), ("layernorm_after", "layer_norm_2"),
             (r"attention\.q_proj", "attention.self.query"), (r"attention\.k_proj", "attention.self.key"),
             (r"attention\.v_proj", "attention.self.value"), (r"attention\.o_proj", "attention.output.dense"),
             (r"sequence_reduction\.sequence_reduction", "self.sr"), (r"sequence_reduction\.layer_norm", "self.layer_norm"),
             (r"mlp\.fc1", "mlp.dense1"), (r"mlp\.fc2", "mlp.dense2"), ("linear_projections", "linear_c")]
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def test_segformer_b0_parameter_count() -> None:
    """3,752,694 parameters with 150 classes, the same as smp's model. The paper's 3.8M counts the
    release's mmseg model, which also builds an unused ``conv_seg`` (128 -> 150, 19,350 parameters)."""
    count = sum(p.numel() for p in SegmentationModule(backbone="mit_b0", num_classes=150).parameters())
    reference = smp.Segformer(encoder_name="mit_b0", encoder_weights=None, classes=150)
    assert count == sum(p.numel() for p in reference.parameters()) == 3_752_694
    assert abs(count + 128 * 150 + 150 - 3.8e6) / 3.8e6 < 0.01


def test_head_serves_other_backbones() -> None:
    head = SegFormerHead([48, 48, 48], 5, embed_dim=32).eval()  # a plain ViT: every map at one stride
    feats = [torch.randn(2, 48, 4, 6) for _ in range(3)]
    assert head(feats).shape == (2, 5, 4, 6)
    module = SegmentationModule(
        backbone="vit_tiny_patch16", backbone_kwargs={"img_size": 64, "depth": 2, "out_indices": (0, 1)},
        num_classes=4, decoder_dim=32,
    )
    assert module(torch.randn(2, 3, 64, 64)).shape == (2, 4, 64, 64)
    hierarchical = SegmentationModule(
        backbone="timm:efficientformerv2_s0", backbone_kwargs={"img_size": 64}, num_classes=4, decoder_dim=32
    )
    assert [f.stride for f in hierarchical.backbone.feature_info] == [(4, 4), (8, 8), (16, 16), (32, 32)]
    assert hierarchical(torch.randn(2, 3, 64, 64)).shape == (2, 4, 64, 64)


def test_folded_and_plain_decoder_agree_in_training() -> None:
    head = SegFormerHead([8, 16, 32], 3, embed_dim=16, dropout=0.0)
    feats = [torch.randn(2, c, s, s) for c, s in ((8, 16), (16, 8), (32, 4))]
    out_folded = head(feats)
    grads_folded = torch.autograd.grad(out_folded.square().sum(), list(head.parameters()))
    head.fold_projections = False
    out_plain = head(feats)
    grads_plain = torch.autograd.grad(out_plain.square().sum(), list(head.parameters()))
    assert torch.allclose(out_folded, out_plain, atol=1e-5)
    for a, b in zip(grads_folded, grads_plain):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
