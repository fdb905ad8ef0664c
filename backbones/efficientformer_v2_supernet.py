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

A sub-network is a plain dict (YAML- and JSON-friendly)::

    {"embed_dims": [w0, w1, w2, w3], "mlp_ratios": [[e, ...], ...], "keep": [[True, False, ...], ...]}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .base import SubnetPasses
from .efficientformer_v2 import ConvNorm, EfficientFormerV2, LocalGlobalQuery
from .layers import to_tuple
from .registry import build_preset, register

SubnetConfig = dict[str, Any]
WIDTH_STEP = 16


@dataclass(frozen=True)
class EfficientFormerV2Space:
    """Per stage: widths (widest first, steps of ``WIDTH_STEP``), blocks, the blocks that may be dropped; per
    block: the expansion ratios (largest first)."""

    embed_dims: tuple[tuple[int, ...], ...]
    mlp_ratios: tuple[float, ...]
    depths: tuple[int, ...]
    removable: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, embed_dims: Sequence[int], min_embed_dims: Sequence[int], mlp_ratio_choices: Sequence[float],
              depths: Sequence[int], attention_blocks: int) -> EfficientFormerV2Space:
        n = len(depths)
        if len(embed_dims) != n or len(min_embed_dims) != n:
            raise ValueError(f"embed_dims, min_embed_dims and depths need one entry per stage, got {list(embed_dims)}, "
                             f"{list(min_embed_dims)}, {list(depths)}")
        widths = []
        for s, (hi, lo) in enumerate(zip(embed_dims, min_embed_dims)):
            if not 0 < lo <= hi or (hi - lo) % WIDTH_STEP or lo % 2:
                raise ValueError(f"stage {s}: widths from embed_dims {hi} down to min_embed_dims {lo} must go in steps "
                                 f"of {WIDTH_STEP} and be even and positive (e.g. min_embed_dims {hi - WIDTH_STEP * ((hi - 1) // WIDTH_STEP)})")
            widths.append(tuple(range(hi, lo - 1, -WIDTH_STEP)))
        ratios = tuple(sorted({float(r) for r in mlp_ratio_choices}, reverse=True))
        if not ratios or ratios[-1] <= 0:
            raise ValueError(f"mlp_ratio_choices must be positive, got {list(mlp_ratio_choices)}")
        removable = []
        for s, d in enumerate(depths):
            attn = attention_blocks if s >= 2 else 0
            if d < 1 or d < attn:
                raise ValueError(f"stage {s}: depth {d} is below its {attn} attention blocks")
            removable.append(tuple(range(1, max(1, d - attn))))
        return cls(tuple(widths), ratios, tuple(int(d) for d in depths), tuple(removable))

    def extreme(self, largest: bool) -> SubnetConfig:
        """The largest network (widest, largest ratios, every block) or the smallest (narrowest, smallest ratios,
        every removable block dropped)."""
        pick = 0 if largest else -1
        return {"embed_dims": [w[pick] for w in self.embed_dims],
                "mlp_ratios": [[self.mlp_ratios[pick]] * d for d in self.depths],
                "keep": [[largest or j not in r for j in range(d)] for d, r in zip(self.depths, self.removable)]}

    def sample(self, generator: torch.Generator) -> SubnetConfig:
        """A sub-network with every choice uniform, drawn from ``generator`` alone."""
        def pick(choices: Sequence[Any]) -> Any:
            return choices[int(torch.randint(len(choices), (1,), generator=generator))]
        return {"embed_dims": [pick(w) for w in self.embed_dims],
                "mlp_ratios": [[pick(self.mlp_ratios) for _ in range(d)] for d in self.depths],
                "keep": [[j not in r or pick((True, False)) for j in range(d)] for d, r in zip(self.depths, self.removable)]}

    def check(self, config: Any) -> SubnetConfig:
        """``config`` normalised; a ValueError naming the key and its allowed values when it is outside the space."""
        keys = {"embed_dims", "mlp_ratios", "keep"}
        if not isinstance(config, dict) or set(config) != keys:
            got = sorted(config) if isinstance(config, dict) else type(config).__name__
            raise ValueError(f"a sub-network config has keys {sorted(keys)}; got {got}")
        n = len(self.depths)
        for field in ("embed_dims", "mlp_ratios", "keep"):
            rows = config[field]
            if len(rows) != n or (field != "embed_dims" and any(len(r) != d for r, d in zip(rows, self.depths))):
                raise ValueError(f"{field} must have {n} stages" + ("" if field == "embed_dims" else
                                 f" of {list(self.depths)} blocks") + f", got {rows}")
        for s, (w, choices) in enumerate(zip(config["embed_dims"], self.embed_dims)):
            if w not in choices:
                raise ValueError(f"embed_dims[{s}] = {w!r} is outside the search space: allowed values {choices}")
        for s, d in enumerate(self.depths):
            for j in range(d):
                if config["mlp_ratios"][s][j] not in self.mlp_ratios:
                    raise ValueError(f"mlp_ratios[{s}][{j}] = {config['mlp_ratios'][s][j]!r} is outside the search "
                                     f"space: allowed values {self.mlp_ratios}")
                if not config["keep"][s][j] and j not in self.removable[s]:
                    raise ValueError(f"keep[{s}][{j}] = False is outside the search space: block {j} of stage {s} "
                                     f"cannot be dropped (removable blocks: {self.removable[s]})")
        return {"embed_dims": [int(w) for w in config["embed_dims"]],
                "mlp_ratios": [[float(e) for e in r] for r in config["mlp_ratios"]],
                "keep": [[bool(k) for k in r] for r in config["keep"]]}


class EfficientFormerV2Supernet(EfficientFormerV2):
    """An ``EfficientFormerV2`` with the largest network of a search space, whose sub-networks run through masks.

    ``set_subnet(config)`` runs one sub-network, ``set_subnet(SubnetPasses)`` the sandwich of a training step (its
    first network active until the step switches), ``set_subnet(None)`` the largest network. ``extract(config)``
    is the sub-network as a standalone ``EfficientFormerV2``; ``params(config)`` counts its parameters.

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
                             "attention_blocks": attention_blocks, "layer_scale_init_value": layer_scale_init_value}
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
                "mlp_ratios": ratios, "distilled": False}

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


def _masked(x: torch.Tensor, width: int) -> torch.Tensor:
    mask = torch.arange(x.shape[1], device=x.device) < width
    return x * mask.view(1, -1, *(1,) * (x.ndim - 2)).to(x.dtype)


def count_params(arch: dict[str, Any]) -> int:
    """Parameters of ``EfficientFormerV2(**arch)`` (the attention's fixed sizes: 8 heads, key dimension 32 in the
    blocks and 16 in the downsampling, value ratio 4), without building it."""
    def conv_norm(cin: int, cout: int, k: int = 1, groups: int = 1) -> int:
        return cout * (cin // groups) * k * k + 3 * cout  # weight, bias, BN weight and bias

    dims, depths, n_attn = arch["embed_dims"], arch["depths"], arch.get("attention_blocks", 2)
    size = to_tuple(arch.get("img_size", 224), 2, "img_size")
    ratios = arch["mlp_ratios"]
    total = conv_norm(arch.get("in_chans", 3), dims[0] // 2, 3) + conv_norm(dims[0] // 2, dims[0], 3)
    for s, c in enumerate(dims):
        grid = [math.ceil(v / 2 ** (s + 2)) for v in size]
        if s > 0:
            total += conv_norm(dims[s - 1], c, 3)
            if s >= 3:
                cin, prev = dims[s - 1], [math.ceil(v / 2 ** (s + 1)) for v in size]
                total += (cin * 9 + cin) + conv_norm(cin, 128) + conv_norm(cin, 128) + conv_norm(cin, 512)
                total += conv_norm(512, 512, 3, 512) + conv_norm(512, c) + 8 * math.prod(prev)
        per_block = ratios[s] if isinstance(ratios[s], (list, tuple)) else [ratios[s]] * depths[s]
        for j, e in enumerate(per_block):
            h = int(c * e)
            total += conv_norm(c, h) + conv_norm(h, h, 3, h) + conv_norm(h, c) + c
            if s >= 2 and j >= depths[s] - n_attn:
                stride = 2 if s == 2 else 1
                table = [math.ceil(g / stride) for g in grid]
                total += c + (conv_norm(c, c, 3, c) if stride > 1 else 0) + 2 * conv_norm(c, 256) + conv_norm(c, 1024)
                total += conv_norm(1024, 1024, 3, 1024) + 2 * (8 * 8 + 8) + conv_norm(1024, c) + 8 * math.prod(table)
    return total + 2 * dims[-1]


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
