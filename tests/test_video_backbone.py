"""The video ViT (TimeSformer): sizes, shapes, inflation from an image ViT (release .pyth files: test_release_formats)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backbones import create_backbone
from backbones.vit import VisionTransformer
from tasks.video import VideoClassificationModule

TINY = dict(embed_dim=32, depth=2, num_heads=2)


def video_module(attention: str = "divided", num_classes: int = 5, **kw) -> VideoClassificationModule:
    kwargs = dict(TINY, attention=attention) | kw.pop("backbone_kwargs", {})
    return VideoClassificationModule(
        backbone="timesformer_nano_patch8", backbone_kwargs=kwargs, num_classes=num_classes, **kw
    ).eval()


def randomise(module: nn.Module, std: float = 0.1) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)
    return module


def moving_clip(frames: int = 8, size: int = 32) -> torch.Tensor:
    """A bright square crossing a noisy frame from left to right: ``[1, 3, T, size, size]``."""
    torch.manual_seed(1)
    clip = torch.randn(1, 3, frames, size, size) * 0.1
    for t in range(frames):
        x0 = 2 + t * (size - 12) // max(frames - 1, 1)
        clip[:, :, t, 10:20, x0 : x0 + 10] += 2.0
    return clip


def test_timesformer_base_has_the_paper_size() -> None:
    with torch.device("meta"):
        model = create_backbone("timesformer_base_patch16")
    params = sum(p.numel() for p in model.parameters()) + 768 * 400 + 400  # with a 400-class classifier
    assert params == 121_566_352
    assert abs(params / 121.4e6 - 1) < 0.01
    assert model.feature_info[0].stride == (1, 16, 16) and model.grid == (8, 14, 14)
    assert model.pos_embed.shape == (1, 197, 768) and model.time_embed.shape == (1, 8, 768)


@pytest.mark.parametrize("attention", ["divided", "joint", "space_only"])
@pytest.mark.parametrize("frames,size", [(8, 32), (4, 48), (16, 24), (1, 32)])
def test_shapes_for_several_lengths_and_sizes(attention: str, frames: int, size: int) -> None:
    model = create_backbone("timesformer_nano_patch8", **TINY, attention=attention, out_indices=(0, 1)).eval()
    x = torch.randn(2, 3, frames, size, size)
    maps = model(x)
    assert [m.shape for m in maps] == [(2, 32, frames, size // 8, size // 8)] * 2
    assert [(i.channels, i.stride) for i in model.feature_info] == [(32, (1, 8, 8))] * 2
    tokens = model.forward_tokens(x)
    assert tokens.shape == (2, 1 + frames * (size // 8) ** 2, 32) and torch.isfinite(tokens).all()
    tokens.mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "temporal_fc" not in n)


def test_video_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="num_frames"):
        VisionTransformer(attention="divided")
    with pytest.raises(ValueError, match="spatial_dims=3"):
        VisionTransformer(num_frames=8)
    with pytest.raises(TypeError, match="unknown arguments"):
        create_backbone("timesformer_base_patch16", frames=8)
    model = create_backbone("timesformer_nano_patch8", **TINY)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 3, 8, 30, 32))


@pytest.fixture(scope="module")
def image_vit_file(tmp_path_factory: pytest.TempPathFactory):
    """A timm image ViT with random weights (biases and norms too), saved like a timm checkpoint."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    torch.manual_seed(0)
    ref = randomise(TimmViT(img_size=32, patch_size=8, num_classes=5, **TINY), 0.05).eval()
    path = tmp_path_factory.mktemp("weights") / "vit_image.pth"
    torch.save(ref.state_dict(), path)
    return ref, path


@pytest.mark.parametrize("attention", ["divided", "space_only"])  # joint: the class key competes with T copies
def test_inflated_model_scores_static_clip_like_the_image_model(image_vit_file, attention: str) -> None:
    ref, path = image_vit_file
    module = video_module(attention, pretrained=str(path))
    image = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = ref(image)
        for frames in (8, 3):
            clip = image[:, :, None].expand(-1, -1, frames, -1, -1)  # T identical frames
            torch.testing.assert_close(module(clip), expected, atol=1e-4, rtol=1e-4)


def test_inflation_initialises_temporal_parts_like_the_paper(image_vit_file) -> None:
    ref, path = image_vit_file
    module = video_module("divided", pretrained=str(path))
    block = module.backbone.blocks[1]
    assert torch.equal(block.temporal_attn.qkv.weight, ref.blocks[1].attn.qkv.weight)
    assert torch.equal(block.temporal_norm1.weight, ref.blocks[1].norm1.weight)
    assert not block.temporal_fc.weight.any() and not block.temporal_fc.bias.any()
    assert not module.backbone.time_embed.any()
    assert torch.equal(module.head.fc.weight, ref.head.weight)
    assert any("(derived)" in key for key in module.load_report.adapted)


def test_divided_attention_sees_order_space_only_does_not() -> None:
    torch.manual_seed(0)
    divided = randomise(create_backbone("timesformer_nano_patch8", **TINY, attention="divided")).eval()
    space_only = create_backbone("timesformer_nano_patch8", **TINY, attention="space_only").eval()
    space_only.load_state_dict(divided.state_dict(), strict=False)  # the same spatial weights
    clip = moving_clip()
    with torch.no_grad():
        d, s = divided.forward_tokens(clip)[:, 0], space_only.forward_tokens(clip)[:, 0]
        assert (d - s).abs().max() > 1e-2
        # a clip played backwards moves the other way: only a model with temporal attention can tell
        reverse = clip.flip(2)
        torch.testing.assert_close(space_only.forward_tokens(reverse)[:, 0], s, atol=1e-5, rtol=1e-5)
        assert (divided.forward_tokens(reverse)[:, 0] - d).abs().max() > 1e-2


def test_time_and_space_embeddings_adapt_to_a_checkpoint_of_another_size(tmp_path) -> None:
    torch.manual_seed(0)
    source = video_module("divided")
    randomise(source.backbone)
    path = tmp_path / "video8.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)
    target = video_module("divided", backbone_kwargs={"num_frames": 16, "img_size": 48}, pretrained=str(path))
    assert target.backbone.time_embed.shape == (1, 16, 32) and target.backbone.pos_embed.shape == (1, 37, 32)
    assert {"backbone.time_embed", "backbone.pos_embed"} <= set(target.load_report.adapted)
    ends = target.backbone.time_embed[0, [0, -1]]
    torch.testing.assert_close(ends, source.backbone.time_embed[0, [0, -1]], atol=0.05, rtol=0)


def test_volume_vit_of_the_medical_task_is_unchanged(tmp_path) -> None:
    model = VisionTransformer(
        img_size=32, patch_size=16, spatial_dims=3, class_token=False, qkv_bias=False, norm_eps=1e-5,
        embed_dim=32, depth=4, num_heads=2, out_indices=(0, 1, 2, 3),
    )
    maps = model(torch.randn(1, 3, 32, 32, 32))
    assert [m.shape for m in maps] == [(1, 32, 2, 2, 2)] * 4 and model.time_embed is None
    flat = torch.randn(1, 1 + 4, 32)  # a 2-D class-token ViT's 2x2 grid is repeated over depth
    adapted = model.adapt_checkpoint_tensor("pos_embed", flat)
    torch.testing.assert_close(adapted, flat[:, 1:].repeat(1, 2, 1))
