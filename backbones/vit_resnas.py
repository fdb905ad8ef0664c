"""ViT-ResNAS (Liao et al., 2021, "Searching for Efficient Multi-Stage Vision Transformers").

A convolutional stem cuts the image into 14x14 patches; three stages of pre-norm transformer blocks follow
at 1/14, 1/28 and 1/56 of the input. Between stages a residual spatial reduction halves the patch grid:
LayerNorm, a 3x3 stride-2 convolution to the next width and a new position embedding, plus a skip path of
2x2 average pooling with zero-padded channels; the class token goes through a linear layer plus its own
zero-padded self. Every block has its own number of heads (of a per-stage head width, so the attention
width need not equal the token width) and its own MLP width: the searched networks are heterogeneous.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .base import Backbone, FeatureInfo
from .layers import DropPath, Mlp, resample_pos_embed, to_tuple
from .registry import build_preset, register


class ResNASAttention(nn.Module):
    """Multi-head self-attention whose width ``num_heads * head_dim`` may differ from the token width."""

    def __init__(
        self, dim: int, num_heads: int, head_dim: int, *, qkv_bias: bool = True, attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(num_heads * head_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(rearrange(x, "b h n d -> b n (h d)")))


class ResNASBlock(nn.Module):
    """Pre-norm transformer block with its own attention width and MLP hidden width."""

    def __init__(
        self, dim: int, num_heads: int, head_dim: int, mlp_hidden_dim: int, *, qkv_bias: bool = True,
        proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = ResNASAttention(
            dim, num_heads, head_dim, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop
        )
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, mlp_hidden_dim, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def _conv_bn_relu(in_chans: int, out_chans: int, stride: int) -> nn.Sequential:
    conv = nn.Conv2d(in_chans, out_chans, 3, stride=stride, padding=1, bias=False)
    return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(out_chans), act=nn.ReLU()))


class ConvPatchEmbed(nn.Module):
    """The release's ``PatchConvEmbed``: a stride-2 3x3 conv, two more 3x3 convs with a skip around them
    (each conv + BatchNorm + ReLU), then a ``patch_size // 2`` strided projection to ``embed_dim``."""

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int, mid_chans: int) -> None:
        super().__init__()
        if patch_size % 2:
            raise ValueError(f"patch_size must be even (a stride-2 conv comes first), got {patch_size}")
        self.conv1 = _conv_bn_relu(in_chans, mid_chans, stride=2)
        self.conv2 = _conv_bn_relu(mid_chans, mid_chans, stride=1)
        self.conv3 = _conv_bn_relu(mid_chans, mid_chans, stride=1)
        self.proj = nn.Conv2d(mid_chans, embed_dim, patch_size // 2, stride=patch_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return self.proj(x + self.conv3(self.conv2(x)))  # [B, C, H/p, W/p]


class ResidualSpatialReduction(nn.Module):
    """Halve the patch grid and widen the tokens ``[B, P + h*w, C_in] -> [B, P + h/2*w/2, C_out]``.

    Patches: LayerNorm, 3x3 stride-2 conv and a new position embedding, plus 2x2 average pooling of the
    un-normalised tokens zero-padded to ``out_dim`` channels. Prefix (class) tokens: the same LayerNorm and a
    linear layer, plus their zero-padded selves.
    """

    def __init__(
        self, in_dim: int, out_dim: int, grid: Sequence[int], *, num_prefix_tokens: int = 1,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        if out_dim < in_dim:
            raise ValueError(f"a spatial reduction cannot narrow the tokens (zero-padded skip): {in_dim} -> {out_dim}")
        self.num_prefix_tokens = num_prefix_tokens
        self.pad = out_dim - in_dim
        self.grid = tuple(g // 2 for g in grid)  # the grid ``pos_embed`` is built for
        self.norm = norm_layer(in_dim)
        self.conv = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1)
        self.token_proj = nn.Linear(in_dim, out_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.grid), out_dim))

    def forward(self, x: torch.Tensor, grid: Sequence[int]) -> tuple[torch.Tensor, tuple[int, ...]]:
        h, w = grid
        p = self.num_prefix_tokens
        new_grid = (h // 2, w // 2)
        pooled = F.avg_pool2d(rearrange(x[:, p:], "b (h w) c -> b c h w", h=h, w=w), 2)
        skip = torch.cat([x[:, :p], rearrange(pooled, "b c h w -> b (h w) c")], dim=1)
        skip = F.pad(skip, (0, self.pad))  # zero channels up to out_dim
        y = self.norm(x)
        patches = self.conv(rearrange(y[:, p:], "b (h w) c -> b c h w", h=h, w=w))
        patches = rearrange(patches, "b c h w -> b (h w) c") + resample_pos_embed(self.pos_embed, self.grid, new_grid)
        return torch.cat([self.token_proj(y[:, :p]), patches], dim=1) + skip, new_grid


class ResNASStage(nn.Module):
    """An optional spatial reduction into the stage, then its blocks."""

    def __init__(self, reduce: ResidualSpatialReduction | None, blocks: Sequence[ResNASBlock]) -> None:
        super().__init__()
        self.reduce = reduce
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, grid: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, ...]]:
        if self.reduce is not None:
            x, grid = self.reduce(x, grid)
        for block in self.blocks:
            x = block(x)
        return x, grid


class ViTResNAS(Backbone):
    """Multi-stage ViT with residual spatial reduction; the searched ViT-ResNAS networks are its presets.

    The architecture is given as plain per-stage and per-block lists, the form a super-network's
    ``extract()`` produces. Inputs of other sizes than ``img_size`` work through interpolated position
    embeddings as long as each side is even and its patch grid (side // patch_size) halves evenly at every
    reduction: a multiple of ``patch_size * 2**(stages - 1)`` (56) always fits.

    Args:
        img_size: input size the position embeddings are built for.
        in_chans: input channels.
        patch_size: stride of the convolutional stem (even: a stride-2 conv, then a ``patch_size // 2`` one).
        stem_channels: width of the stem's 3x3 convolutions.
        embed_dims: token width of each stage (non-decreasing: the reduction's skip path zero-pads).
        num_heads: per stage, the number of heads of each block; the stage's depth is its length.
        mlp_hidden_dims: per stage, the MLP hidden width of each block.
        head_dims: per stage, the width of one head (the attention width is ``heads * head_dim``).
        depth: keep only the first ``depth`` blocks of every stage (a shallower sub-network for quick runs);
            ``None`` keeps them all.
        out_indices: stages whose outputs ``forward`` returns, shallow to deep; default all.
        qkv_bias: bias on the query/key/value projection.
        drop_rate, attn_drop_rate, drop_path_rate: dropout after embeddings/projections, in attention, and
            the stochastic-depth rate reached by the last block (linear over all blocks of all stages).
        norm_eps: LayerNorm epsilon (1e-6 in the release).
    """

    num_prefix_tokens = 1
    default_pool = "cls"

    def __init__(
        self,
        *,
        img_size: int | Sequence[int] = 224,
        in_chans: int = 3,
        patch_size: int = 14,
        stem_channels: int = 24,
        embed_dims: Sequence[int],
        num_heads: Sequence[Sequence[int]],
        mlp_hidden_dims: Sequence[Sequence[int]],
        head_dims: Sequence[int] = (32, 48, 64),
        depth: int | None = None,
        out_indices: Sequence[int] | None = None,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        num_heads, mlp_hidden_dims = _check_arch(embed_dims, num_heads, head_dims, mlp_hidden_dims, depth)
        n = len(embed_dims)
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.embed_dims = tuple(embed_dims)
        self.num_features = embed_dims[-1]
        self.img_size = to_tuple(img_size, 2, "img_size")
        self.patch_embed = ConvPatchEmbed(
            patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dims[0], mid_chans=stem_channels
        )
        self.grid = self.check_size(self.img_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[0]))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + math.prod(self.grid), embed_dims[0]))
        self.pos_drop = nn.Dropout(drop_rate)
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        total = sum(len(h) for h in num_heads)
        rates = iter(torch.linspace(0, drop_path_rate, total, device="cpu").tolist())
        stages, grid = [], self.grid
        for i in range(n):
            reduce = None
            if i > 0:
                reduce = ResidualSpatialReduction(embed_dims[i - 1], embed_dims[i], grid, norm_layer=norm_layer)
                grid = reduce.grid
            blocks = [
                ResNASBlock(
                    embed_dims[i], heads, head_dims[i], hidden, qkv_bias=qkv_bias, proj_drop=drop_rate,
                    attn_drop=attn_drop_rate, drop_path=next(rates), norm_layer=norm_layer,
                )
                for heads, hidden in zip(num_heads[i], mlp_hidden_dims[i])
            ]
            stages.append(ResNASStage(reduce, blocks))
        self.stages = nn.ModuleList(stages)
        self.norm = norm_layer(embed_dims[-1])
        indices = list(range(n)) if out_indices is None else [i % n if -n <= i < n else i for i in out_indices]
        if not indices or any(not 0 <= i < n for i in indices) or sorted(set(indices)) != indices:
            raise ValueError(f"out_indices must be increasing stage indices in [-{n}, {n}), got {out_indices}")
        self.out_indices = indices
        self.feature_info = [
            FeatureInfo(channels=embed_dims[i], stride=(patch_size * 2**i,) * 2) for i in indices
        ]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The release's initialisation: truncated normal (std 0.02) for linear layers, position embeddings
        and the class token, zero biases; convolutions keep PyTorch's defaults."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, ResidualSpatialReduction):
                nn.init.trunc_normal_(m.pos_embed, std=0.02)
            elif isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def check_size(self, size: Sequence[int]) -> tuple[int, ...]:
        """The stem's patch grid of an input of spatial ``size``; a ValueError when it does not fit."""
        factor = 2 ** (len(self.embed_dims) - 1)
        grid = tuple(s // self.patch_size for s in size)
        if any(s % 2 or g == 0 or g % factor for s, g in zip(size, grid)):
            raise ValueError(
                f"{type(self).__name__} cannot take input size {tuple(size)}: each side must be even and its "
                f"patch grid (side // {self.patch_size}) divisible by {factor}; a multiple of "
                f"{self.patch_size * factor} always fits"
            )
        return grid

    def no_weight_decay(self) -> set[str]:
        """Only the class token, as in the release (its position embeddings are weight-decayed)."""
        return {"cls_token"}

    def adapt_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        """Position embeddings of a square grid of another size (a checkpoint fine-tuned at 280²) are
        resampled to ours."""
        if name == "pos_embed":
            module, prefix, target = self, 1, self.grid
        elif name.startswith("stages.") and name.endswith(".reduce.pos_embed"):
            module, prefix = self.stages[int(name.split(".")[1])].reduce, 0
            target = module.grid
        else:
            return None
        side = math.isqrt(tensor.shape[1] - prefix)
        if tensor.ndim != 3 or side * side != tensor.shape[1] - prefix or tensor.shape[2] != module.pos_embed.shape[2]:
            return None
        return resample_pos_embed(tensor, (side, side), target, prefix)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Stem tokens with the class token and position embeddings: ``[B, 1 + N, C_0]`` and the grid."""
        self.check_input(x)
        grid = self.check_size(x.shape[2:])
        x = rearrange(self.patch_embed(x), "b c h w -> b (h w) c")
        pos = resample_pos_embed(self.pos_embed, self.grid, grid, 1)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos
        return self.pos_drop(x), grid

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        x, grid = self.embed(x)
        for stage in self.stages:
            x, grid = stage(x, grid)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, grid = self.embed(x)
        outs = []
        for i in range(self.out_indices[-1] + 1):
            x, grid = self.stages[i](x, grid)
            if i in self.out_indices:
                y = self.norm(x) if i == len(self.stages) - 1 else x
                h, w = grid
                outs.append(rearrange(y[:, 1:], "b (h w) c -> b c h w", h=h, w=w))
        return outs


def _check_arch(
    embed_dims: Sequence[int], num_heads: Sequence[Sequence[int]], head_dims: Sequence[int],
    mlp_hidden_dims: Sequence[Sequence[int]], depth: int | None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Validate the per-stage lists; return the per-block ones, cut to ``depth`` blocks per stage."""
    n = len(embed_dims)
    if n == 0 or not len(num_heads) == len(head_dims) == len(mlp_hidden_dims) == n:
        raise ValueError(
            f"embed_dims, num_heads, head_dims and mlp_hidden_dims need one entry per stage, got "
            f"{len(embed_dims)}, {len(num_heads)}, {len(head_dims)} and {len(mlp_hidden_dims)}"
        )
    heads, hidden = [list(h) for h in num_heads], [list(m) for m in mlp_hidden_dims]
    for i, (h, m) in enumerate(zip(heads, hidden)):
        if len(h) != len(m):
            raise ValueError(f"stage {i}: {len(h)} entries in num_heads but {len(m)} in mlp_hidden_dims")
    if any(b < a for a, b in itertools.pairwise(embed_dims)):
        raise ValueError(f"embed_dims must not decrease from stage to stage, got {tuple(embed_dims)}")
    if depth is not None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        heads, hidden = [h[:depth] for h in heads], [m[:depth] for m in hidden]
    return heads, hidden


def _resnas(overrides: dict[str, Any], **arch: Any) -> ViTResNAS:
    return build_preset(ViTResNAS, arch, overrides)  # type: ignore[return-value]


@register
def vit_resnas_tiny(**kwargs: Any) -> ViTResNAS:
    """ViT-ResNAS-Tiny: 176/352/704 wide, 5/6/5 blocks (release ``scripts/vit-sr-nas/searched_net/tiny.sh``)."""
    return _resnas(
        kwargs, embed_dims=(176, 352, 704), head_dims=(32, 48, 64),
        num_heads=((3, 3, 3, 4, 4), (10, 8, 8, 8, 10, 10), (10, 10, 10, 8, 8)),
        mlp_hidden_dims=(
            (704, 576, 640, 576, 704), (1408, 1408, 1280, 1408, 1280, 1024), (2560, 1792, 2816, 2816, 2560),
        ),
    )


@register
def vit_resnas_small(**kwargs: Any) -> ViTResNAS:
    """ViT-ResNAS-Small: 220/440/880 wide, 6/6/5 blocks (release ``searched_net/small_mac@2.9G.sh``)."""
    return _resnas(
        kwargs, embed_dims=(220, 440, 880), head_dims=(32, 48, 64),
        num_heads=((5, 5, 7, 5, 5, 5), (10, 10, 10, 10, 12, 12), (16, 12, 16, 12, 14)),
        mlp_hidden_dims=(
            (880, 880, 800, 720, 720, 720), (1760, 1440, 1920, 1600, 1600, 1440), (3200, 3200, 2880, 2240, 2560),
        ),
    )


@register
def vit_resnas_medium(**kwargs: Any) -> ViTResNAS:
    """ViT-ResNAS-Medium: 240/640/880 wide, 7/7/6 blocks (release ``searched_net/medium_mac@4.6G.sh``)."""
    return _resnas(
        kwargs, embed_dims=(240, 640, 880), head_dims=(32, 48, 64),
        num_heads=((7, 6, 7, 8, 7, 8, 6), (10, 14, 14, 16, 14, 16, 16), (16, 10, 16, 12, 16, 14)),
        mlp_hidden_dims=(
            (960, 960, 800, 960, 880, 880, 800), (1120, 1760, 1920, 1760, 1440, 1760, 1920),
            (3200, 3840, 3840, 3200, 3520, 3520),
        ),
    )


@register
def vit_resnas(**kwargs: Any) -> ViTResNAS:
    """Any ViT-ResNAS architecture from its full keyword arguments (``embed_dims``, ``num_heads``,
    ``mlp_hidden_dims``...: what a search writes); unset ones are ViT-ResNAS-Tiny's."""
    return vit_resnas_tiny(**kwargs)


from .formats import vit_resnas as vit_resnas_weights  # noqa: F401  (registers the release checkpoint format)
