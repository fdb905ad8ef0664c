"""The ViT-ResNAS super-network (Liao et al., 2021): the weights of the largest network of a search space, any of
whose sub-networks runs through channel masks, and any of which can be cut out as an ordinary ``ViTResNAS``.

A sub-network keeps, per stage, the first ``k`` channels of the token width, and per block the first heads of the
attention and the first hidden units of the MLP; some blocks may be skipped. In training, every group of
``examples_per_subnet`` examples of a batch runs its own sub-network (multi-architectural sampling): per-example
masks zero the channels a group does not use, LayerNorm normalises over the active channels only, and a skipped
block's residual branches are zeroed. Allowed choices widen from the largest only to all over
``num_warmup_epochs`` (the epoch comes through ``set_epoch`` before every draw).

A sub-network is a plain dict (YAML- and JSON-friendly)::

    {"embed_dims": [w0, w1, w2], "num_heads": [[h, ...], ...], "mlp_hidden_dims": [[m, ...], ...],
     "keep": [[True, False, ...], ...]}
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .layers import resample_pos_embed, to_tuple
from .registry import build_preset, register
from .vit_resnas import ResidualSpatialReduction, ResNASBlock, ViTResNAS

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


def allowed_choices(choices: tuple[Any, ...], epoch: int | None, warmup_epochs: int) -> tuple[Any, ...]:
    """The progressive warm-up: the largest choice only at epoch 0, one more every ``warmup_epochs / (n - 1)``
    epochs, all of them from ``warmup_epochs`` on (and when no epoch is known)."""
    n = len(choices)
    if epoch is None or warmup_epochs <= 0:
        return choices
    return choices[: max(1, min(n, 1 + math.floor(epoch * (n - 1) / warmup_epochs)))]


def masked_layer_norm(x: torch.Tensor, norm: nn.LayerNorm, mask: torch.Tensor) -> torch.Tensor:
    """LayerNorm of ``x [B, N, C]`` over the channels where ``mask [B or 1, 1, C]`` is 1, zero elsewhere: what a
    LayerNorm of the active channels alone gives (in fp32, as LayerNorm runs under autocast)."""
    y, m = x.float(), mask.float()
    count = m.sum(-1, keepdim=True)
    centred = (y - (y * m).sum(-1, keepdim=True) / count) * m
    var = centred.square().sum(-1, keepdim=True) / count
    out = (centred * torch.rsqrt(var + norm.eps) * norm.weight.float() + norm.bias.float()) * m
    return out.to(x.dtype)


@dataclass
class SubnetMasks:
    """Per-example (or, for one sub-network, broadcast) 0/1 masks ``[B or 1, 1, width]`` of every choice."""

    embed: list[torch.Tensor]
    attn: list[list[torch.Tensor]]
    mlp: list[list[torch.Tensor]]
    keep: list[list[torch.Tensor]]


class ViTResNASSupernet(ViTResNAS):
    """A ``ViTResNAS`` with the largest network of a search space, whose sub-networks run through masks.

    ``set_subnet(config)`` runs one sub-network for the whole batch, ``set_subnet(list)`` one per group of
    ``examples_per_subnet`` examples (group ``g`` runs ``configs[g % len(configs)]``), ``set_subnet(None)`` the
    largest network without masks. ``sample_subnet(generator)`` draws ``max_groups`` sub-networks, each choice
    uniformly among those the warm-up allows: a pure function of the generator, so every process and a resumed
    run draw the same ones. ``extract(config)`` is the sub-network as a standalone ``ViTResNAS``.

    Args:
        embed_dim_choices: per stage, the token widths.
        head_choices: per stage, the numbers of heads a block may have (of ``head_dims[stage]`` channels each).
        mlp_hidden_choices: per stage, the MLP hidden widths a block may have.
        depths: blocks per stage in the largest network.
        skippable: per stage, the (0-based) blocks that may be skipped.
        examples_per_subnet: examples of a batch that run the same sub-network in training.
        max_groups: sub-networks drawn per training step (groups beyond it reuse them in turn).
        num_warmup_epochs: epochs over which the allowed choices widen from the largest to all.
        depth: keep only the first ``depth`` blocks of every stage (quick runs); ``None`` keeps them all.
        **kwargs: the rest of ``ViTResNAS`` (``img_size``, ``patch_size``, ``stem_channels``, ``head_dims``,
            ``out_indices``, ``qkv_bias``, drop rates, ``norm_eps``).
    """

    def __init__(
        self,
        *,
        embed_dim_choices: Sequence[Sequence[int]],
        head_choices: Sequence[Sequence[int]],
        mlp_hidden_choices: Sequence[Sequence[int]],
        depths: Sequence[int],
        skippable: Sequence[Sequence[int]],
        examples_per_subnet: int = 64,
        max_groups: int = 16,
        num_warmup_epochs: int = 15,
        depth: int | None = None,
        img_size: int | Sequence[int] = 224,
        in_chans: int = 3,
        patch_size: int = 14,
        stem_channels: int = 24,
        head_dims: Sequence[int] = (32, 48, 64),
        out_indices: Sequence[int] | None = None,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        if depth is not None:
            if depth < 1:
                raise ValueError(f"depth must be at least 1, got {depth}")
            depths = [min(d, depth) for d in depths]
            skippable = [[j for j in s if j < d] for s, d in zip(skippable, depths)]
        space = SearchSpace.build(embed_dim_choices, head_choices, mlp_hidden_choices, depths, skippable)
        if examples_per_subnet < 1 or max_groups < 1:
            raise ValueError(f"examples_per_subnet and max_groups must be positive, got {examples_per_subnet}, {max_groups}")
        fixed = dict(img_size=to_tuple(img_size, 2, "img_size"), in_chans=in_chans, patch_size=patch_size,
                     stem_channels=stem_channels, head_dims=tuple(head_dims), qkv_bias=qkv_bias, norm_eps=norm_eps)
        largest = space.extreme(largest=True)
        super().__init__(
            **fixed, embed_dims=largest["embed_dims"], num_heads=largest["num_heads"],
            mlp_hidden_dims=largest["mlp_hidden_dims"], out_indices=out_indices, drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
        )
        self.space = space
        self.fixed_kwargs = {**fixed, "img_size": list(fixed["img_size"]), "head_dims": list(head_dims)}
        self.examples_per_subnet = examples_per_subnet
        self.max_groups = max_groups
        self.num_warmup_epochs = num_warmup_epochs
        self.epoch: int | None = None
        """The training epoch for the warm-up (``set_epoch``); ``None`` allows every choice."""
        self.active: list[SubnetConfig] | None = None

    # --- choosing sub-networks --------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def sample_subnet(self, generator: torch.Generator) -> list[SubnetConfig]:
        genes = [allowed_choices(ch, self.epoch, self.num_warmup_epochs) for _, ch in self.space.genes()]
        configs = []
        for _ in range(self.max_groups):
            picks = torch.randint(0, 1 << 30, (len(genes),), generator=generator).tolist()
            configs.append(self.space.decode([ch[p % len(ch)] for ch, p in zip(genes, picks)]))
        return configs

    def set_subnet(self, config: SubnetConfig | Sequence[SubnetConfig] | None) -> None:
        if config is None:
            self.active = None
            return
        configs = [config] if isinstance(config, dict) else list(config)
        if not configs:
            raise ValueError("set_subnet got an empty list of sub-networks")
        for c in configs:
            self.space.encode(c)
        self.active = [_normalised(c) for c in configs]

    # --- masked forward ---------------------------------------------------------------------------------

    def subnet_masks(self, batch: int, device: torch.device) -> SubnetMasks:
        """The active sub-networks' masks for a batch of ``batch`` examples."""
        configs = self.active
        assert configs is not None
        if len(configs) > 1:
            groups = math.ceil(batch / self.examples_per_subnet)
            configs = [configs[g % len(configs)] for g in range(groups)]

        def mask(values: list[int], width: int) -> torch.Tensor:
            m = (torch.arange(width) < torch.tensor(values)[:, None]).float()  # [groups, width]
            if len(configs) > 1:
                m = m.repeat_interleave(self.examples_per_subnet, 0)[:batch]
            return m[:, None, :].to(device)  # [B or 1, 1, width]

        head_dims = self.fixed_kwargs["head_dims"]
        embed = [mask([c["embed_dims"][s] for c in configs], w) for s, w in enumerate(self.embed_dims)]
        attn, mlp, keep = [], [], []
        for s, stage in enumerate(self.stages):
            attn.append([mask([c["num_heads"][s][j] * head_dims[s] for c in configs], b.attn.proj.in_features)
                         for j, b in enumerate(stage.blocks)])
            mlp.append([mask([c["mlp_hidden_dims"][s][j] for c in configs], b.mlp.fc1.out_features)
                        for j, b in enumerate(stage.blocks)])
            keep.append([mask([int(c["keep"][s][j]) for c in configs], 1) for j in range(len(stage.blocks))])
        return SubnetMasks(embed, attn, mlp, keep)

    def _block(self, blk: ResNASBlock, x: torch.Tensor, embed: torch.Tensor, attn: torch.Tensor,
               mlp: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        out = (embed * keep).to(x.dtype)  # a skipped block adds nothing
        h = masked_layer_norm(x, blk.norm1, embed)
        q, k, v = rearrange(blk.attn.qkv(h), "b n (three h d) -> three b h n d", three=3, h=blk.attn.num_heads)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=blk.attn.attn_drop if self.training else 0.0)
        a = rearrange(a, "b h n d -> b n (h d)") * attn.to(a.dtype)  # heads past the active ones dropped
        x = x + blk.drop_path1(blk.attn.proj_drop(blk.attn.proj(a))) * out
        h = blk.mlp.drop(blk.mlp.act(blk.mlp.fc1(masked_layer_norm(x, blk.norm2, embed))))
        return x + blk.drop_path2(blk.mlp.drop(blk.mlp.fc2(h * mlp.to(h.dtype)))) * out

    @staticmethod
    def _reduce(red: ResidualSpatialReduction, x: torch.Tensor, grid: tuple[int, ...], mask_in: torch.Tensor,
                mask_out: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """``ResidualSpatialReduction`` with its LayerNorm over the active input channels."""
        h, w = grid
        new_grid = (h // 2, w // 2)
        pooled = F.avg_pool2d(rearrange(x[:, 1:], "b (h w) c -> b c h w", h=h, w=w), 2)
        skip = F.pad(torch.cat([x[:, :1], rearrange(pooled, "b c h w -> b (h w) c")], dim=1), (0, red.pad))
        y = masked_layer_norm(x, red.norm, mask_in)
        patches = red.conv(rearrange(y[:, 1:], "b (h w) c -> b c h w", h=h, w=w))
        patches = rearrange(patches, "b c h w -> b (h w) c") + resample_pos_embed(red.pos_embed, red.grid, new_grid)
        x = torch.cat([red.token_proj(y[:, :1]), patches], dim=1) + skip
        return x * mask_out.to(x.dtype), new_grid

    def _masked_stages(self, x: torch.Tensor, masks: SubnetMasks) -> Iterator[tuple[torch.Tensor, tuple[int, ...]]]:
        x, grid = self.embed(x)
        x = x * masks.embed[0].to(x.dtype)
        for s, stage in enumerate(self.stages):
            if stage.reduce is not None:
                x, grid = self._reduce(stage.reduce, x, grid, masks.embed[s - 1], masks.embed[s])
            for j, blk in enumerate(stage.blocks):
                x = self._block(blk, x, masks.embed[s], masks.attn[s][j], masks.mlp[s][j], masks.keep[s][j])
            yield x, grid

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self.active is None:
            return super().forward_tokens(x)
        masks = self.subnet_masks(x.shape[0], x.device)
        *_, (x, _) = self._masked_stages(x, masks)
        return masked_layer_norm(x, self.norm, masks.embed[-1])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.active is None:
            return super().forward(x)
        masks = self.subnet_masks(x.shape[0], x.device)
        outs = []
        for i, (y, (h, w)) in enumerate(self._masked_stages(x, masks)):
            if i in self.out_indices:
                y = masked_layer_norm(y, self.norm, masks.embed[-1]) if i == len(self.stages) - 1 else y
                outs.append(rearrange(y[:, 1:], "b (h w) c -> b c h w", h=h, w=w))
            if i == self.out_indices[-1]:
                break
        return outs

    # --- standalone sub-networks ------------------------------------------------------------------------

    def arch_kwargs(self, config: SubnetConfig) -> dict[str, Any]:
        """The ``ViTResNAS`` (``vit_resnas`` preset) arguments of a sub-network: skipped blocks left out."""
        self.space.encode(config)
        keep = config["keep"]
        pick = lambda rows: [[v for v, k in zip(r, ks) if k] for r, ks in zip(rows, keep)]  # noqa: E731
        return {**self.fixed_kwargs, "embed_dims": [int(v) for v in config["embed_dims"]],
                "num_heads": pick(config["num_heads"]), "mlp_hidden_dims": pick(config["mlp_hidden_dims"])}

    def extract(self, config: SubnetConfig) -> ViTResNAS:
        """The sub-network as a ``ViTResNAS`` with weights sliced from (copies of) the super-network's."""
        arch = self.arch_kwargs(config)
        with torch.device("meta"):
            net = ViTResNAS(**arch, out_indices=self.out_indices, drop_rate=self.pos_drop.p)
        ours = self.state_dict()
        kept = [[j for j, k in enumerate(ks) if k] for ks in config["keep"]]
        state = {}
        for name, target in net.state_dict().items():
            parts = name.split(".")
            if parts[0] == "stages" and parts[2] == "blocks":
                parts[3] = str(kept[int(parts[1])][int(parts[3])])
            state[name] = _slice_like(ours[".".join(parts)], target.shape, qkv=parts[-2:-1] == ["qkv"]).clone()
        net.load_state_dict(state, assign=True)
        return net.train(self.training)

    def macs_params(self, config: SubnetConfig, img_size: int | Sequence[int] | None = None) -> tuple[int, int]:
        """MACs of ``forward_tokens`` at ``img_size`` (default the built size) and parameters of the sub-network,
        counted analytically (matmuls, convolutions and attention, as ``torch.utils.flop_counter`` counts)."""
        return count_macs_params(self.arch_kwargs(config), img_size)


def _normalised(config: SubnetConfig) -> SubnetConfig:
    return {"embed_dims": [int(v) for v in config["embed_dims"]],
            "num_heads": [[int(v) for v in r] for r in config["num_heads"]],
            "mlp_hidden_dims": [[int(v) for v in r] for r in config["mlp_hidden_dims"]],
            "keep": [[bool(v) for v in r] for r in config["keep"]]}


def _slice_like(tensor: torch.Tensor, shape: torch.Size, *, qkv: bool) -> torch.Tensor:
    """The leading part of ``tensor`` of ``shape``; a qkv projection keeps the leading part of each of q, k, v."""
    if qkv:
        chunks = tensor.reshape(3, tensor.shape[0] // 3, *tensor.shape[1:])
        return _slice_like(chunks, torch.Size((3, shape[0] // 3, *shape[1:])), qkv=False).reshape(shape)
    return tensor[tuple(slice(0, n) for n in shape)]


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


def _supernet(overrides: dict[str, Any], **space: Any) -> ViTResNASSupernet:
    return build_preset(ViTResNASSupernet, space, overrides)  # type: ignore[return-value]


@register
def vit_resnas_supernet_tiny(**kwargs: Any) -> ViTResNASSupernet:
    """The Tiny search space (release ``supernet_config/sr_tiny_mh.py``): 256/512/1024 wide at most, 6 blocks per
    stage of which the 2nd, 4th and 6th may be skipped."""
    return _supernet(
        kwargs, embed_dim_choices=((256, 224, 192, 176, 160), (512, 448, 384, 352, 320), (1024, 896, 768, 704, 640)),
        head_choices=((6, 5, 4, 3), (12, 10, 8, 6), (12, 10, 8, 6)),
        mlp_hidden_choices=(tuple(range(768, 383, -64)), tuple(range(1536, 767, -128)), tuple(range(3072, 1535, -256))),
        depths=(6, 6, 6), skippable=((1, 3, 5),) * 3,
    )


@register
def vit_resnas_supernet_small(**kwargs: Any) -> ViTResNASSupernet:
    """The Small search space (release ``supernet_config/sr_small_mh.py``): 320/640/1280 wide at most, 7 blocks per
    stage of which the 2nd, 4th and 6th may be skipped."""
    return _supernet(
        kwargs, embed_dim_choices=((320, 280, 240, 220, 200), (640, 560, 480, 440, 400), (1280, 1120, 960, 880, 800)),
        head_choices=((8, 7, 6, 5), (16, 14, 12, 10), (16, 14, 12, 10)),
        mlp_hidden_choices=(tuple(range(960, 479, -80)), tuple(range(1920, 959, -160)), tuple(range(3840, 1919, -320))),
        depths=(7, 7, 7), skippable=((1, 3, 5),) * 3,
    )
