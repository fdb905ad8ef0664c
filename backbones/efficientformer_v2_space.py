"""The fine-grained joint search space of EfficientFormerV2 (Li et al., 2022, section 4): per stage the widths (in
steps of ``WIDTH_STEP``), per block the expansion ratio, and which blocks may be dropped; its genes, the one-step
reductions of MES pruning, and the analytical MACs/parameter count of an ``EfficientFormerV2``
(``backbones/efficientformer_v2_supernet.py`` is the super-network).

A sub-network is a plain dict (YAML- and JSON-friendly)::

    {"embed_dims": [w0, w1, w2, w3], "mlp_ratios": [[e, ...], ...], "keep": [[True, False, ...], ...]}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from .base import Gene, Reduction, changed_config
from .layers import to_tuple

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

    def genes(self) -> list[Gene]:
        """Every choice in a fixed order: stage widths, then per block its expansion ratio and (if removable) keep."""
        genes: list[Gene] = [(f"embed_dims[{s}]", widths) for s, widths in enumerate(self.embed_dims)]
        for s, depth in enumerate(self.depths):
            for j in range(depth):
                genes.append((f"mlp_ratios[{s}][{j}]", self.mlp_ratios))
                if j in self.removable[s]:
                    genes.append((f"keep[{s}][{j}]", (True, False)))
        return genes

    def decode(self, values: Sequence[Any]) -> SubnetConfig:
        """The sub-network of gene ``values`` (in the order of ``genes()``)."""
        values = list(values)
        if len(values) != len(self.genes()):
            raise ValueError(f"the search space has {len(self.genes())} genes, got {len(values)} values")
        picks = iter(values)
        config: SubnetConfig = {"embed_dims": [next(picks) for _ in self.depths], "mlp_ratios": [], "keep": []}
        for s, depth in enumerate(self.depths):
            ratios, keep = [], []
            for j in range(depth):
                ratios.append(next(picks))
                keep.append(next(picks) if j in self.removable[s] else True)
            config["mlp_ratios"].append(ratios)
            config["keep"].append(keep)
        return self.check(config)

    def encode(self, config: SubnetConfig) -> tuple[Any, ...]:
        """Gene values of ``config``; a ValueError naming the key and its allowed values when it is outside."""
        config = self.check(config)
        values: list[Any] = list(config["embed_dims"])
        for s, depth in enumerate(self.depths):
            for j in range(depth):
                values.append(config["mlp_ratios"][s][j])
                if j in self.removable[s]:
                    values.append(config["keep"][s][j])
        return tuple(values)

    def reductions(self, config: SubnetConfig) -> list[Reduction]:
        """Every one-step reduction of ``config``: narrow a stage by ``WIDTH_STEP``, drop a removable block, lower a
        kept block's expansion ratio to the next choice."""
        config = self.check(config)
        changed = partial(changed_config, config)

        found = []
        for s, width in enumerate(config["embed_dims"]):
            if width > self.embed_dims[s][-1]:
                found.append(Reduction(f"narrow stage {s} to {width - WIDTH_STEP}",
                                       changed("embed_dims", s, None, width - WIDTH_STEP)))
            for j, keep in enumerate(config["keep"][s]):
                if not keep:
                    continue
                if j in self.removable[s]:
                    found.append(Reduction(f"drop block {s}.{j}", changed("keep", s, j, False)))
                smaller = [r for r in self.mlp_ratios if r < config["mlp_ratios"][s][j]]
                if smaller:
                    found.append(Reduction(f"ratio of block {s}.{j} to {smaller[0]:g}",
                                           changed("mlp_ratios", s, j, smaller[0])))
        return found


def count_macs_params(arch: dict[str, Any]) -> tuple[int, int]:
    """MACs of ``EfficientFormerV2(**arch)``'s forward pass on one image of its ``img_size`` (convolutions and matrix
    products, as ``torch.utils.flop_counter`` counts them) and its parameters, without building it. The attention's
    fixed sizes: 8 heads, key dimension 32 in the blocks and 16 in the downsampling, value ratio 4."""
    macs = params = 0

    def conv_norm(cin: int, cout: int, grid: Sequence[int], k: int = 1, groups: int = 1) -> None:
        nonlocal macs, params
        weights = cout * (cin // groups) * k * k
        macs += math.prod(grid) * weights
        params += weights + 3 * cout  # weight, bias, BN weight and bias

    dims, depths, n_attn = arch["embed_dims"], arch["depths"], arch.get("attention_blocks", 2)
    size = to_tuple(arch.get("img_size", 224), 2, "img_size")
    at = lambda stride: [math.ceil(v / stride) for v in size]  # noqa: E731  (the grid at a stride)
    ratios = arch["mlp_ratios"]
    conv_norm(arch.get("in_chans", 3), dims[0] // 2, at(2), 3)
    conv_norm(dims[0] // 2, dims[0], at(4), 3)
    for s, c in enumerate(dims):
        grid = at(2 ** (s + 2))
        n = math.prod(grid)
        if s > 0:
            conv_norm(dims[s - 1], c, grid, 3)
            if s >= 3:  # the local-global attention downsampling: queries on this grid, keys on the previous one
                cin, prev = dims[s - 1], at(2 ** (s + 1))
                macs += n * cin * 9  # the queries' strided depthwise conv (with bias, no norm)
                params += cin * 9 + cin
                conv_norm(cin, 128, grid)
                conv_norm(cin, 128, prev)
                conv_norm(cin, 512, prev)
                macs += n * math.prod(prev) * (128 + 512)  # q k^T and attn v over 8 heads
                conv_norm(512, 512, grid, 3, 512)
                conv_norm(512, c, grid)
                params += 8 * math.prod(prev)
        per_block = ratios[s] if isinstance(ratios[s], (list, tuple)) else [ratios[s]] * depths[s]
        for j, e in enumerate(per_block):
            if s >= 2 and j >= depths[s] - n_attn:
                stride = 2 if s == 2 else 1
                table = [math.ceil(g / stride) for g in grid]
                m = math.prod(table)
                if stride > 1:
                    conv_norm(c, c, table, 3, c)
                conv_norm(c, 256, table)
                conv_norm(c, 256, table)
                conv_norm(c, 1024, table)
                macs += m * m * (256 + 2 * 64 + 1024)  # q k^T, the two head mixings (8 x 8), attn v
                params += 2 * (8 * 8 + 8) + 8 * m
                conv_norm(1024, 1024, table, 3, 1024)
                conv_norm(1024, c, grid)  # after upsampling back to the block's grid
                params += c  # the layer scale
            h = int(c * e)
            conv_norm(c, h, grid)
            conv_norm(h, h, grid, 3, h)
            conv_norm(h, c, grid)
            params += c
    return macs, params + 2 * dims[-1]


def count_params(arch: dict[str, Any]) -> int:
    """Parameters of ``EfficientFormerV2(**arch)``, without building it."""
    return count_macs_params(arch)[1]
