"""Hugging Face transformers checkpoints of ViT, DeiT, TimeSformer and SegFormer load and give transformers' outputs.

Each reference model is tiny and random, saved both as ``save_pretrained`` writes it (the names of the files on
the Hub) and as transformers 5's ``state_dict()`` names, and loaded through our loader.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from backbones import create_backbone
from backbones.weights import load_pretrained
from tasks.classification import ClassificationModule
from tasks.video import VideoClassificationModule

transformers = pytest.importorskip("transformers")

VIT = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
       "intermediate_size": 64}
OURS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "norm_eps": 1e-12}


def randomise(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module.eval()


def saved_both_ways(model: nn.Module, folder: Path) -> dict[str, Path]:
    """The Hub's layout (``save_pretrained``: ``model.safetensors``) and transformers 5's ``state_dict()`` names."""
    model.save_pretrained(folder / "hub")
    torch.save(model.state_dict(), folder / "state_dict.bin")
    return {"hub": folder / "hub" / "model.safetensors", "transformers 5": folder / "state_dict.bin"}


@pytest.mark.parametrize(
    ("reference_class", "config_class", "distilled"),
    [("ViTForImageClassification", "ViTConfig", False), ("DeiTForImageClassificationWithTeacher", "DeiTConfig", True)],
)
def test_image_classifiers_give_transformers_logits(tmp_path: Path, reference_class: str, config_class: str, distilled: bool) -> None:
    config = getattr(transformers, config_class)(**VIT, num_labels=5)
    reference = randomise(getattr(transformers, reference_class)(config))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference(pixel_values=x).logits
    for layout, path in saved_both_ways(reference, tmp_path).items():
        ours = ClassificationModule(
            backbone="vit_tiny_patch16", backbone_kwargs=OURS | {"distilled": distilled}, num_classes=5, pretrained=str(path)
        ).eval()
        report = ours.load_report
        assert report.format == "hf-vit" and not report.missing and not report.unexpected, (layout, report.summary())
        with torch.no_grad():
            torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-4, msg=layout)


def test_vit_model_into_a_bare_backbone(tmp_path: Path) -> None:
    """``ViTModel`` (no prefix, a pooler our heads do not have): the tokens after the final norm are transformers'."""
    reference = randomise(transformers.ViTModel(transformers.ViTConfig(**VIT)))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference(pixel_values=x).last_hidden_state
    for layout, path in saved_both_ways(reference, tmp_path).items():
        backbone = create_backbone("vit_tiny_patch16", **OURS)
        report = load_pretrained(backbone, path)
        assert not report.missing and any(k.startswith("pooler.dense") for k in report.skipped), layout
        with torch.no_grad():
            torch.testing.assert_close(backbone.eval().forward_tokens(x), expected, atol=1e-5, rtol=1e-4, msg=layout)


@pytest.mark.parametrize("attention", ["divided_space_time", "joint_space_time"])
def test_timesformer_for_video_classification_gives_transformers_logits(tmp_path: Path, attention: str) -> None:
    config = transformers.TimesformerConfig(
        image_size=32, patch_size=8, num_frames=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=7, attention_type=attention,
    )
    reference = randomise(transformers.TimesformerForVideoClassification(config))
    clip = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        expected = reference(pixel_values=clip.transpose(1, 2)).logits  # transformers takes [B, T, C, H, W]
    for layout, path in saved_both_ways(reference, tmp_path).items():
        ours = VideoClassificationModule(
            backbone="timesformer_nano_patch8", num_classes=7, pretrained=str(path),
            backbone_kwargs={"num_frames": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0,
                             "attention": attention.split("_")[0]},
        ).eval()
        report = ours.load_report
        assert report.format == "hf-timesformer" and not report.missing and not report.unexpected, (layout, report.summary())
        with torch.no_grad():
            torch.testing.assert_close(ours(clip), expected, atol=1e-5, rtol=1e-4, msg=layout)


def test_segformer_model_encoder_into_mit(tmp_path: Path) -> None:
    """``SegformerModel`` (the encoder alone, names without ``segformer.``) into ``mit_b0``."""
    config = transformers.SegformerConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 2])
    reference = randomise(transformers.SegformerModel(config))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference(pixel_values=x, output_hidden_states=True).hidden_states
    for layout, path in saved_both_ways(reference, tmp_path).items():
        backbone = create_backbone("mit_b0", embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 2))
        report = load_pretrained(backbone, path)
        assert report.format == "segformer-hf" and not report.missing and not report.unexpected, (layout, report.summary())
        with torch.no_grad():
            for ours, theirs in zip(backbone.eval()(x), expected, strict=True):
                torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4, msg=layout)
