"""Checkpoint reading and key mapping: equality with timm after loading, clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from backbones import create_backbone
from backbones.weights import load_pretrained, read_checkpoint
from tasks.classification import ClassificationModule


@pytest.fixture(scope="module")
def timm_vit_s16(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    path = tmp_path_factory.mktemp("ckpt") / "vit_small_patch16_224.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.mark.slow
def test_timm_vit_s16_checkpoint_gives_timm_logits(timm_vit_s16) -> None:
    reference, path = timm_vit_s16
    ours = ClassificationModule(backbone="vit_small_patch16", num_classes=1000, pretrained=str(path)).eval()
    assert not ours.load_report.missing and not ours.load_report.unexpected
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        diff = (ours(x) - reference(x)).abs().max().item()
    assert diff <= 1e-4


def test_safetensors_and_wrapped_checkpoints_load_the_same(timm_vit_s16, tmp_path: Path) -> None:
    reference, _ = timm_vit_s16
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "wrapped.pth")
    for name in ("w.safetensors", "wrapped.pth"):
        loaded = read_checkpoint(tmp_path / name)
        assert loaded.keys() == state.keys()
        assert torch.equal(loaded["pos_embed"], state["pos_embed"])


def test_backbone_only_load_skips_classifier_and_resamples_positions(timm_vit_s16) -> None:
    reference, path = timm_vit_s16
    backbone = create_backbone("vit_small_patch16", img_size=96, pretrained=str(path))
    assert backbone.pos_embed.shape == (1, 1 + 36, 384)
    assert torch.equal(backbone.blocks[0].attn.qkv.weight, reference.blocks[0].attn.qkv.weight)
    report = load_pretrained(backbone, path)
    assert "backbone.pos_embed" in report.adapted and any(k.startswith("head.") for k in report.skipped)


def test_rgb_checkpoint_initialises_one_channel_3d_encoder(timm_vit_s16) -> None:
    _, path = timm_vit_s16
    model = create_backbone(
        "vit_small_patch16", spatial_dims=3, img_size=32, in_chans=1, class_token=False, pretrained=str(path)
    )
    assert model.patch_embed.proj.weight.shape == (384, 1, 16, 16, 16)
    assert model(torch.randn(1, 1, 32, 32, 32))[-1].shape == (1, 384, 2, 2, 2)


def test_fine_tuning_with_other_class_count_keeps_the_new_head(timm_vit_s16) -> None:
    _, path = timm_vit_s16
    module = ClassificationModule(backbone="vit_small_patch16", num_classes=7, pretrained=str(path))
    assert module.head.fc.weight.shape == (7, 384)
    assert any("head.fc.weight" in k for k in module.load_report.skipped)


def test_checkpoint_of_another_architecture_names_the_key(timm_vit_s16) -> None:
    _, path = timm_vit_s16
    with pytest.raises(ValueError, match=r"vit_small_patch16_224\.pth: tensor 'backbone\.cls_token' has shape"):
        create_backbone("vit_base_patch16", depth=2, pretrained=str(path))


def test_unreadable_missing_and_pickled_checkpoints_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_checkpoint(tmp_path / "nope.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint .*corrupt.pth"):
        read_checkpoint(corrupt)
    pickled = tmp_path / "pickled.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": Path("x")}, pickled)
    with pytest.raises(ValueError, match="weights_only"):
        read_checkpoint(pickled)
    unknown = tmp_path / "unknown.pth"
    torch.save({"foo.weight": torch.zeros(2)}, unknown)
    with pytest.raises(ValueError, match="no tensor that fits"):
        create_backbone("vit_tiny_patch16", depth=1, pretrained=str(unknown))


def test_timm_model_checkpoint_loads_into_timm_backbone(tmp_path: Path) -> None:
    """XCiT keeps its class-attention layers: the pooled features are the architecture's own."""
    reference = timm.create_model("xcit_tiny_12_p16_224", img_size=64).eval()
    torch.save(reference.state_dict(), tmp_path / "xcit.pth")
    module = ClassificationModule(
        backbone="timm:xcit_tiny_12_p16_224", backbone_kwargs={"img_size": 64}, num_classes=1000,
        pretrained=str(tmp_path / "xcit.pth"),
    ).eval()
    assert not module.load_report.missing
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (module(x) - reference(x)).abs().max() <= 1e-4


def test_smp_checkpoint_brings_its_align_corners_unless_the_config_sets_it(tmp_path: Path) -> None:
    """smp upsamples with align_corners=True: a module loading an smp file without the option set takes it, says so,
    and gives smp's outputs; an explicit value wins, and the report says it differs from the file's convention."""
    import segmentation_models_pytorch as smp

    from tasks.segmentation import SegmentationModule

    torch.manual_seed(0)
    reference = smp.Segformer(encoder_name="mit_b0", encoder_weights=None, classes=3).eval()
    torch.save(reference.state_dict(), tmp_path / "smp_segformer.pth")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x)
    taken = SegmentationModule(backbone="mit_b0", num_classes=3, pretrained=str(tmp_path / "smp_segformer.pth")).eval()
    assert taken.hparams.align_corners is True
    assert "align_corners=True taken from the segformer-smp checkpoint" in taken.load_report.summary()
    kept = SegmentationModule(
        backbone="mit_b0", num_classes=3, pretrained=str(tmp_path / "smp_segformer.pth"), align_corners=False
    ).eval()
    assert kept.hparams.align_corners is False
    assert "align_corners=False as set in the config, although segformer-smp checkpoints use" in kept.load_report.summary()
    with torch.no_grad():
        assert (taken(x) - expected).abs().max() <= 1e-4
        assert (kept(x) - expected).abs().max() > 1e-3
    assert SegmentationModule(backbone="mit_b0", num_classes=3).hparams.align_corners is False  # no file: ours
