"""The EfficientFormerV2 super-network (Li et al., 2022, section 4): the weights of the largest network of the
fine-grained joint search space, any of whose sub-networks runs through channel masks, and any of which can be cut
out as an ordinary ``EfficientFormerV2`` (the class of the published presets) with sliced weights.

A sub-network keeps, per stage, the first ``w`` channels (widths in steps of 16 from the widest down to the
narrowest), per block the first ``int(w * e)`` hidden channels of its feed-forward branch (``e`` from
``mlp_ratio_choices``), and may drop blocks: any block without attention except the first of its stage (the
attention blocks stay the last ones, so the extracted network is a plain ``EfficientFormerV2`` with the same
``attention_blocks``). The attention's own widths (heads, key and value dimensions) are fixed, as in the paper.

Masks zero the outputs of every convolution past the active channels (a BatchNorm normalises each channel on its
own, so the active ones are exactly what sliced weights give); a dropped block is not run. Only the largest network
moves the BatchNorm running statistics (those of narrower networks would mix widths): its validation stays sound,
and the search re-estimates each candidate's statistics (``pruning.calibration_batches``). Training follows the
sandwich rule: ``sample_subnet`` returns ``SubnetPasses`` of the largest, the smallest and ``num_random`` random
sub-networks, which the task's training step runs one after another on the same batch, summing their losses into
one optimizer step, the largest's predictions teaching the others (in-place distillation) when
``inplace_distillation`` is set.

It implements the ``Supernet`` contract of ``backbones.base`` (what a network search needs); the search space,
its sub-network configs (plain dicts), reductions and MACs count are in ``efficientformer_v2_space``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .base import LatencyPart, SubnetPasses, Supernet
from .efficientformer_v2 import (
    AttentionDownsample, ConvNorm, Downsample, EfficientFormerV2, EfficientFormerV2Block, LocalGlobalQuery,
    TalkingHeadAttention,
)
from .efficientformer_v2_space import (  # noqa: F401  (importable from here as before)
    WIDTH_STEP, EfficientFormerV2Space, SubnetConfig, count_macs_params, count_params,
)
from .layers import to_tuple
from .registry import build_preset, register


class EfficientFormerV2Supernet(EfficientFormerV2, Supernet):
    """An ``EfficientFormerV2`` with the largest network of a search space, whose sub-networks run through masks.

    ``set_subnet(config)`` runs one sub-network, ``set_subnet(SubnetPasses)`` the sandwich of a training step (its
    first network active until the step switches), ``set_subnet(None)`` the largest network. ``extract(config)``
    is the sub-network as a standalone ``EfficientFormerV2`` (the class of the ``efficientformerv2_l`` preset);
    ``macs_params(config)`` counts its MACs and parameters.

    Args:
        embed_dims: widest width of each stage.
        min_embed_dims: narrowest width of each stage (``embed_dims`` minus a multiple of 16).
        depths: blocks per stage in the largest network.
        mlp_ratio_choices: the expansion ratios a block may have.
        attention_blocks: how many of the last blocks of stages 3 and 4 have attention (never dropped).
        num_random: random sub-networks per training step besides the largest and the smallest.
        inplace_distillation: the smaller networks of a step learn the largest's predictions instead of the labels.
        img_size, in_chans, out_indices, drop_rate, drop_path_rate, layer_scale_init_value: as ``EfficientFormerV2``.
    """

    subnet_preset = "efficientformerv2_l"

    def __init__(
        self,
        *,
        embed_dims: Sequence[int],
        min_embed_dims: Sequence[int],
        depths: Sequence[int],
        mlp_ratio_choices: Sequence[float] = (4, 3, 2),
        attention_blocks: int = 2,
        num_random: int = 2,
        inplace_distillation: bool = True,
        img_size: int | Sequence[int] = 224,
        in_chans: int = 3,
        out_indices: Sequence[int] | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-5,
    ) -> None:
        space = EfficientFormerV2Space.build(embed_dims, min_embed_dims, mlp_ratio_choices, depths, attention_blocks)
        if num_random < 0:
            raise ValueError(f"num_random must be 0 or more, got {num_random}")
        largest = space.extreme(largest=True)
        super().__init__(
            embed_dims=largest["embed_dims"], depths=space.depths, mlp_ratios=largest["mlp_ratios"],
            attention_blocks=attention_blocks, img_size=img_size, in_chans=in_chans, out_indices=out_indices,
            drop_rate=drop_rate, drop_path_rate=drop_path_rate, layer_scale_init_value=layer_scale_init_value,
            distilled=False,
        )
        self.space = space
        self.fixed_kwargs = {"img_size": list(to_tuple(img_size, 2, "img_size")), "in_chans": in_chans,
                             "attention_blocks": attention_blocks, "layer_scale_init_value": layer_scale_init_value,
                             "distilled": False}
        self.num_random = num_random
        self.inplace_distillation = inplace_distillation
        self.active: SubnetConfig | None = None
        self.passes: SubnetPasses | None = None
        self._widths: dict[nn.Module, int] = {}
        self._norms = [m for m in self.modules() if isinstance(m, nn.BatchNorm2d)]
        self.bn_momentum = 0.1
        for module in self.modules():
            if isinstance(module, (ConvNorm, LocalGlobalQuery)):
                (module if isinstance(module, ConvNorm) else module.local).register_forward_hook(self._mask_output)

    # --- choosing sub-networks --------------------------------------------------------------------------

    def sample_subnet(self, generator: torch.Generator) -> SubnetPasses:
        randoms = [self.space.sample(generator) for _ in range(self.num_random)]
        configs = (self.space.extreme(largest=True), self.space.extreme(largest=False), *randoms)
        return SubnetPasses(configs, distill=self.inplace_distillation)

    def set_subnet(self, config: SubnetConfig | SubnetPasses | None) -> None:
        self.passes = config if isinstance(config, SubnetPasses) else None
        if isinstance(config, SubnetPasses):
            config = config.configs[0]
        self.active = None if config is None else self.space.check(config)
        self._widths = {} if self.active is None else self._module_widths(self.active)
        largest = self.active is None or self.active == self.space.extreme(largest=True)
        for norm in self._norms:  # only the largest network moves the running statistics
            norm.momentum = self.bn_momentum if largest else 0.0

    def training_passes(self) -> SubnetPasses | None:
        return self.passes

    def _module_widths(self, config: SubnetConfig) -> dict[nn.Module, int]:
        """The active output channels of every masked convolution."""
        dims = config["embed_dims"]
        widths: dict[nn.Module, int] = {self.stem.conv1: dims[0] // 2, self.stem.conv2: dims[0]}
        for s, stage in enumerate(self.stages):
            if stage.downsample is not None:
                widths[stage.downsample.conv] = dims[s]
                if stage.downsample.attn is not None:
                    widths[stage.downsample.attn.q.local] = dims[s - 1]
                    widths[stage.downsample.attn.proj] = dims[s]
            for j, block in enumerate(stage.blocks):
                hidden = int(dims[s] * config["mlp_ratios"][s][j])
                widths.update({block.mlp.fc1: hidden, block.mlp.mid: hidden, block.mlp.fc2: dims[s]})
                if block.token_mixer is not None:
                    widths[block.token_mixer.proj] = dims[s]
                    if block.token_mixer.stride_conv is not None:
                        widths[block.token_mixer.stride_conv] = dims[s]
        return widths

    def _mask_output(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        width = self._widths.get(module)
        return None if width is None or width >= output.shape[1] else _masked(output, width)

    # --- masked forward ---------------------------------------------------------------------------------

    def run_stages(self, x: torch.Tensor, last: int) -> list[torch.Tensor]:
        if self.active is None:
            return super().run_stages(x, last)
        self.check_input(x)
        self.check_size(x.shape[2:])
        x = self.stem(x)
        outs = []
        for s, stage in enumerate(self.stages[: last + 1]):
            if stage.downsample is not None:
                x = stage.downsample(x)
            for block, keep in zip(stage.blocks, self.active["keep"][s]):
                if keep:
                    x = block(x)
            outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = super().forward(x)
        if self.active is None:
            return outs
        return [_masked(o, self.active["embed_dims"][i]) for o, i in zip(outs, self.out_indices)]

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward_pooled(x)
        return out if self.active is None else _masked(out, self.active["embed_dims"][-1])

    # --- standalone sub-networks ------------------------------------------------------------------------

    def arch_kwargs(self, config: SubnetConfig) -> dict[str, Any]:
        """The ``EfficientFormerV2`` arguments of a sub-network: dropped blocks left out."""
        config = self.space.check(config)
        ratios = [[e for e, k in zip(r, ks) if k] for r, ks in zip(config["mlp_ratios"], config["keep"])]
        return {**self.fixed_kwargs, "embed_dims": config["embed_dims"], "depths": [len(r) for r in ratios],
                "mlp_ratios": ratios}

    def extract(self, config: SubnetConfig) -> EfficientFormerV2:
        """The sub-network as an ``EfficientFormerV2`` with weights sliced from (copies of) the super-network's."""
        arch = self.arch_kwargs(config)
        with torch.device("meta"):
            net = EfficientFormerV2(**arch, out_indices=self.out_indices, drop_rate=self.stages[0].blocks[0].mlp.drop1.p)
        kept = [[j for j, k in enumerate(ks) if k] for ks in config["keep"]]
        ours = self.state_dict()
        state = {}
        for name, target in net.state_dict().items():
            parts = name.split(".")
            if parts[0] == "stages" and parts[2] == "blocks":
                parts[3] = str(kept[int(parts[1])][int(parts[3])])
            source = ours[".".join(parts)]
            state[name] = source[tuple(slice(0, n) for n in target.shape)].clone()
        net.load_state_dict(state, assign=True)
        return net.train(self.training)

    def params(self, config: SubnetConfig) -> int:
        """Parameters of the extracted sub-network, counted analytically."""
        return count_params(self.arch_kwargs(config))

    def macs_params(self, config: SubnetConfig) -> tuple[int, int]:
        return count_macs_params(self.arch_kwargs(config))

    # --- the search space (the Supernet contract) --------------------------------------------------------------

    def latency_parts(self, config: SubnetConfig, batch_size: int) -> list[LatencyPart]:
        """The stem at its width, every downsampling at its two widths, every kept block at its stage, width and
        hidden width, each in its inference form (``fuse()``)."""
        config = self.space.check(config)
        fixed, b = self.fixed_kwargs, batch_size
        size, attn_blocks = fixed["img_size"], fixed["attention_blocks"]
        dims = config["embed_dims"]
        grid = lambda s: [math.ceil(v / 2 ** (s + 2)) for v in size]  # noqa: E731

        def stem() -> tuple[nn.Module, tuple[torch.Tensor]]:
            layers = nn.Sequential(ConvNorm(fixed["in_chans"], dims[0] // 2, 3, stride=2, act_layer=nn.GELU),
                                   ConvNorm(dims[0] // 2, dims[0], 3, stride=2, act_layer=nn.GELU))
            return _fused(layers), (torch.randn(b, fixed["in_chans"], *size),)

        parts = [LatencyPart(f"stem:{dims[0]}", stem)]
        for s, c in enumerate(dims):
            if s > 0:
                cin, prev = dims[s - 1], grid(s - 1)

                def down(cin: int = cin, c: int = c, prev: list[int] = prev, s: int = s) -> tuple[nn.Module, tuple]:
                    attn = AttentionDownsample(cin, c, table_grid=tuple(prev)) if s >= 3 else None
                    return _fused(Downsample(cin, c, attn)), (torch.randn(b, cin, *prev),)
                parts.append(LatencyPart(f"down{s}:{cin}:{c}", down))
            for j in range(self.space.depths[s]):
                if not config["keep"][s][j]:
                    continue
                hidden, attn = int(c * config["mlp_ratios"][s][j]), s >= 2 and j >= self.space.depths[s] - attn_blocks

                def block(c: int = c, hidden: int = hidden, attn: bool = attn, s: int = s) -> tuple[nn.Module, tuple]:
                    stride, g = (2 if s == 2 else 1), grid(s)
                    mixer = TalkingHeadAttention(c, table_grid=tuple(math.ceil(v / stride) for v in g), stride=stride)
                    block = EfficientFormerV2Block(c, hidden, attn=mixer if attn else None)
                    return _fused(block), (torch.randn(b, c, *g),)
                parts.append(LatencyPart(f"block{s}:{c}:{hidden}:{int(attn)}", block))
        return parts


def _fused(module: nn.Module) -> nn.Module:
    """``module`` (or each module of a ``Sequential``) in its inference form."""
    module.eval()
    for m in module.children() if isinstance(module, nn.Sequential) else (module,):
        m.fuse()
    return module


def _masked(x: torch.Tensor, width: int) -> torch.Tensor:
    mask = torch.arange(x.shape[1], device=x.device) < width
    return x * mask.view(1, -1, *(1,) * (x.ndim - 2)).to(x.dtype)


def _supernet(overrides: dict[str, Any], **space: Any) -> EfficientFormerV2Supernet:
    return build_preset(EfficientFormerV2Supernet, space, overrides)  # type: ignore[return-value]


@register
def efficientformerv2_supernet_s(**kwargs: Any) -> EfficientFormerV2Supernet:
    """A space around S0-S2: 32-48 / 48-80 / 96-160 / 176-288 wide, 4/4/12/8 blocks, expansion ratios 4, 3 or 2,
    2 attention blocks in stages 3 and 4 (S0 lies in it)."""
    return _supernet(kwargs, embed_dims=(48, 80, 160, 288), min_embed_dims=(32, 48, 96, 176), depths=(4, 4, 12, 8),
                     attention_blocks=2)


@register
def efficientformerv2_supernet_l(**kwargs: Any) -> EfficientFormerV2Supernet:
    """A space around L: 40 (24 narrowest) / 80-48 / 192-128 / 384-288 wide, 5/5/15/10 blocks, expansion ratios
    4, 3 or 2, 6 attention blocks in stages 3 and 4 (L lies in it)."""
    return _supernet(kwargs, embed_dims=(40, 80, 192, 384), min_embed_dims=(24, 48, 128, 288), depths=(5, 5, 15, 10),
                     attention_blocks=6, drop_path_rate=0.1)
