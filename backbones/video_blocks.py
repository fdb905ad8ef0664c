"""Space-time pieces of the video ViT (TimeSformer, Bertasius et al., 2021).

Video tokens are laid out time-major, ``[B, prefix + T*N, C]`` with ``N = H*W`` patches per frame, so
folding them into a channel-first map ``[B, C, T, H, W]`` is a plain reshape. Parameter names follow the
original release (``temporal_norm1``, ``temporal_attn``, ``temporal_fc``) so its checkpoints load as they are.
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange, reduce, repeat
from torch import nn

from .layers import Attention, DropPath, Mlp

VideoAttention = Literal["joint", "divided", "space_only"]


class DividedSpaceTimeBlock(nn.Module):
    """TimeSformer block: temporal attention, then spatial attention, then the MLP, each pre-norm residual.

    Temporal attention runs over the frames of each patch position (prefix tokens take no part); its
    output passes ``temporal_fc`` before joining the residual stream. ``temporal_fc`` starts at zero, so a
    block inflated from an image ViT begins as that image block. Spatial attention runs per frame with the
    prefix (class) token copied into every frame; the copies' updates are averaged over frames.

    Args:
        dim: token width.
        num_heads: heads of both attentions.
        mlp_ratio: hidden width of the MLP relative to ``dim``.
        qkv_bias: bias on the query/key/value projections.
        proj_drop, attn_drop: dropout after projections and inside attention.
        drop_path: stochastic-depth rate of the three residual branches.
        num_prefix_tokens: leading non-patch tokens (0 or 1).
        norm_layer, act_layer, attn_layer: the parts, passed as classes.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        num_prefix_tokens: int = 1,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        attn_layer: type[nn.Module] = Attention,
    ) -> None:
        super().__init__()
        if num_prefix_tokens not in (0, 1):
            raise ValueError(f"num_prefix_tokens must be 0 or 1, got {num_prefix_tokens}")
        self.num_prefix_tokens = num_prefix_tokens
        self.temporal_norm1 = norm_layer(dim)
        self.temporal_attn = attn_layer(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.temporal_fc = nn.Linear(dim, dim)
        self.norm1 = norm_layer(dim)
        self.attn = attn_layer(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path = DropPath(drop_path)

    def reset_temporal(self) -> None:
        """Zero ``temporal_fc`` so the block starts as a spatial-only (image) block."""
        nn.init.zeros_(self.temporal_fc.weight)
        nn.init.zeros_(self.temporal_fc.bias)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        p, t = self.num_prefix_tokens, num_frames
        prefix, patches = x[:, :p], x[:, p:]
        xt = rearrange(self.temporal_norm1(patches), "b (t n) c -> (b n) t c", t=t)
        res = self.temporal_fc(self.temporal_attn(xt))  # per token, so before folding back (contiguous: faster)
        patches = patches + self.drop_path(rearrange(res, "(b n) t c -> b (t n) c", b=x.shape[0]))

        xs = rearrange(patches, "b (t n) c -> (b t) n c", t=t)
        if p:
            xs = torch.cat([repeat(prefix, "b p c -> (b t) p c", t=t), xs], dim=1)
        res = self.drop_path(self.attn(self.norm1(xs)))  # [(B T), p + N, C]
        res_patches = rearrange(res[:, p:], "(b t) n c -> b (t n) c", t=t)
        if p:
            res_prefix = reduce(res[:, :p], "(b t) p c -> b p c", "mean", t=t)
            x = torch.cat([prefix + res_prefix, patches + res_patches], dim=1)
        else:
            x = patches + res_patches
        return x + self.drop_path(self.mlp(self.norm2(x)))


def frames_to_clip(x: torch.Tensor, num_frames: int, num_prefix_tokens: int) -> torch.Tensor:
    """Fold per-frame tokens ``[(B T), p + N, C]`` (space-only attention) into clip tokens
    ``[B, p + T*N, C]``; the frames' prefix tokens are averaged, as the original space-only baseline does."""
    p = num_prefix_tokens
    patches = rearrange(x[:, p:], "(b t) n c -> b (t n) c", t=num_frames)
    if not p:
        return patches
    return torch.cat([reduce(x[:, :p], "(b t) p c -> b p c", "mean", t=num_frames), patches], dim=1)
