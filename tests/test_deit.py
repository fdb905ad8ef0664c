"""DeiT's distillation token (Touvron et al., 2021): our ViT against timm's ``VisionTransformerDistilled``."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from backbones import create_backbone

from backbones import list_backbones
from backbones import vit as vit_module
from backbones.layers import resample_pos_embed
from backbones.weights import load_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64


def perturbed(model: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """Random weights away from the initial zeros and ones, so every tensor matters in a comparison."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def timm_deit(img_size: int = SIZE, num_classes: int = 10) -> torch.nn.Module:
    model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=img_size, num_classes=num_classes)
    return perturbed(model).eval()


@pytest.fixture(scope="module")
def deit_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = timm_deit()
    path = tmp_path_factory.mktemp("deit") / "deit_tiny_distilled.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_distillation_token_is_a_second_prefix_token() -> None:
    vit = create_backbone("vit_tiny_patch16", distilled=True, img_size=SIZE, depth=1)
    assert vit.distilled and vit.num_prefix_tokens == 2 and vit.default_pool == "cls"
    assert vit.dist_token.shape == (1, 1, 192) and vit.pos_embed.shape == (1, 2 + 16, 192)
    assert "dist_token" in vit.no_weight_decay()
    assert 0.01 < vit.dist_token.std().item() < 0.03  # timm: trunc_normal_(std=0.02)
    x = torch.randn(2, 3, SIZE, SIZE)
    assert vit.forward_tokens(x).shape == (2, 18, 192)
    assert vit(x)[0].shape == (2, 192, 4, 4)


@pytest.mark.parametrize("name", [n for n in list_backbones() if n.startswith("vit_") and hasattr(vit_module, n)])
def test_every_vit_preset_takes_distilled(name: str) -> None:
    with torch.device("meta"):  # the giant presets too; only the construction is checked
        vit = create_backbone(name, distilled=True, class_token=True, img_size=56 if "patch14" in name else SIZE, depth=1)
    assert vit.num_prefix_tokens == 2 and vit.dist_token is not None


def test_distilled_needs_a_class_token() -> None:
    with pytest.raises(ValueError, match="class_token"):
        create_backbone("vit_tiny_patch16", distilled=True, class_token=False)


@pytest.mark.parametrize("attention", ["joint", "divided", "space_only"])
def test_distilled_video_vit(attention: str) -> None:
    vit = create_backbone("timesformer_nano_patch8", distilled=True, num_frames=2, depth=1, attention=attention)
    x = torch.randn(2, 3, 2, 32, 32)
    assert vit.forward_tokens(x).shape == (2, 2 + 2 * 16, 96)
    assert vit(x)[0].shape == (2, 96, 2, 4, 4)


def test_timm_deit_checkpoint_loads_and_gives_timm_features(deit_file) -> None:
    reference, path = deit_file
    ours = create_backbone("vit_tiny_patch16", distilled=True, img_size=SIZE, pretrained=str(path)).eval()
    report = load_pretrained(ours, path)
    assert not report.missing and not report.unexpected and not report.adapted
    assert {"head.fc_dist.weight", "head.fc_dist.bias"} <= set(report.skipped)  # a bare backbone has no head
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_tokens(x), reference.forward_features(x), atol=1e-5, rtol=1e-5)


def test_classification_logits_equal_timm_deit(deit_file) -> None:
    from tasks.classification import ClassificationModule

    reference, path = deit_file
    module = ClassificationModule(
        backbone="vit_tiny_patch16", backbone_kwargs={"distilled": True, "img_size": SIZE}, num_classes=10,
        pretrained=str(path),
    ).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference(x), atol=1e-5, rtol=1e-5)


def test_deit_position_embedding_adapts_to_another_size(tmp_path) -> None:
    source = timm_deit(img_size=32)
    path = tmp_path / "deit32.pth"
    torch.save(source.state_dict(), path)
    ours = create_backbone("vit_tiny_patch16", distilled=True, img_size=SIZE, depth=12)
    report = load_pretrained(ours, path)
    assert "backbone.pos_embed" in report.adapted and not report.missing
    expected = resample_pos_embed(source.pos_embed.detach(), (2, 2), (4, 4), num_prefix_tokens=2)
    torch.testing.assert_close(ours.pos_embed.detach(), expected)


def test_prefix_slots_between_plain_and_distilled_checkpoints(tmp_path) -> None:
    """A ViT checkpoint (class slot only) into a distilled model: the distillation slot starts at zero; a
    DeiT checkpoint into a plain ViT: its distillation token and slot are left out."""
    plain = perturbed(timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10))
    torch.save(plain.state_dict(), tmp_path / "vit.pth")
    distilled = create_backbone("vit_tiny_patch16", distilled=True, img_size=SIZE)
    report = load_pretrained(distilled, tmp_path / "vit.pth")
    assert report.missing == ["dist_token"]
    torch.testing.assert_close(distilled.pos_embed[:, 0].detach(), plain.pos_embed[:, 0].detach())
    assert not distilled.pos_embed[:, 1].any()

    deit = timm_deit(img_size=32)
    torch.save(deit.state_dict(), tmp_path / "deit.pth")
    vit = create_backbone("vit_tiny_patch16", img_size=SIZE)
    report = load_pretrained(vit, tmp_path / "deit.pth")
    assert report.unexpected == ["backbone.dist_token"] and not report.missing
    torch.testing.assert_close(vit.pos_embed[:, 0].detach(), deit.pos_embed[:, 0].detach())
    expected = resample_pos_embed(deit.pos_embed[:, 2:].detach(), (2, 2), (4, 4))
    torch.testing.assert_close(vit.pos_embed[:, 1:].detach(), expected)
