"""The ViT-ResNAS search space (Liao et al., 2021): per stage the token widths, per block the heads and MLP hidden
widths, and which blocks may be skipped; the progressive warm-up of the choices; the one-step reductions pruning takes;
and the analytical MACs/parameter count of a ``ViTResNAS`` (``backbones/vit_resnas_supernet.py`` is the super-network).

A sub-network is a plain dict (YAML- and JSON-friendly)::

    {"embed_dims": [w0, w1, w2], "num_heads": [[h, ...], ...], "mlp_hidden_dims": [[m, ...], ...],
     "keep": [[True, False, ...], ...]}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from .base import Reduction, changed_config
from .layers import to_tuple

SubnetConfig = dict[str, Any]
Gene = tuple[tuple[str, int, int | None], tuple[Any, ...]]
"""A searchable choice: its place ``(field, stage, block)`` in a ``SubnetConfig`` and its values, largest first."""


def gene_key(place: tuple[str, int, int | None]) -> str:
    field, stage, block = place
    return f"{field}[{stage}]" if block is None else f"{field}[{stage}][{block}]"


@dataclass(frozen=True)
class SearchSpace:
    """Per stage: token widths, heads per block, MLP hidden widths per block, the number of blocks and which of
    them may be skipped (0-based). Choices are kept largest first (the order of the progressive warm-up)."""

    embed_dims: tuple[tuple[int, ...], ...]
    num_heads: tuple[tuple[int, ...], ...]
    mlp_hidden_dims: tuple[tuple[int, ...], ...]
    depths: tuple[int, ...]
    skippable: tuple[tuple[int, ...], ...]

    @classmethod
    def build(
        cls, embed_dims: Sequence[Sequence[int]], num_heads: Sequence[Sequence[int]],
        mlp_hidden_dims: Sequence[Sequence[int]], depths: Sequence[int], skippable: Sequence[Sequence[int]],
    ) -> SearchSpace:
        lists = {"embed_dim_choices": embed_dims, "head_choices": num_heads, "mlp_hidden_choices": mlp_hidden_dims,
                 "depths": depths, "skippable": skippable}
        n = len(depths)
        if n == 0 or any(len(v) != n for v in lists.values()):
            raise ValueError(f"the search space needs one entry per stage in each of {sorted(lists)}, got "
                             + ", ".join(f"{k}: {len(v)}" for k, v in lists.items()))
        desc = [tuple(sorted({int(c) for c in ch}, reverse=True)) for ch in (*embed_dims, *num_heads, *mlp_hidden_dims)]
        if any(not ch or ch[-1] < 1 for ch in desc):
            raise ValueError("every choice list of the search space needs positive values")
        for i in range(1, n):
            if min(embed_dims[i]) < max(embed_dims[i - 1]):
                raise ValueError(f"stage {i}'s narrowest width {min(embed_dims[i])} is below stage {i - 1}'s widest "
                                 f"{max(embed_dims[i - 1])}: a spatial reduction cannot narrow the tokens")
        for i, (d, skip) in enumerate(zip(depths, skippable)):
            if d < 1 or any(not 0 <= j < d for j in skip) or len(set(skip)) >= d:
                raise ValueError(f"stage {i}: skippable blocks {tuple(skip)} must be distinct indices of its {d} "
                                 "blocks, leaving at least one")
        return cls(tuple(desc[:n]), tuple(desc[n:2 * n]), tuple(desc[2 * n:]), tuple(int(d) for d in depths),
                   tuple(tuple(sorted(int(j) for j in s)) for s in skippable))

    def genes(self) -> list[Gene]:
        """Every choice in a fixed order: stage widths, then per block heads, MLP width and (if skippable) keep."""
        genes: list[Gene] = [(("embed_dims", s, None), ch) for s, ch in enumerate(self.embed_dims)]
        for s, depth in enumerate(self.depths):
            for j in range(depth):
                genes += [(("num_heads", s, j), self.num_heads[s]), (("mlp_hidden_dims", s, j), self.mlp_hidden_dims[s])]
                if j in self.skippable[s]:
                    genes.append((("keep", s, j), (True, False)))
        return genes

    def decode(self, values: Sequence[Any]) -> SubnetConfig:
        """The sub-network of gene ``values`` (in the order of ``genes()``)."""
        config: SubnetConfig = {
            "embed_dims": [0] * len(self.depths),
            "num_heads": [[0] * d for d in self.depths],
            "mlp_hidden_dims": [[0] * d for d in self.depths],
            "keep": [[True] * d for d in self.depths],
        }
        for ((field, s, j), _), value in zip(self.genes(), values, strict=True):
            if j is None:
                config[field][s] = value
            else:
                config[field][s][j] = value
        return config

    def encode(self, config: SubnetConfig) -> tuple[Any, ...]:
        """Gene values of ``config``; a ValueError naming the key and its allowed values when it is outside."""
        if not isinstance(config, dict) or set(config) != {"embed_dims", "num_heads", "mlp_hidden_dims", "keep"}:
            got = sorted(config) if isinstance(config, dict) else type(config).__name__
            raise ValueError(f"a sub-network config has keys embed_dims, num_heads, mlp_hidden_dims, keep; got {got}")
        n = len(self.depths)
        for field in ("embed_dims", "num_heads", "mlp_hidden_dims", "keep"):
            if len(config[field]) != n or (field != "embed_dims" and
                                           any(len(b) != d for b, d in zip(config[field], self.depths))):
                raise ValueError(f"{field} must have {n} stages of {list(self.depths)} blocks, got {config[field]}")
        for s, depth in enumerate(self.depths):
            for j in range(depth):
                if j not in self.skippable[s] and not config["keep"][s][j]:
                    raise ValueError(f"keep[{s}][{j}] = False is outside the search space: allowed values (True,)")
        values = []
        for place, choices in self.genes():
            field, s, j = place
            value = config[field][s] if j is None else config[field][s][j]
            if field == "keep":
                value = bool(value)
            if value not in choices:
                raise ValueError(f"{gene_key(place)} = {value!r} is outside the search space: allowed values {choices}")
            values.append(value)
        return tuple(values)

    def extreme(self, largest: bool) -> SubnetConfig:
        """The largest (every block, widest choices) or smallest (skippable blocks skipped, narrowest) network."""
        return self.decode([ch[0] if largest else ch[-1] for _, ch in self.genes()])

    def reductions(self, config: SubnetConfig) -> list[Reduction]:
        """Every one-step reduction of ``config``: a stage one width narrower; a kept block skipped (if skippable),
        with the next fewer heads, or with the next smaller MLP."""
        self.encode(config)
        config = normalised(config)
        changed = partial(changed_config, config)

        found = []
        for s, width in enumerate(config["embed_dims"]):
            if (narrower := [w for w in self.embed_dims[s] if w < width]):
                found.append(Reduction(f"narrow stage {s} to {narrower[0]}", changed("embed_dims", s, None, narrower[0])))
            for j, keep in enumerate(config["keep"][s]):
                if not keep:
                    continue
                if j in self.skippable[s]:
                    found.append(Reduction(f"skip block {s}.{j}", changed("keep", s, j, False)))
                if (fewer := [h for h in self.num_heads[s] if h < config["num_heads"][s][j]]):
                    found.append(Reduction(f"heads of block {s}.{j} to {fewer[0]}", changed("num_heads", s, j, fewer[0])))
                if (smaller := [m for m in self.mlp_hidden_dims[s] if m < config["mlp_hidden_dims"][s][j]]):
                    found.append(Reduction(f"MLP of block {s}.{j} to {smaller[0]}",
                                           changed("mlp_hidden_dims", s, j, smaller[0])))
        return found


def allowed_choices(choices: tuple[Any, ...], epoch: int | None, warmup_epochs: int) -> tuple[Any, ...]:
    """The progressive warm-up: the largest choice only at epoch 0, one more every ``warmup_epochs / (n - 1)``
    epochs, all of them from ``warmup_epochs`` on (and when no epoch is known)."""
    n = len(choices)
    if epoch is None or warmup_epochs <= 0:
        return choices
    return choices[: max(1, min(n, 1 + math.floor(epoch * (n - 1) / warmup_epochs)))]


def normalised(config: SubnetConfig) -> SubnetConfig:
    """A copy of ``config`` with plain ints and bools."""
    return {"embed_dims": [int(v) for v in config["embed_dims"]],
            "num_heads": [[int(v) for v in r] for r in config["num_heads"]],
            "mlp_hidden_dims": [[int(v) for v in r] for r in config["mlp_hidden_dims"]],
            "keep": [[bool(v) for v in r] for r in config["keep"]]}


def count_macs_params(arch: dict[str, Any], img_size: int | Sequence[int] | None = None) -> tuple[int, int]:
    """MACs of ``ViTResNAS(**arch).forward_tokens`` on one image of ``img_size`` and its parameter count."""
    built = to_tuple(arch.get("img_size", 224), 2, "img_size")
    size = built if img_size is None else to_tuple(img_size, 2, "img_size")
    cin, mid, p = arch.get("in_chans", 3), arch.get("stem_channels", 24), arch.get("patch_size", 14)
    dims, heads, hidden = arch["embed_dims"], arch["num_heads"], arch["mlp_hidden_dims"]
    head_dims, bias = arch.get("head_dims", (32, 48, 64)), int(arch.get("qkv_bias", True))
    half = math.prod(s // 2 for s in size)
    grid, built_grid = [s // p for s in size], [s // p for s in built]
    macs = half * mid * 9 * (cin + 2 * mid) + math.prod(grid) * dims[0] * mid * (p // 2) ** 2
    params = mid * 9 * (cin + 2 * mid) + 6 * mid + dims[0] * (mid * (p // 2) ** 2 + 1)
    params += dims[0] * (2 + math.prod(built_grid))  # class token, position embeddings
    for s, c in enumerate(dims):
        if s > 0:
            cprev = dims[s - 1]
            grid, built_grid = [g // 2 for g in grid], [g // 2 for g in built_grid]
            macs += math.prod(grid) * c * cprev * 9 + cprev * c
            params += 2 * cprev + c * cprev * 9 + c + cprev * c + c + math.prod(built_grid) * c
        n = 1 + math.prod(grid)
        for h, m in zip(heads[s], hidden[s]):
            a = h * head_dims[s]
            macs += n * c * 3 * a + 2 * n * n * a + n * a * c + 2 * n * c * m
            params += 4 * c + 3 * a * (c + bias) + a * c + c + 2 * c * m + m + c
    return macs, params + 2 * dims[-1]
