"""VisionTransformer: one ViT for images (2-D) and volumes (3-D patches).

Images ``[B, C, H, W]`` and volumes ``[B, C, D, H, W]`` are cut into patches, given learned position
embeddings (interpolated on the fly when the input grid differs from the one the model was built for)
and passed through pre-norm blocks. ``forward`` returns the tokens of the blocks in ``out_indices`` as
channel-first maps; the last block's output is the final-normalised one, as a classifier sees it.
"""

from __future__ import annotations

import math
import math
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from . import build_preset, register
from .base import Backbone, FeatureInfo
from .layers import Block, PatchEmbed, resample_pos_embed, to_tuple


class VisionTransformer(Backbone):
    """Plain ViT (Dosovitskiy et al., 2021) over 2-D or 3-D patches.

    Args:
        img_size: input size the position embeddings are built for (int or one entry per spatial dim);
            other sizes divisible by the patch size work through interpolation.
        patch_size: patch side(s); a tuple gives anisotropic patches, e.g. ``(16, 16, 16)``.
        in_chans: input channels.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the transformer's size.
        class_token: prepend a learned class token (``False`` for UNETR-style encoders).
        spatial_dims: 2 for images, 3 for volumes.
        out_indices: block indices whose outputs ``forward`` returns, shallow to deep; negative counts
            from the end. Defaults to the last block.
        drop_rate, attn_drop_rate, drop_path_rate: dropout after embeddings/projections, in attention,
            and the stochastic-depth rate reached by the last block (linearly increasing).
        init_values: LayerScale initial value, ``None`` for none.
        patch_bias: bias on the patch projection.
        norm_eps: LayerNorm epsilon (1e-6 in timm/Google ViTs, 1e-5 in MONAI's).
    """

    def __init__(
        self,
        *,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        class_token: bool = True,
        spatial_dims: Literal[2, 3] = 2,
        out_indices: Sequence[int] | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        init_values: float | None = None,
        patch_bias: bool = True,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.in_chans = in_chans
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = int(class_token)
        self.default_pool = "cls" if class_token else "avg"
        self.patch_embed = PatchEmbed(
            patch_size=to_tuple(patch_size, spatial_dims, "patch_size"),
            in_chans=in_chans,
            embed_dim=embed_dim,
            spatial_dims=spatial_dims,
            bias=patch_bias,
        )
        self.img_size = to_tuple(img_size, spatial_dims, "img_size")
        self.grid = self.patch_embed.grid(self.img_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        num_pos = self.num_prefix_tokens + math.prod(self.grid)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=rate,
                init_values=init_values,
                norm_layer=norm_layer,
            )
            for rate in rates
        )
        self.norm = norm_layer(embed_dim)
        indices = [depth - 1] if out_indices is None else [i % depth if -depth <= i < depth else i for i in out_indices]
        if any(not 0 <= i < depth for i in indices) or sorted(set(indices)) != indices:
            raise ValueError(f"out_indices must be increasing block indices in [-{depth}, {depth}), got {out_indices}")
        self.out_indices = indices
        stride = self.patch_embed.patch_size
        self.feature_info = [FeatureInfo(channels=embed_dim, stride=stride) for _ in indices]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def adapt_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        """Make a checkpoint tensor of another shape fit: position embeddings are resampled to our grid
        (2-D grids are inflated over depth for 3-D models), the class-token slot is added or dropped,
        patch kernels are adapted to our input channels and inflated from 2-D to 3-D."""
        if name == "pos_embed":
            return self._adapt_pos_embed(tensor)
        if name == "patch_embed.proj.weight":
            return self._adapt_patch_kernel(tensor)
        return None

    def _adapt_pos_embed(self, pos: torch.Tensor) -> torch.Tensor | None:
        ours = self.pos_embed.shape[1] - self.num_prefix_tokens
        grid_tokens = pos.shape[1]
        for prefix in (self.num_prefix_tokens, 1 - self.num_prefix_tokens):
            n = grid_tokens - prefix
            if n <= 0:
                continue
            side3, side2 = round(n ** (1 / 3)), math.isqrt(n)
            if self.spatial_dims == 3 and side3**3 == n:
                grid = resample_pos_embed(pos[:, prefix:], (side3,) * 3, self.grid)
            elif side2 * side2 == n:
                plane = resample_pos_embed(pos[:, prefix:], (side2, side2), self.grid[-2:])
                depth = self.grid[0] if self.spatial_dims == 3 else 1
                grid = plane.repeat(1, depth, 1)  # the same 2-D embedding on every slice: [1, D*H*W, C]
            else:
                continue
            if grid.shape[1] != ours:
                return None
            if self.num_prefix_tokens == 0:
                return grid
            cls = pos[:, :1] if prefix else torch.zeros_like(pos[:, :1])
            return torch.cat([cls, grid], dim=1)
        return None

    def _adapt_patch_kernel(self, weight: torch.Tensor) -> torch.Tensor | None:
        target = self.patch_embed.proj.weight.shape  # [C, in_chans, *patch]
        if weight.shape[1] != self.in_chans:
            from timm.models import adapt_input_conv

            flat = weight.reshape(*weight.shape[:3], -1)  # [O, I, a, b(*c)]: timm adapts 4-D kernels
            weight = adapt_input_conv(self.in_chans, flat).reshape(weight.shape[0], self.in_chans, *weight.shape[2:])
        if weight.ndim == 4 and len(target) == 5:
            depth = target[2]
            if tuple(weight.shape[2:]) != tuple(target[3:]):
                return None
            weight = weight.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth  # average inflation (I3D)
        elif weight.ndim == 4 and tuple(weight.shape[2:]) != tuple(target[2:]):
            from timm.layers import resample_patch_embed

            weight = resample_patch_embed(weight, list(target[2:]))
        return weight

    def adapt_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        """Make a checkpoint tensor of another shape fit: position embeddings are resampled to our grid
        (2-D grids are inflated over depth for 3-D models), the class-token slot is added or dropped,
        patch kernels are adapted to our input channels and inflated from 2-D to 3-D."""
        if name == "pos_embed":
            return self._adapt_pos_embed(tensor)
        if name == "patch_embed.proj.weight":
            return self._adapt_patch_kernel(tensor)
        return None

    def _adapt_pos_embed(self, pos: torch.Tensor) -> torch.Tensor | None:
        ours = self.pos_embed.shape[1] - self.num_prefix_tokens
        grid_tokens = pos.shape[1]
        for prefix in (self.num_prefix_tokens, 1 - self.num_prefix_tokens):
            n = grid_tokens - prefix
            if n <= 0:
                continue
            side3, side2 = round(n ** (1 / 3)), math.isqrt(n)
            if self.spatial_dims == 3 and side3**3 == n:
                grid = resample_pos_embed(pos[:, prefix:], (side3,) * 3, self.grid)
            elif side2 * side2 == n:
                plane = resample_pos_embed(pos[:, prefix:], (side2, side2), self.grid[-2:])
                depth = self.grid[0] if self.spatial_dims == 3 else 1
                grid = plane.repeat(1, depth, 1)  # the same 2-D embedding on every slice: [1, D*H*W, C]
            else:
                continue
            if grid.shape[1] != ours:
                return None
            if self.num_prefix_tokens == 0:
                return grid
            cls = pos[:, :1] if prefix else torch.zeros_like(pos[:, :1])
            return torch.cat([cls, grid], dim=1)
        return None

    def _adapt_patch_kernel(self, weight: torch.Tensor) -> torch.Tensor | None:
        target = self.patch_embed.proj.weight.shape  # [C, in_chans, *patch]
        if weight.shape[1] != self.in_chans:
            from timm.models import adapt_input_conv

            flat = weight.reshape(*weight.shape[:3], -1)  # [O, I, a, b(*c)]: timm adapts 4-D kernels
            weight = adapt_input_conv(self.in_chans, flat).reshape(weight.shape[0], self.in_chans, *weight.shape[2:])
        if weight.ndim == 4 and len(target) == 5:
            depth = target[2]
            if tuple(weight.shape[2:]) != tuple(target[3:]):
                return None
            weight = weight.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth  # average inflation (I3D)
        elif weight.ndim == 4 and tuple(weight.shape[2:]) != tuple(target[2:]):
            from timm.layers import resample_patch_embed

            weight = resample_patch_embed(weight, list(target[2:]))
        return weight

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Patch tokens with prefix tokens and position embeddings: ``[B, prefix + N, C]`` and the grid."""
        self.check_input(x)
        x, grid = self.patch_embed(x)
        pos = resample_pos_embed(self.pos_embed, self.grid, grid, self.num_prefix_tokens)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + pos), grid

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, grid = self.embed(x)
        outs = []
        last = self.out_indices[-1]
        for i, block in enumerate(self.blocks[: last + 1]):
            x = block(x)
            if i in self.out_indices:
                y = self.norm(x) if i == len(self.blocks) - 1 else x
                outs.append(self.tokens_to_map(y, grid))
        return outs

    def tokens_to_map(self, tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Drop prefix tokens and fold the rest into a channel-first map ``[B, C, *grid]``."""
        tokens = tokens[:, self.num_prefix_tokens :]
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)


def _vit(overrides: dict[str, Any], **arch: Any) -> VisionTransformer:
    return build_preset(VisionTransformer, arch, overrides)  # type: ignore[return-value]


@register
def vit_tiny_patch16(**kwargs: Any) -> VisionTransformer:
    """ViT-Ti/16: 192 wide, 12 blocks, 3 heads."""
    return _vit(kwargs, patch_size=16, embed_dim=192, depth=12, num_heads=3)


@register
def vit_small_patch16(**kwargs: Any) -> VisionTransformer:
    """ViT-S/16: 384 wide, 12 blocks, 6 heads."""
    return _vit(kwargs, patch_size=16, embed_dim=384, depth=12, num_heads=6)


@register
def vit_base_patch16(**kwargs: Any) -> VisionTransformer:
    """ViT-B/16: 768 wide, 12 blocks, 12 heads."""
    return _vit(kwargs, patch_size=16, embed_dim=768, depth=12, num_heads=12)


@register
def vit_large_patch16(**kwargs: Any) -> VisionTransformer:
    """ViT-L/16: 1024 wide, 24 blocks, 16 heads."""
    return _vit(kwargs, patch_size=16, embed_dim=1024, depth=24, num_heads=16)


@register
def vit_tiny_patch32(**kwargs: Any) -> VisionTransformer:
    """ViT-Ti/32."""
    return _vit(kwargs, patch_size=32, embed_dim=192, depth=12, num_heads=3)


@register
def vit_small_patch32(**kwargs: Any) -> VisionTransformer:
    """ViT-S/32."""
    return _vit(kwargs, patch_size=32, embed_dim=384, depth=12, num_heads=6)


@register
def vit_base_patch32(**kwargs: Any) -> VisionTransformer:
    """ViT-B/32."""
    return _vit(kwargs, patch_size=32, embed_dim=768, depth=12, num_heads=12)


@register
def vit_large_patch32(**kwargs: Any) -> VisionTransformer:
    """ViT-L/32."""
    return _vit(kwargs, patch_size=32, embed_dim=1024, depth=24, num_heads=16)
