"""Transformer building blocks shared by every backbone.

Parameter names follow timm (``qkv``, ``proj``, ``fc1``, ``fc2``, ``norm1``, ``norm2``) so that the most
common checkpoints load with few renames. Attention runs through ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint


def to_tuple(value: int | Sequence[int], n: int, name: str = "value") -> tuple[int, ...]:
    """Expand an int to an n-tuple; check a sequence has n entries."""
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ValueError(f"{name} must have {n} entries for spatial_dims={n}, got {value}")
    return value


def run_checkpointed(module: nn.Module, *args: Any, enabled: bool) -> Any:
    """``module(*args)``; when ``enabled`` and gradients are on, its activations are not kept but recomputed in the
    backward pass (activation checkpointing: non-reentrant, with the RNG state restored, so dropout and drop path
    draw the same masks and the gradients are those of the plain call)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False, preserve_rng_state=True)
    return module(*args)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability ``p``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention over ``[B, N, C]`` tokens.

    ``forward(x, policy)`` takes an optional token-keep state for token pruning (DynamicViT, Rao et al.,
    2021): ``policy`` ``[B, N, 1]`` or ``[B, N]`` holds 1 for kept and 0 for dropped tokens, and attention
    then ignores dropped keys (see ``softmax_with_policy``), so a dropped token influences only itself.
    """

    def __init__(
        self, dim: int, num_heads: int, *, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        dropout_p = self.attn_drop if self.training else 0.0
        if policy is None:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            attn = softmax_with_policy((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5, policy)  # [B, H, N, N] fp32
            x = F.dropout(attn, dropout_p, training=self.training).to(v.dtype) @ v
        return self.proj_drop(self.proj(rearrange(x, "b h n d -> b n (h d)")))


def softmax_with_policy(logits: torch.Tensor, policy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DynamicViT's softmax over keys ``[B, H, N, N]`` that only the kept keys enter, in float32.

    ``policy`` ``[B, N, 1]`` or ``[B, N]`` weights each key (1 kept, 0 dropped). Each token still attends
    to itself (the diagonal is always kept), so a dropped token's row stays a distribution. ``eps``, spread
    evenly over the N keys, keeps the row sums away from zero as the release does for stable training;
    dropped keys thus keep a weight of about ``eps / N``.

    The release subtracts each row's maximum over all keys; here it is the maximum over the row's kept keys, and
    ``exp`` is capped at 1. The values are the release's wherever a row's largest logit is a kept key; otherwise
    the release's row sum can fall to ``eps`` and its gradient with respect to the policy (the straight-through
    path of the keep decisions) grows as ``1 / eps``, up to 1e6 times the keep-ratio loss's, so the decisions
    only learn to keep every token. Here every row is a distribution over its kept keys and that gradient is
    bounded by the values' spread.
    """
    n = logits.shape[-1]
    if policy.shape[:2] != (logits.shape[0], n) or policy[0].numel() != n:
        raise ValueError(
            f"policy must have shape [B, N, 1] or [B, N] with B={logits.shape[0]}, N={n}; got {tuple(policy.shape)}"
        )
    keep = policy.reshape(-1, 1, 1, n).float()  # keys of each row: [B, 1, 1, N]
    eye = torch.eye(n, dtype=keep.dtype, device=keep.device)
    keep = keep + (1.0 - keep) * eye  # [B, 1, N, N]
    logits = logits.float()
    top = logits.masked_fill(keep == 0, float("-inf")).amax(-1, keepdim=True).detach()  # the diagonal is always kept
    attn = (logits - top).exp().clamp(max=1.0) * keep  # only dropped keys exceed 1, and keep zeroes them
    return (attn + eps / n) / (attn.sum(-1, keepdim=True) + eps)


class Mlp(nn.Module):
    """Two linear layers with an activation between them."""

    def __init__(
        self, dim: int, hidden_dim: int, *, act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: hidden width of the MLP relative to ``dim``.
        qkv_bias: bias on the query/key/value projection.
        drop_path: stochastic-depth rate of both residual branches.
        init_values: LayerScale initial value; ``None`` disables LayerScale.
        norm_layer, act_layer, attn_layer: the parts, passed as classes so a variant swaps one; an
            ``attn_layer`` is called as ``Attention`` is, ``attn(x, policy)``.
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
        init_values: float | None = None,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        attn_layer: type[nn.Module] = Attention,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_layer(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        """``policy``: optional token-keep state ``[B, N, 1]`` (1 kept, 0 dropped) for the attention."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), policy)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class PatchEmbed(nn.Module):
    """Cut an image or volume into non-overlapping patches and project each to ``embed_dim``.

    One ``spatial_dims`` argument serves images (2) and volumes or videos (3). Returns tokens
    ``[B, N, C]`` in row-major order of the patch grid, and the grid itself.
    """

    def __init__(
        self, *, patch_size: Sequence[int], in_chans: int, embed_dim: int, spatial_dims: int = 2, bias: bool = True
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.patch_size = to_tuple(patch_size, spatial_dims, "patch_size")
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
        self.proj = conv(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)

    def grid(self, input_size: Sequence[int]) -> tuple[int, ...]:
        """The patch grid of an input of spatial size ``input_size``; raises if a side does not divide."""
        bad = [(s, p) for s, p in zip(input_size, self.patch_size) if s % p]
        if bad:
            raise ValueError(
                f"input size {tuple(input_size)} is not divisible by patch size {self.patch_size}; "
                "resize or pad the input to a multiple of the patch size"
            )
        return tuple(s // p for s, p in zip(input_size, self.patch_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        grid = self.grid(x.shape[2:])
        return self.proj(x).flatten(2).transpose(1, 2), grid  # [B, C, *grid] -> [B, N, C]


def resample_pos_embed(
    pos_embed: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int], num_prefix_tokens: int = 0
) -> torch.Tensor:
    """Interpolate learned position embeddings ``[1, prefix + prod(old_grid), C]`` to another grid.

    Prefix (class) embeddings are kept as they are; the grid part is resized bicubically (2-D) or
    trilinearly (3-D), the usual choice when fine-tuning at another resolution or ROI size.
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    if grid.shape[1] != math.prod(old_grid):
        raise ValueError(f"position embedding has {grid.shape[1]} grid tokens, expected grid {old_grid}")
    mode = {1: "linear", 2: "bicubic", 3: "trilinear"}[len(old_grid)]
    grid = grid.transpose(1, 2).reshape(1, -1, *old_grid).float()  # [1, N, C] -> [1, C, *old_grid]
    grid = F.interpolate(grid, size=new_grid, mode=mode, align_corners=False)
    grid = grid.flatten(2).transpose(1, 2).to(pos_embed.dtype)  # [1, C, *new_grid] -> [1, N', C]
    return torch.cat([prefix, grid], dim=1)

