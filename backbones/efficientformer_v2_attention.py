"""The attentions of EfficientFormerV2 (backbones/efficientformer_v2.py): multi-head self-attention with talking heads,
learned relative biases and a local value branch (stride 1 or 2), and the local-global attention downsampling.

The biases are tables over the grid of the network's ``img_size``, resampled bicubically to the actual grid. In the
inference form (``fuse``) the maps stay channels-last around the attention (the heads' output is written as
``[B, h, w, heads * d]``), the local value branch and the residual are added inside oneDNN convolutions, and the
talking heads run as batched matmuls, the first one folded into the biases.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ops.conv_fusion import version
from .efficientformer_v2_layers import ConvNorm
from .layers import resample_pos_embed


def relative_offset_index(grid: tuple[int, int], query_stride: int, device: torch.device) -> torch.Tensor:
    """``[Nq, Nk]`` index ``|dy| * w + |dx|`` into a ``(h, w)`` offset table, for keys on the ``(h, w)`` grid and
    queries on its every ``query_stride``-th row and column."""
    h, w = grid
    ky, kx = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    qy, qx = ky[::query_stride, ::query_stride], kx[::query_stride, ::query_stride]
    dy = (qy.reshape(-1, 1) - ky.reshape(1, -1)).abs()
    dx = (qx.reshape(-1, 1) - kx.reshape(1, -1)).abs()
    return dy * w + dx


def heads_to_map(x: torch.Tensor, grid: tuple[int, int], channels_last: bool) -> torch.Tensor:
    """``[B, heads, h * w, d] -> [B, heads * d, h, w]``, its memory channels-last (``[B, h, w, heads * d]``) when
    asked, so that the convolutions it meets in the inference form take it without a layout conversion."""
    if channels_last:
        return rearrange(x, "b n (h w) d -> b h w (n d)", h=grid[0]).permute(0, 3, 1, 2)
    return rearrange(x, "b n (h w) d -> b (n d) h w", h=grid[0])


def mix_heads(conv: nn.Conv2d, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``conv`` (1x1, heads to heads) over ``x [B, heads, N, M]`` as one batched matmul; ``bias [heads, N * M]``
    replaces the conv's bias when given. (A convolution over maps of 8 channels is slow on a CPU.)"""
    b, n = x.shape[:2]
    bias = conv.bias.view(n, 1) if bias is None else bias
    return torch.baddbmm(bias, conv.weight.view(1, n, n).expand(b, n, n), x.flatten(2)).view(x.shape)


class RelativeBiasAttention(nn.Module):
    """Base of both attentions: a learned bias per head and relative offset ``(|dy|, |dx|)``, stored as a table
    ``attention_biases [heads, th * tw]`` for the grid ``table_grid`` and resampled bicubically to other grids.
    In inference without gradients the biases derived for the last grid are cached (keyed by the versions of the
    tensors they come from, so loading weights invalidates them)."""

    def __init__(self, num_heads: int, table_grid: tuple[int, int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.table_grid = table_grid
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, math.prod(table_grid)))
        self._bias_cache: dict[tuple, torch.Tensor] = {}
        self.register_load_state_dict_post_hook(_forget_biases)

    def bias_table(self, grid: tuple[int, int]) -> torch.Tensor:
        """The table resampled to ``grid``: ``[heads, h * w]`` (the stored one when ``grid == table_grid``)."""
        table = self.attention_biases.t().unsqueeze(0)  # [heads, T] -> [1, T, heads], a position-embedding layout
        return resample_pos_embed(table, self.table_grid, grid)[0].t()

    def attention_bias(self, grid: tuple[int, int], query_stride: int = 1) -> torch.Tensor:
        """``[heads, Nq, Nk]`` biases for keys on ``grid`` and queries every ``query_stride`` positions."""
        table = self.attention_biases
        return self._cached(
            ("bias", grid, query_stride, table.device, table.dtype, version(table)),
            lambda: self.bias_table(grid)[:, relative_offset_index(grid, query_stride, table.device)],
        )

    def _cached(self, key: tuple, compute: Any) -> torch.Tensor:
        """``compute()``, kept for ``key`` while in inference without gradients (one entry per kind, ``key[0]``)."""
        if self.training or torch.is_grad_enabled():
            return compute()
        if key not in self._bias_cache:
            value = compute()
            self._bias_cache = {k: v for k, v in self._bias_cache.items() if k[0] != key[0]}
            self._bias_cache[key] = value
        return self._bias_cache[key]

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> nn.Module:
        self._bias_cache = {}
        return super()._apply(fn, *args, **kwargs)


def _forget_biases(module: RelativeBiasAttention, *args: Any) -> None:
    """A ``load_state_dict`` post-hook: weights loaded inside ``torch.inference_mode`` may leave their version
    counters as they were."""
    module._bias_cache = {}


class TalkingHeadAttention(RelativeBiasAttention):
    """Self-attention over a 2-D map with talking heads (1x1 mixing of the heads' logits before and after the
    softmax), relative biases and a local depthwise 3x3 branch on the values. With ``stride`` 2 it attends over a
    depthwise-strided map and upsamples the result bilinearly back to the input's grid.

    The inference form (``fuse``) mixes the heads with batched matmuls, the first mixing applied to the biases once
    (``W (qk + b) + c = W qk + (W b + c)``), and keeps the maps channels-last around the attention."""

    def __init__(
        self, dim: int, *, table_grid: tuple[int, int], num_heads: int = 8, key_dim: int = 32, attn_ratio: int = 4,
        stride: int = 1, act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__(num_heads, table_grid)
        value_dim = attn_ratio * key_dim * num_heads
        self.scale = key_dim**-0.5
        self.stride_conv = ConvNorm(dim, dim, 3, stride=stride, groups=dim) if stride > 1 else None
        self.q = ConvNorm(dim, key_dim * num_heads)
        self.k = ConvNorm(dim, key_dim * num_heads)
        self.v = ConvNorm(dim, value_dim)
        self.v_local = ConvNorm(value_dim, value_dim, 3, groups=value_dim)
        self.talking_head1 = nn.Conv2d(num_heads, num_heads, 1)
        self.talking_head2 = nn.Conv2d(num_heads, num_heads, 1)
        self.act = act_layer()
        self.proj = ConvNorm(value_dim, dim)
        self.fused = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, *, inplace: bool = False) -> torch.Tensor:
        """The attention branch ``[B, dim, H, W] -> [B, dim, H, W]``, plus ``residual`` when given (see ConvNorm)."""
        size = x.shape[2:]
        if self.stride_conv is not None:
            x = self.stride_conv(x)
        grid = (x.shape[2], x.shape[3])
        channels_last = self.fused and x.is_contiguous(memory_format=torch.channels_last)
        q = rearrange(self.q(x), "b (n d) h w -> b n (h w) d", n=self.num_heads)
        k = rearrange(self.k(x), "b (n d) h w -> b n d (h w)", n=self.num_heads)
        v = self.v(x)
        attn = q @ k  # [B, heads, N, N]
        if self.fused:  # the scale is folded into the queries, the first head mixing into the biases
            attn = mix_heads(self.talking_head1, attn, self.mixed_bias(grid)).softmax(dim=-1)
            attn = mix_heads(self.talking_head2, attn)
        else:
            attn = attn * self.scale + self.attention_bias(grid).to(attn.dtype)
            attn = self.talking_head2(self.talking_head1(attn).softmax(dim=-1))
        out = attn @ rearrange(v, "b (n d) h w -> b n (h w) d", n=self.num_heads)
        x = self.v_local(v, heads_to_map(out, grid, channels_last), inplace=True)  # the local branch + attention
        if self.stride_conv is not None:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.proj(self.act(x), residual, inplace=inplace)

    def mixed_bias(self, grid: tuple[int, int]) -> torch.Tensor:
        """``[heads, N * N]``: the first head mixing applied to the attention biases, plus its own bias."""
        th = self.talking_head1
        return self._cached(
            ("mixed", grid, version(self.attention_biases), version(th.weight), version(th.bias)),
            lambda: torch.addmm(th.bias.view(-1, 1), th.weight.flatten(1), self.attention_bias(grid).flatten(1)),
        )

    @torch.no_grad()
    def fuse(self, out_scale: torch.Tensor | None = None) -> None:
        for conv in (self.stride_conv, self.q, self.k, self.v, self.v_local):
            if conv is not None:
                conv.fuse()
        if self.scale != 1.0:
            self.q.conv.weight.mul_(self.scale)
            self.q.conv.bias.mul_(self.scale)
            self.scale = 1.0
        self.proj.fuse(out_scale)
        self.fused = True


class LocalGlobalQuery(nn.Module):
    """Queries at half resolution: a strided depthwise 3x3 conv (local) plus plain subsampling (global), then a
    1x1 conv + BN."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.local = nn.Conv2d(in_dim, in_dim, 3, stride=2, padding=1, groups=in_dim)
        self.proj = ConvNorm(in_dim, out_dim)
        self.pool_folded = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.local(x)
        if not self.pool_folded:
            q = q + x[..., ::2, ::2]  # a 1x1 average pool of stride 2
        return self.proj(q)

    @torch.no_grad()
    def fuse(self) -> None:
        """The subsampled input is the strided conv's centre tap: add 1 to the centre of its kernels."""
        if not self.pool_folded:
            self.local.weight[:, 0, 1, 1] += 1.0
            self.pool_folded = True
        self.proj.fuse()


class AttentionDownsample(RelativeBiasAttention):
    """Local-global attention downsampling: half-resolution queries attend to full-resolution keys; a strided
    depthwise branch on the values; ``[B, dim, H, W] -> [B, out_dim, H/2, W/2]``."""

    def __init__(
        self, dim: int, out_dim: int, *, table_grid: tuple[int, int], num_heads: int = 8, key_dim: int = 16,
        attn_ratio: int = 4, act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__(num_heads, table_grid)
        value_dim = attn_ratio * key_dim * num_heads
        self.scale = key_dim**-0.5
        self.q = LocalGlobalQuery(dim, key_dim * num_heads)
        self.k = ConvNorm(dim, key_dim * num_heads)
        self.v = ConvNorm(dim, value_dim)
        self.v_local = ConvNorm(value_dim, value_dim, 3, stride=2, groups=value_dim)
        self.act = act_layer()
        self.proj = ConvNorm(value_dim, out_dim)
        self.fused = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, dim, H, W] -> [B, out_dim, H/2, W/2]``, plus ``residual`` when given, which it may overwrite."""
        h, w = x.shape[2:]
        channels_last = self.fused and x.is_contiguous(memory_format=torch.channels_last)
        q = rearrange(self.q(x), "b (n d) h w -> b n (h w) d", n=self.num_heads)
        k = rearrange(self.k(x), "b (n d) h w -> b n (h w) d", n=self.num_heads)
        v = self.v(x)
        bias = self.attention_bias((h, w), query_stride=2).to(q.dtype)  # [heads, N/4, N]
        out = F.scaled_dot_product_attention(
            q, k, rearrange(v, "b (n d) h w -> b n (h w) d", n=self.num_heads), attn_mask=bias, scale=self.scale
        )
        x = self.v_local(v, heads_to_map(out, (h // 2, w // 2), channels_last), inplace=True)
        return self.proj(self.act(x), residual, inplace=True)

    def fuse(self, out_scale: torch.Tensor | None = None) -> None:
        for conv in (self.q, self.k, self.v, self.v_local):
            conv.fuse()
        self.proj.fuse(out_scale)
        self.fused = True
