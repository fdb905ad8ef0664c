"""EfficientFormerV2 (Li et al., 2022, "Rethinking Vision Transformers for MobileNet Size and Speed").

A four-stage hybrid at strides 4/8/16/32: a stem of two stride-2 3x3 convolutions; blocks whose feed-forward part
is a 1x1 conv, a depthwise 3x3 conv and a 1x1 conv (each with BatchNorm, under a layer scale); in the last
blocks of stages 3 and 4 also multi-head self-attention with talking heads, a local depthwise value branch and
learned attention biases over relative offsets (stride 2 in stage 3). Stages 2 and 3 open with a stride-2 conv;
stage 4 with the local-global attention downsampling (queries from a strided depthwise conv plus subsampling).

The attention biases are kept as tables over the grid of ``img_size`` (timm's and the release's layout) and are
resampled bicubically to the grid of the actual input, as position embeddings are, so any input whose sides are
multiples of 32 works. ``fuse()`` turns the network into its inference form: every BatchNorm folded into the
convolution before it, the layer scales into the convolutions closing their branches, the attention scale into
the queries, and the subsampled query path into the centre tap of the strided depthwise conv; on a CPU the maps
then stay channels-last and each convolution runs with its GELU as one oneDNN call (``conv_fusion``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .base import Backbone, FeatureInfo
from .conv_fusion import channels_last_input, conv_act, forget_packed, to_channels_last, version
from .layers import DropPath, resample_pos_embed, to_tuple
from .registry import build_preset, register


class ConvNorm(nn.Module):
    """Convolution (``kernel_size // 2`` padding), BatchNorm and an optional activation."""

    def __init__(
        self, in_chans: int, out_chans: int, kernel_size: int = 1, *, stride: int = 1, groups: int = 1,
        act_layer: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups)
        self.bn: nn.Module = nn.BatchNorm2d(out_chans)
        self.act = act_layer() if act_layer is not None else nn.Identity()
        self.register_load_state_dict_post_hook(forget_packed)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, *, inplace: bool = False) -> torch.Tensor:
        """``act(bn(conv(x)))``, plus ``residual`` when given, which the folded form adds inside the convolution,
        writing the result into ``residual`` itself when ``inplace`` allows it."""
        if isinstance(self.bn, nn.Identity):  # folded: conv with its activation or residual as one oneDNN call
            return conv_act(self.conv, self.act, x, residual, inplace=inplace)
        out = self.act(self.bn(self.conv(x)))
        return out if residual is None else out + residual

    @torch.no_grad()
    def fuse(self, out_scale: torch.Tensor | None = None) -> None:
        """Fold the BatchNorm into the convolution, then a per-channel ``out_scale`` (a layer scale)."""
        if isinstance(self.bn, nn.BatchNorm2d):
            factor = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
            self.conv.weight.mul_(factor.view(-1, 1, 1, 1))
            self.conv.bias.copy_((self.conv.bias - self.bn.running_mean) * factor + self.bn.bias)
            self.bn = nn.Identity()
        if out_scale is not None:
            if not isinstance(self.act, nn.Identity):
                raise ValueError("an output scale cannot be folded through an activation")
            self.conv.weight.mul_(out_scale.view(-1, 1, 1, 1))
            self.conv.bias.mul_(out_scale)


class LayerScale2d(nn.Module):
    """Per-channel scale of a residual branch ``[B, C, H, W]``."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, -1, 1, 1)


class ConvMlp(nn.Module):
    """The feed-forward branch: 1x1 conv, depthwise 3x3 conv (both BN + GELU), 1x1 conv + BN."""

    def __init__(self, dim: int, hidden_dim: int, *, drop: float = 0.0, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = ConvNorm(dim, hidden_dim, act_layer=act_layer)
        self.mid = ConvNorm(hidden_dim, hidden_dim, 3, groups=hidden_dim, act_layer=act_layer)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = ConvNorm(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, *, inplace: bool = False) -> torch.Tensor:
        """The branch, plus ``residual`` when given (the inference form's: no dropout after it; see ConvNorm)."""
        if residual is not None:
            return self.fc2(self.drop1(self.mid(self.fc1(x))), residual, inplace=inplace)
        return self.drop2(self.fc2(self.drop1(self.mid(self.fc1(x)))))

    def fuse(self, out_scale: torch.Tensor | None = None) -> None:
        self.fc1.fuse()
        self.mid.fuse()
        self.fc2.fuse(out_scale)


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


class Downsample(nn.Module):
    """Opens a stage: a stride-2 3x3 conv + BN, plus the attention downsampling when ``attn`` is given."""

    def __init__(self, in_dim: int, out_dim: int, attn: AttentionDownsample | None = None) -> None:
        super().__init__()
        self.conv = ConvNorm(in_dim, out_dim, 3, stride=2)
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if self.attn is None:
            return out
        return self.attn(x, residual=out) if self.attn.fused else out + self.attn(x)

    def fuse(self) -> None:
        self.conv.fuse()
        if self.attn is not None:
            self.attn.fuse()


class EfficientFormerV2Block(nn.Module):
    """An optional attention branch, then the feed-forward branch; both residual, under layer scales."""

    def __init__(
        self, dim: int, hidden_dim: int, *, attn: TalkingHeadAttention | None = None, drop: float = 0.0,
        drop_path: float = 0.0, layer_scale_init_value: float = 1e-5,
    ) -> None:
        super().__init__()
        self.token_mixer = attn
        self.ls1 = LayerScale2d(dim, layer_scale_init_value) if attn is not None else None
        self.drop_path1 = DropPath(drop_path) if attn is not None else None
        self.mlp = ConvMlp(dim, hidden_dim, drop=drop)
        self.ls2: nn.Module = LayerScale2d(dim, layer_scale_init_value)
        self.drop_path2 = DropPath(drop_path)
        self.fused = False

    def forward(self, x: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
        """``inplace``: the inference form may add the branches into ``x`` itself (the caller no longer needs it)."""
        if self.fused:  # layer scales folded; each branch's closing convolution adds the residual
            if self.token_mixer is not None:
                x = self.token_mixer(x, residual=x, inplace=inplace)
                inplace = True  # a map of our own now
            return self.mlp(x, residual=x, inplace=inplace)
        if self.token_mixer is not None:
            x = x + self.drop_path1(self.ls1(self.token_mixer(x)))
        return x + self.drop_path2(self.ls2(self.mlp(x)))

    def fuse(self) -> None:
        if self.token_mixer is not None and isinstance(self.ls1, LayerScale2d):
            self.token_mixer.fuse(self.ls1.gamma)
            self.ls1 = nn.Identity()
        if isinstance(self.ls2, LayerScale2d):
            self.mlp.fuse(self.ls2.gamma)
            self.ls2 = nn.Identity()
        self.fused = True


class EfficientFormerV2Stage(nn.Module):
    """An optional downsampling into the stage, then its blocks."""

    def __init__(self, downsample: Downsample | None, blocks: Sequence[EfficientFormerV2Block]) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owned = self.downsample is not None  # whether x is a map of the stage's own, which blocks may update
        if owned:
            x = self.downsample(x)
        for block in self.blocks:
            x = block(x, inplace=owned)
            owned = True
        return x


class EfficientFormerV2(Backbone):
    """EfficientFormerV2: the four published networks are presets of this class.

    ``forward`` returns the stage outputs at strides 4/8/16/32 (the last one through the final BatchNorm);
    ``forward_pooled`` is the classifier's input, that norm and a global mean, as in the release and timm, whose
    classifier (``head``) and distillation classifier (``head_dist``) load onto a distilled ``ClassificationHead``.
    Input sides must be multiples of 32.

    Args:
        embed_dims: width of each stage.
        depths: blocks per stage.
        mlp_ratios: per stage, one expansion ratio of the feed-forward branch or one per block.
        attention_blocks: how many of the last blocks of stages 3 and 4 also have attention.
        img_size: input size the attention-bias tables are sized for (they are resampled for other sizes).
        in_chans: input channels.
        out_indices: stages whose outputs ``forward`` returns, shallow to deep; default all.
        drop_rate: dropout inside the feed-forward branches.
        drop_path_rate: stochastic-depth rate reached by the last block (linear over all blocks).
        layer_scale_init_value: initial layer scales.
        distilled: the classifier built over ``forward_pooled`` has a second, distillation classifier (the
            published networks were trained with one; their logits average both).
    """

    default_pool = "native"

    def __init__(
        self,
        *,
        embed_dims: Sequence[int],
        depths: Sequence[int],
        mlp_ratios: Sequence[float | Sequence[float]] = (4, 4, 4, 4),
        attention_blocks: int = 2,
        img_size: int | Sequence[int] = 224,
        in_chans: int = 3,
        out_indices: Sequence[int] | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-5,
        distilled: bool = True,
    ) -> None:
        super().__init__()
        n = len(embed_dims)
        ratios = _per_block_ratios(embed_dims, depths, mlp_ratios)
        self.in_chans = in_chans
        self.embed_dims = tuple(embed_dims)
        self.num_features = embed_dims[-1]
        self.distilled = distilled
        self.img_size = to_tuple(img_size, 2, "img_size")
        self.fused = False
        self.stem = nn.Sequential()
        self.stem.add_module("conv1", ConvNorm(in_chans, embed_dims[0] // 2, 3, stride=2, act_layer=nn.GELU))
        self.stem.add_module("conv2", ConvNorm(embed_dims[0] // 2, embed_dims[0], 3, stride=2, act_layer=nn.GELU))
        rates = iter(torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist())
        stages = []
        for i in range(n):
            grid = tuple(math.ceil(s / 2 ** (i + 2)) for s in self.img_size)  # the stage's grid at img_size
            downsample = None
            if i > 0:
                attn = None
                if i >= 3:
                    prev = tuple(math.ceil(s / 2 ** (i + 1)) for s in self.img_size)
                    attn = AttentionDownsample(embed_dims[i - 1], embed_dims[i], table_grid=prev)
                downsample = Downsample(embed_dims[i - 1], embed_dims[i], attn)
            blocks = []
            for j, ratio in enumerate(ratios[i]):
                attn = None
                if i >= 2 and j >= depths[i] - attention_blocks:
                    stride = 2 if i == 2 else 1
                    table = tuple(math.ceil(g / stride) for g in grid)
                    attn = TalkingHeadAttention(embed_dims[i], table_grid=table, stride=stride)
                blocks.append(EfficientFormerV2Block(
                    embed_dims[i], int(embed_dims[i] * ratio), attn=attn, drop=drop_rate, drop_path=next(rates),
                    layer_scale_init_value=layer_scale_init_value,
                ))
            stages.append(EfficientFormerV2Stage(downsample, blocks))
        self.stages = nn.ModuleList(stages)
        self.norm = nn.BatchNorm2d(embed_dims[-1])
        indices = list(range(n)) if out_indices is None else [i % n if -n <= i < n else i for i in out_indices]
        if not indices or any(not 0 <= i < n for i in indices) or sorted(set(indices)) != indices:
            raise ValueError(f"out_indices must be increasing stage indices in [-{n}, {n}), got {out_indices}")
        self.out_indices = indices
        self.feature_info = [FeatureInfo(channels=embed_dims[i], stride=(2 ** (i + 2),) * 2) for i in indices]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The release's initialisation: the feed-forward 1x1 convs truncated normal (std 0.02) with zero
        biases; other convolutions PyTorch's defaults; attention biases zero."""
        for m in self.modules():
            if isinstance(m, ConvMlp):
                for conv in (m.fc1.conv, m.fc2.conv):
                    nn.init.trunc_normal_(conv.weight, std=0.02)
                    nn.init.zeros_(conv.bias)

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.stages) + 1)

    def check_size(self, size: Sequence[int]) -> None:
        """A ValueError when a side of the input is not a multiple of 32 (each stage halves the grid exactly)."""
        m = self.size_multiple
        if any(s % m or s == 0 for s in size):
            raise ValueError(
                f"{type(self).__name__} cannot take input size {tuple(size)}: each side must be a multiple of {m} "
                f"(resize or pad the input, e.g. to {tuple(max(m, round(s / m) * m) for s in size)})"
            )

    def no_weight_decay(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if name.endswith("attention_biases")}

    def adapt_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        """Attention-bias tables of a square grid of another size (a checkpoint made at another ``img_size``)
        are resampled to ours."""
        if not name.endswith("attention_biases"):
            return None
        module = self.get_submodule(name.rsplit(".", 1)[0])
        side = math.isqrt(tensor.shape[-1])
        if tensor.ndim != 2 or tensor.shape[0] != module.num_heads or side * side != tensor.shape[1]:
            return None
        return resample_pos_embed(tensor.t()[None], (side, side), module.table_grid)[0].t()

    def run_stages(self, x: torch.Tensor, last: int) -> list[torch.Tensor]:
        """The raw outputs of stages ``0..last``."""
        self.check_input(x)
        self.check_size(x.shape[2:])
        if self.fused:
            x = channels_last_input(x)
        x = self.stem(x)
        outs = []
        for stage in self.stages[: last + 1]:
            x = stage(x)
            outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = self.run_stages(x, self.out_indices[-1])
        last = len(self.stages) - 1
        return [self.norm(outs[i]) if i == last else outs[i] for i in self.out_indices]

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's input ``[B, C]``: the final norm and a global mean (in eval the norm is a per-channel
        affine map, applied after the mean, where it costs ``HW`` times less)."""
        x = self.run_stages(x, len(self.stages) - 1)[-1]
        if self.training:
            return self.norm(x).mean((2, 3))
        return self.norm(x.mean((2, 3), keepdim=True)).flatten(1)

    @torch.no_grad()
    def fuse(self) -> EfficientFormerV2:
        """Switch to the inference form in place (see the module docstring) and to eval mode; returns ``self``.
        Outputs equal the unfused network's in eval; a fused network cannot be trained."""
        self.eval()
        for conv in self.stem:
            conv.fuse()
        for stage in self.stages:
            if stage.downsample is not None:
                stage.downsample.fuse()
            for block in stage.blocks:
                block.fuse()
        to_channels_last(self)
        self.fused = True
        return self

    def train(self, mode: bool = True) -> EfficientFormerV2:
        if mode and self.fused:
            raise RuntimeError("a fused EfficientFormerV2 is an inference network; build a new one to train")
        return super().train(mode)


def _per_block_ratios(
    embed_dims: Sequence[int], depths: Sequence[int], mlp_ratios: Sequence[float | Sequence[float]]
) -> list[list[float]]:
    """Validate the per-stage lists; return one expansion ratio per block."""
    if not len(embed_dims) == len(depths) == len(mlp_ratios) or len(embed_dims) < 3:
        raise ValueError(
            f"embed_dims, depths and mlp_ratios need one entry per stage (at least 3), got {len(embed_dims)}, "
            f"{len(depths)} and {len(mlp_ratios)}"
        )
    ratios = []
    for i, (depth, r) in enumerate(zip(depths, mlp_ratios)):
        per_block = [float(r)] * depth if isinstance(r, (int, float)) else [float(v) for v in r]
        if len(per_block) != depth:
            raise ValueError(f"stage {i}: {len(per_block)} expansion ratios for {depth} blocks")
        ratios.append(per_block)
    return ratios


def _efficientformerv2(overrides: dict[str, Any], **arch: Any) -> EfficientFormerV2:
    return build_preset(EfficientFormerV2, arch, overrides)  # type: ignore[return-value]


@register
def efficientformerv2_s0(**kwargs: Any) -> EfficientFormerV2:
    """EfficientFormerV2-S0: 32/48/96/176 wide, 2/2/6/4 blocks, 2 attention blocks in stages 3 and 4."""
    return _efficientformerv2(
        kwargs, embed_dims=(32, 48, 96, 176), depths=(2, 2, 6, 4), attention_blocks=2,
        mlp_ratios=(4, 4, (4, 3, 3, 3, 4, 4), (4, 3, 3, 4)),
    )


@register
def efficientformerv2_s1(**kwargs: Any) -> EfficientFormerV2:
    """EfficientFormerV2-S1: 32/48/120/224 wide, 3/3/9/6 blocks, 2 attention blocks in stages 3 and 4."""
    return _efficientformerv2(
        kwargs, embed_dims=(32, 48, 120, 224), depths=(3, 3, 9, 6), attention_blocks=2,
        mlp_ratios=(4, 4, (4, 4, 3, 3, 3, 3, 4, 4, 4), (4, 4, 3, 3, 4, 4)),
    )


@register
def efficientformerv2_s2(**kwargs: Any) -> EfficientFormerV2:
    """EfficientFormerV2-S2: 32/64/144/288 wide, 4/4/12/8 blocks, 4 attention blocks in stages 3 and 4."""
    return _efficientformerv2(
        kwargs, embed_dims=(32, 64, 144, 288), depths=(4, 4, 12, 8), attention_blocks=4, drop_path_rate=0.02,
        mlp_ratios=(4, 4, (4, 4, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4), (4, 4, 3, 3, 3, 3, 4, 4)),
    )


@register
def efficientformerv2_l(**kwargs: Any) -> EfficientFormerV2:
    """EfficientFormerV2-L: 40/80/192/384 wide, 5/5/15/10 blocks, 6 attention blocks in stages 3 and 4."""
    return _efficientformerv2(
        kwargs, embed_dims=(40, 80, 192, 384), depths=(5, 5, 15, 10), attention_blocks=6, drop_path_rate=0.1,
        mlp_ratios=(4, 4, (4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4), (4, 4, 4, 3, 3, 3, 3, 4, 4, 4)),
    )
from . import efficientformer_v2_weights  # noqa: E402,F401  (timm and release checkpoint formats)
