"""The backbone contract, checked on every registered preset at tiny settings."""

from __future__ import annotations

import pytest
import torch

from backbones import create_backbone

from backbones import list_backbones
from backbones.timm import TimmBackbone

TIMM_SEEDS = {
    "xcit_tiny_12_p16_224": {"img_size": 64},
    "mixer_b16_224": {"img_size": 64, "out_indices": (1,)},
    "convmixer_768_32": {"out_indices": (0, 1)},  # blocks past the last index are not run
    "mvitv2_tiny": {"img_size": 64},
    "efficientformerv2_s0": {"img_size": 64},
}


def tiny_case(name: str) -> tuple[dict, tuple[int, ...]]:
    """Overrides that make a preset small, and an input that fits it. Every family needs an entry."""
    if name.startswith("vit_") and name.endswith("_patch14"):  # the giant widths cost ~25M parameters a block
        return {"img_size": 56, "depth": 2, "embed_dim": 128, "out_indices": (0, 1)}, (2, 3, 56, 56)
    if name.startswith("vit_"):
        return {"img_size": 64, "depth": 2, "out_indices": (0, 1)}, (2, 3, 64, 64)
    if name.startswith("mit_"):
        return {"depths": (1, 1, 1, 1)}, (2, 3, 64, 64)
    if name.startswith("timesformer_"):
        return {"img_size": 32, "num_frames": 4, "depth": 2}, (2, 3, 4, 32, 32)
    if name.startswith("efficientformerv2_supernet_"):  # a narrow space of the same structure
        return {"embed_dims": (32, 32, 48, 64), "min_embed_dims": (16, 16, 32, 48), "depths": (2, 2, 2, 2),
                "attention_blocks": 1}, (2, 3, 64, 64)
    if name.startswith("efficientformerv2_"):  # the published networks; sides multiples of 32
        return {}, (2, 3, 64, 64)
    if name.startswith("unetr_"):
        return {"img_size": 32, "depth": 4, "out_indices": (0, 1, 2, 3)}, (1, 1, 32, 32, 32)
    if name.startswith("probe_"):  # tests/dynamic_probe.py's test backbones, registered when a test imports them
        return {"img_size": 64}, (2, 3, 64, 64)
    raise AssertionError(f"no tiny test case for backbone {name!r}: add one to tests/test_backbones.py")


def check_contract(model: torch.nn.Module, x: torch.Tensor) -> None:
    feats = model(x)
    assert isinstance(feats, list) and len(feats) == len(model.feature_info)
    for f, info in zip(feats, model.feature_info):
        assert f.shape[0] == x.shape[0] and f.shape[1] == info.channels
        assert len(info.stride) == x.ndim - 2
        expected = tuple(s // st for s, st in zip(x.shape[2:], info.stride))
        assert tuple(f.shape[2:]) == expected, (f.shape, info)
        assert torch.isfinite(f).all()
    sum(f.float().square().mean() for f in feats).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads if g is not None)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.slow
@pytest.mark.parametrize("name", list_backbones())
def test_registered_backbone_contract(name: str) -> None:
    kwargs, shape = tiny_case(name)
    model = create_backbone(name, **kwargs)
    check_contract(model, torch.randn(shape))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TIMM_SEEDS))
def test_timm_seed_contract(name: str) -> None:
    model = create_backbone(f"timm:{name}", **TIMM_SEEDS[name])
    size = 64
    check_contract(model, torch.randn(2, 3, size, size))
    assert model.forward_pooled(torch.randn(1, 3, size, size)).shape == (1, model.num_features)


def test_vit_interpolates_position_embeddings_to_other_sizes() -> None:
    model = create_backbone("vit_tiny_patch16", img_size=64, depth=1).eval()
    for h, w in ((64, 64), (96, 48), (128, 128)):
        (f,) = model(torch.randn(1, 3, h, w))
        assert f.shape == (1, 192, h // 16, w // 16)
    with pytest.raises(ValueError, match="not divisible by patch size"):
        model(torch.randn(1, 3, 65, 64))


def test_vit_3d_patches_and_tuple_patch_size() -> None:
    model = create_backbone(
        "vit_tiny_patch16", spatial_dims=3, img_size=(32, 32, 32), patch_size=(8, 16, 16), depth=2,
        in_chans=1, class_token=False, out_indices=(0, 1),
    )
    assert [i.stride for i in model.feature_info] == [(8, 16, 16)] * 2
    feats = model(torch.randn(1, 1, 32, 48, 32))
    assert [tuple(f.shape) for f in feats] == [(1, 192, 4, 3, 2)] * 2


def test_vit_last_output_is_final_normed_tokens() -> None:
    model = create_backbone("vit_tiny_patch16", img_size=32, depth=3, out_indices=(1, -1)).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = model.forward_tokens(x)
    last = model(x)[-1]
    assert torch.allclose(model.tokens_to_map(tokens, (2, 2)), last)


def test_unknown_backbone_and_argument_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'vit_smal_patch16'.*vit_small_patch16"):
        create_backbone("vit_smal_patch16")
    with pytest.raises(TypeError, match=r"unknown arguments \['embed_dims'\]"):
        create_backbone("vit_small_patch16", embed_dims=3)
    with pytest.raises(ValueError, match="timm has no model"):
        TimmBackbone("not_a_timm_model")
    with pytest.raises(ValueError, match=r"expects input \[B, C, H, W\] with C=3"):
        create_backbone("vit_tiny_patch16", img_size=32, depth=1)(torch.randn(1, 1, 32, 32))
