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
then stay channels-last and each convolution runs with its GELU, or with the residual it closes, as one oneDNN call
on weights kept in oneDNN's layout (``conv_fusion``). The convolutional parts are in ``efficientformer_v2_layers``,
the attentions in ``efficientformer_v2_attention``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .base import Backbone, FeatureInfo
from ops.conv_fusion import channels_last_input, to_channels_last
from .efficientformer_v2_attention import AttentionDownsample, LocalGlobalQuery, TalkingHeadAttention
from .efficientformer_v2_layers import ConvMlp, ConvNorm, LayerScale2d
from .layers import DropPath, resample_pos_embed, to_tuple
from .registry import build_preset, register

__all__ = [  # the parts, importable from here as before
    "AttentionDownsample", "ConvMlp", "ConvNorm", "Downsample", "EfficientFormerV2", "EfficientFormerV2Block",
    "EfficientFormerV2Stage", "LayerScale2d", "LocalGlobalQuery", "TalkingHeadAttention",
]


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
from .formats import efficientformer_v2 as efficientformer_v2_weights  # noqa: E402,F401  (timm and release checkpoint formats)
