"""The ViT-ResNAS super-network (Liao et al., 2021): the weights of the largest network of a search space, any of
whose sub-networks runs through channel masks, and any of which can be cut out as an ordinary ``ViTResNAS``.

A sub-network keeps, per stage, the first ``k`` channels of the token width, and per block the first heads of the
attention and the first hidden units of the MLP; some blocks may be skipped. In training, every group of
``examples_per_subnet`` examples of a batch runs its own sub-network (multi-architectural sampling): per-example
masks zero the channels a group does not use, LayerNorm normalises over the active channels only, and a skipped
block's residual branches are zeroed. Allowed choices widen from the largest only to all over
``num_warmup_epochs`` (the epoch comes through ``set_epoch`` before every draw).

It implements the ``Supernet`` contract of ``backbones.base`` (what a network search needs); the search space,
its sub-network configs (plain dicts), reductions and MACs count are in ``vit_resnas_space``.
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

from .base import Gene, LatencyPart, Supernet
from .layers import resample_pos_embed, to_tuple
from .registry import build_preset, register
from .vit_resnas import ConvPatchEmbed, ResidualSpatialReduction, ResNASBlock, ViTResNAS
from .vit_resnas_space import (  # SearchSpace, count_macs_params...: importable from here as before
    SearchSpace, SubnetConfig, allowed_choices, count_macs_params, gene_key, normalised,
)


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


class ViTResNASSupernet(ViTResNAS, Supernet):
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

    subnet_preset = "vit_resnas"

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
        self.active = [normalised(c) for c in configs]

    # --- the search space (the Supernet contract) --------------------------------------------------------------

    def search_space(self) -> list[Gene]:
        return [(gene_key(place), choices) for place, choices in self.space.genes()]

    def latency_parts(self, config: SubnetConfig, batch_size: int) -> list[LatencyPart]:
        """The stem at its width, every spatial reduction at its two widths, every kept block at its stage, width,
        heads and MLP width."""
        self.space.encode(config)
        fixed, b = self.fixed_kwargs, batch_size
        grid = [s // fixed["patch_size"] for s in fixed["img_size"]]
        dims = config["embed_dims"]
        parts = [LatencyPart(f"stem:{dims[0]}", lambda: (
            ConvPatchEmbed(patch_size=fixed["patch_size"], in_chans=fixed["in_chans"], embed_dim=dims[0],
                           mid_chans=fixed["stem_channels"]), (torch.randn(b, fixed["in_chans"], *fixed["img_size"]),)))]
        for s, c in enumerate(dims):
            if s > 0:
                cin, g = dims[s - 1], list(grid)
                parts.append(LatencyPart(f"reduce{s}:{cin}:{c}", lambda cin=cin, c=c, g=g: (
                    ResidualSpatialReduction(cin, c, g), (torch.randn(b, 1 + math.prod(g), cin), tuple(g)))))
                grid = [x // 2 for x in grid]
            n = 1 + math.prod(grid)
            for j in range(self.space.depths[s]):
                if config["keep"][s][j]:
                    h, m = config["num_heads"][s][j], config["mlp_hidden_dims"][s][j]
                    parts.append(LatencyPart(f"block{s}:{c}:{h}:{m}", lambda c=c, h=h, m=m, s=s, n=n: (
                        ResNASBlock(c, h, fixed["head_dims"][s], m), (torch.randn(b, n, c),))))
        return parts

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


def _slice_like(tensor: torch.Tensor, shape: torch.Size, *, qkv: bool) -> torch.Tensor:
    """The leading part of ``tensor`` of ``shape``; a qkv projection keeps the leading part of each of q, k, v."""
    if qkv:
        chunks = tensor.reshape(3, tensor.shape[0] // 3, *tensor.shape[1:])
        return _slice_like(chunks, torch.Size((3, shape[0] // 3, *shape[1:])), qkv=False).reshape(shape)
    return tensor[tuple(slice(0, n) for n in shape)]


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
