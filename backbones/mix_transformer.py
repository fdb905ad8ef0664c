"""MixTransformer (MiT-B0..B5), the hierarchical encoder of SegFormer (Xie et al., 2021).

Four stages, each an overlapping patch embedding (strided convolution + LayerNorm) followed by blocks
of efficient self-attention (keys and values come from a map shrunk ``sr_ratio`` times by a strided
convolution) and Mix-FFN (a 3x3 depth-wise convolution between the two linear layers, which replaces
position embeddings). ``forward`` returns one map per stage at strides 4, 8, 16 and 32.

Tokens live as contiguous ``[B, N, C]``; a map is the same memory seen as ``[B, C, H, W]`` in
channels-last layout (``tokens_to_map``), so the convolutions read and write tokens without copies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .registry import build_preset, register
from .base import Backbone, FeatureInfo
from .layers import DropPath, run_checkpointed


def tokens_to_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, H*W, C]`` tokens as a ``[B, C, H, W]`` map in channels-last layout (a view, no copy)."""
    return x.view(x.shape[0], *size, x.shape[2]).permute(0, 3, 1, 2)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, H*W, C]``; free for channels-last maps, one copy otherwise."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


class OverlapPatchEmbed(nn.Module):
    """Strided convolution whose kernel overlaps its neighbours (7/4 then 3/2), then LayerNorm."""

    def __init__(self, in_chans: int, embed_dim: int, *, patch_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)  # eps 1e-5 here, as in the original

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x.contiguous(memory_format=torch.channels_last))
        return self.norm(map_to_tokens(x)), (x.shape[2], x.shape[3])


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys/values come from the map reduced ``sr_ratio`` times per side.

    Args:
        dim: token width.
        num_heads: attention heads.
        sr_ratio: kernel and stride of the reduction convolution; 1 attends to all tokens.
        qkv_bias: bias on the query and key/value projections.
        attn_drop, proj_drop: dropout on attention weights and after the output projection.
    """

    def __init__(
        self, dim: int, num_heads: int, *, sr_ratio: int = 1, qkv_bias: bool = True,
        attn_drop: float = 0.0, proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x).view(b, n, h, c // h).transpose(1, 2)  # [B, heads, N, d]
        if self.sr_ratio > 1:
            x = self.norm(map_to_tokens(self.sr(tokens_to_map(x, size))))  # [B, N / sr^2, C]
        k, v = self.kv(x).view(b, -1, 2, h, c // h).permute(2, 0, 3, 1, 4)  # 2 x [B, heads, M, d]
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(b, n, c)  # [B, heads, N, d] -> [B, N, C]
        return self.proj_drop(self.proj(x))


class MixFFN(nn.Module):
    """Linear, 3x3 depth-wise convolution over the token map, GELU, linear."""

    def __init__(self, dim: int, hidden_dim: int, *, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = map_to_tokens(self.dwconv(tokens_to_map(self.fc1(x), size)))
        return self.drop(self.fc2(self.drop(self.act(x))))


class MixBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))`` then ``x + ffn(norm2(x))``, both with stochastic depth."""

    def __init__(
        self, dim: int, num_heads: int, *, sr_ratio: int, mlp_ratio: float, qkv_bias: bool,
        drop: float, attn_drop: float, drop_path: float, norm_eps: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = EfficientSelfAttention(
            dim, num_heads, sr_ratio=sr_ratio, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop
        )
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), size))
        return x + self.drop_path(self.mlp(self.norm2(x), size))


class MixStage(nn.Module):
    """Patch embedding, blocks, final LayerNorm; returns the stage's map (channels-last)."""

    def __init__(self, patch_embed: OverlapPatchEmbed, blocks: Sequence[MixBlock], dim: int, norm_eps: float) -> None:
        super().__init__()
        self.patch_embed = patch_embed
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
        """``checkpointed``: recompute each block in the backward pass (activation checkpointing)."""
        x, size = self.patch_embed(x)
        for block in self.blocks:
            x = run_checkpointed(block, x, size, enabled=checkpointed)
        return tokens_to_map(self.norm(x), size)


class MixTransformer(Backbone):
    """Hierarchical transformer encoder with four stages at strides 4, 8, 16, 32.

    Args:
        in_chans: input channels.
        embed_dims, depths, num_heads, sr_ratios, mlp_ratios: per-stage width, number of blocks,
            attention heads, key/value reduction ratio and MLP expansion.
        patch_sizes, strides: kernel and stride of each stage's overlapping patch embedding.
        qkv_bias: bias on the query and key/value projections.
        drop_rate, attn_drop_rate: dropout after projections and on attention weights.
        drop_path_rate: stochastic-depth rate reached by the last block (linear over all blocks).
        norm_eps: epsilon of the block and stage LayerNorms (1e-6 as in the released models).
        out_indices: stages whose maps ``forward`` returns, shallow to deep.
    """

    def __init__(
        self,
        *,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (32, 64, 160, 256),
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        mlp_ratios: Sequence[float] = (4, 4, 4, 4),
        patch_sizes: Sequence[int] = (7, 3, 3, 3),
        strides: Sequence[int] = (4, 2, 2, 2),
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_eps: float = 1e-6,
        out_indices: Sequence[int] = (0, 1, 2, 3),
    ) -> None:
        super().__init__()
        per_stage = {"embed_dims": embed_dims, "depths": depths, "num_heads": num_heads, "sr_ratios": sr_ratios,
                     "mlp_ratios": mlp_ratios, "patch_sizes": patch_sizes, "strides": strides}
        num_stages = len(embed_dims)
        bad = {k: tuple(v) for k, v in per_stage.items() if len(v) != num_stages}
        if bad:
            raise ValueError(f"per-stage settings must all have {num_stages} entries (one per stage), got {bad}")
        indices = sorted({i % num_stages for i in out_indices})
        if len(indices) != len(out_indices) or any(not -num_stages <= i < num_stages for i in out_indices):
            raise ValueError(f"out_indices must be distinct stage indices in [0, {num_stages}), got {tuple(out_indices)}")
        self.in_chans = in_chans
        self.num_features = embed_dims[-1]
        self.out_indices = indices
        total = sum(depths)
        rates = iter(drop_path_rate * i / max(1, total - 1) for i in range(total))  # linear in block index
        stages, dim_in, stride = [], in_chans, 1
        self.feature_info = []
        for i in range(num_stages):
            dim = embed_dims[i]
            blocks = [
                MixBlock(
                    dim, num_heads[i], sr_ratio=sr_ratios[i], mlp_ratio=mlp_ratios[i], qkv_bias=qkv_bias,
                    drop=drop_rate, attn_drop=attn_drop_rate, drop_path=next(rates), norm_eps=norm_eps,
                )
                for _ in range(depths[i])
            ]
            embed = OverlapPatchEmbed(dim_in, dim, patch_size=patch_sizes[i], stride=strides[i])
            stages.append(MixStage(embed, blocks, dim, norm_eps))
            dim_in, stride = dim, stride * strides[i]
            if i in indices:
                self.feature_info.append(FeatureInfo(channels=dim, stride=(stride, stride)))
        self.stages = nn.ModuleList(stages[: indices[-1] + 1])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original initialisation: truncated normal linears, fan-out normal convolutions."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def adapt_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        """A first patch kernel made for other input channels (RGB -> grey, multispectral) is adapted."""
        if name == "stages.0.patch_embed.proj.weight" and tensor.shape[1] != self.in_chans:
            from timm.models import adapt_input_conv

            return adapt_input_conv(self.in_chans, tensor)
        return None

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.activation_checkpointing = bool(enabled)

    def sharding_units(self) -> list[nn.Module]:
        return [block for stage in self.stages for block in stage.blocks]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Maps ``[B, C_i, ceil(H / s_i), ceil(W / s_i)]`` (channels-last memory) of the ``out_indices`` stages."""
        self.check_input(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x, self.activation_checkpointing)
            if i in self.out_indices:
                outs.append(x)
        return outs


def _mit(overrides: dict[str, Any], **arch: Any) -> MixTransformer:
    return build_preset(MixTransformer, arch, overrides)  # type: ignore[return-value]


_WIDE = {"embed_dims": (64, 128, 320, 512)}


@register
def mit_b0(**kwargs: Any) -> MixTransformer:
    """MiT-B0: widths 32/64/160/256, 2 blocks per stage (3.3M parameters)."""
    return _mit(kwargs, embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2))


@register
def mit_b1(**kwargs: Any) -> MixTransformer:
    """MiT-B1: widths 64/128/320/512, 2 blocks per stage."""
    return _mit(kwargs, **_WIDE, depths=(2, 2, 2, 2))


@register
def mit_b2(**kwargs: Any) -> MixTransformer:
    """MiT-B2: depths 3/4/6/3."""
    return _mit(kwargs, **_WIDE, depths=(3, 4, 6, 3))


@register
def mit_b3(**kwargs: Any) -> MixTransformer:
    """MiT-B3: depths 3/4/18/3."""
    return _mit(kwargs, **_WIDE, depths=(3, 4, 18, 3))


@register
def mit_b4(**kwargs: Any) -> MixTransformer:
    """MiT-B4: depths 3/8/27/3."""
    return _mit(kwargs, **_WIDE, depths=(3, 8, 27, 3))


@register
def mit_b5(**kwargs: Any) -> MixTransformer:
    """MiT-B5: depths 3/6/40/3."""
    return _mit(kwargs, **_WIDE, depths=(3, 6, 40, 3))


from .formats import segformer as segformer_weights  # noqa: E402,F401  (registers the MiT/SegFormer checkpoint formats)
