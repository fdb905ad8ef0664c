"""ViT at scale (Zhai et al., 2022): the giant presets, the big_vision recipe (Adafactor, rsqrt schedule, decoupled
weight decay, sigmoid loss), big_vision checkpoints and activation checkpointing."""

from __future__ import annotations

import pytest
import torch

from backbones import create_backbone


def vit_params(width: int, depth: int, mlp: int, patch: int, tokens: int, in_chans: int = 3) -> int:
    """Parameters of a class-token-free ViT without head: patch kernel, position embeddings, blocks, final norm."""
    block = 4 * width * width + 4 * width + 2 * width * mlp + mlp + width + 4 * width  # attn, mlp, two norms
    return patch * patch * in_chans * width + width + tokens * width + depth * block + 2 * width


@pytest.mark.parametrize(
    ("name", "width", "depth", "mlp", "paper_millions"),
    [("vit_giant_patch14", 1408, 40, 6144, 1011), ("vit_gigantic_patch14", 1664, 48, 8192, 1843)],
)
def test_giant_presets_match_the_paper(name: str, width: int, depth: int, mlp: int, paper_millions: int) -> None:
    with torch.device("meta"):  # 4-7 GB of fp32 weights: counted, never allocated
        model = create_backbone(name)
    count = sum(p.numel() for p in model.parameters())
    assert count == vit_params(width, depth, mlp, patch=14, tokens=(224 // 14) ** 2)
    assert round(count / 1e6) == paper_millions  # Table 2 of the paper, head excluded
    assert model.num_prefix_tokens == 0 and model.default_pool == "avg"
    assert model.blocks[0].mlp.fc1.out_features == mlp
