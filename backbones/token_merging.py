"""Token merging (ToMe; Bolya et al., ICLR 2023) on our ``VisionTransformer``: images, volumes (UNETR) and TimeSformer.

In every block, between the attention and the MLP, the ``r`` most similar pairs of tokens are merged into one by
bipartite soft matching: the patch tokens are split alternately into two sets A and B, each token of A is paired with
its most similar token of B (cosine similarity of the attention keys, averaged over heads), and the ``r`` pairs with
the highest similarity are merged by a size-weighted average. A token's size (how many input patches it stands for)
is tracked from block to block, and proportional attention adds ``log(size)`` to the attention logits, so a merged
token weighs in attention as the tokens it replaced did (through the float ``attn_mask`` of
``F.scaled_dot_product_attention``). The prefix (class, distillation) tokens are never merged. No module is added:
a trained network merges as it is, and a network can also train with merging (the paper's second setting).

- A merge *unit* is a token for images, volumes and joint space-time attention (a clip merges over all its T×N
  tokens), and a whole spatial position, all its frames together, for divided attention: the similarity is that of
  the position's keys averaged over frames, and the same merge is applied in every frame, so temporal attention
  still sees one token per frame at every position and the clip stays a T×U grid.
- Dense outputs (``forward``: the maps UNETR's decoder and segmentation heads read) are unmerged back to the full grid,
  each merged token copied to the positions it stands for; ``merge_groups`` holds, per input unit, its token.
- ``r = 0`` runs the dense blocks themselves (the same code path, so the dense model's outputs bit for bit).

Registered as the token reduction ``tome`` (``backbones.token_reduction.reduce_tokens``); tasks build it from
``token_merging: r`` or ``{r: .., schedule: constant|decreasing}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch import nn

from .base import Backbone
from .layers import Attention, Block, run_checkpointed
from .mix_transformer import MixTransformer
from .token_reduction import TokenReducer, register_token_reduction
from .video_blocks import DividedSpaceTimeBlock
from .vit import VisionTransformer

MergeSchedule = Literal["constant", "decreasing"]


def merge_schedule(r: int | Sequence[int], depth: int, schedule: MergeSchedule = "constant") -> list[int]:
    """Units merged in each of ``depth`` blocks: ``r`` in every block (``constant``), or from ``1.5 r`` in the first
    block down to ``0.5 r`` in the last (``decreasing``, the paper's decreasing schedule: the same total); a list
    gives each block's own count (the blocks after its end merge none)."""
    counts = [r] if isinstance(r, int) else list(r)
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in counts) or len(counts) > depth:
        raise ValueError(
            f"token_merging r must be a whole number of tokens >= 0, or one per block ({depth} at most), got {r!r}"
        )
    if not isinstance(r, int):
        if schedule != "constant":
            raise ValueError(f"token_merging r given per block ({r}) takes no schedule, got schedule {schedule!r}")
        return counts + [0] * (depth - len(counts))
    if schedule == "constant" or depth == 1:
        return [r] * depth
    if schedule != "decreasing":
        raise ValueError(f"token merging schedule must be 'constant' or 'decreasing', got {schedule!r}")
    first = int(1.5 * r)
    last = 2 * r - first
    return [int(first + (last - first) * i / (depth - 1)) for i in range(depth)]


def bipartite_matching(keys: torch.Tensor, r: int) -> tuple[torch.Tensor, int]:
    """Bipartite soft matching of the units ``keys`` ``[B, U, D]``: where each unit goes when ``r`` pairs merge.

    Units ``0, 2, 4, ..`` form set A and ``1, 3, 5, ..`` set B. Each unit of A is paired with the unit of B of
    highest cosine similarity; the ``r`` A-units of the best pairs merge into their partners (at most ``U // 2``).
    The new order is A's remaining units in their order, then B's units. Returns ``step`` ``[B, U]``, the new index
    of each unit, and the new unit count ``U - r``."""
    units = keys.shape[1]
    r = min(r, units // 2)
    if r <= 0:
        return torch.arange(units, device=keys.device).expand_as(keys[..., 0]), units
    with torch.no_grad():
        metric = F.normalize(keys.detach().float(), dim=-1)
        a, b = metric[:, 0::2], metric[:, 1::2]
        best, partner = (a @ b.transpose(1, 2)).max(dim=-1)  # [B, Ua]: each A-unit's most similar B-unit
        merged = best.topk(r, dim=-1).indices  # [B, r]: the A-units of the r best pairs
        moved = torch.zeros_like(best).scatter(1, merged, torch.ones_like(best[:, :r]))  # 1 on those
        stay, nb = a.shape[1] - r, b.shape[1]
        rank = (torch.cumsum(1.0 - moved, dim=1) - 1.0).long()  # the remaining A-units keep their order
        new_a = torch.where(moved > 0, partner + stay, rank)  # merged ones go to their partners, after them
        new_b = torch.arange(stay, stay + nb, device=keys.device).expand_as(partner[:, :nb])
        step = torch.stack([new_a[:, :nb], new_b], dim=-1).flatten(1)  # A and B interleaved again: [B, 2 nb]
        if a.shape[1] > nb:  # an odd count: the last unit is in A
            step = torch.cat([step, new_a[:, nb:]], dim=1)
    return step, units - r


def merge_units(x: torch.Tensor, sizes: torch.Tensor, step: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of the units ``x`` ``[B, (T,) U, C]`` (sizes ``[B, U]``) that ``step`` ``[B, U]`` sends to
    the same new unit; returns the ``count`` new units and their sizes (the sums)."""
    shape = (x.shape[0],) + (1,) * (x.ndim - 3) + (x.shape[-2], 1)  # [B, (1,) U, 1]
    index = step.view(shape).expand_as(x)
    weights = sizes.to(x.dtype).view(shape)
    total = x.new_zeros(*x.shape[:-2], count, x.shape[-1]).scatter_reduce(-2, index, x * weights, "sum")
    new_sizes = sizes.new_zeros(sizes.shape[0], count).scatter_reduce(1, step, sizes, "sum")
    return total / new_sizes.to(x.dtype).view(*shape[:-2], count, 1), new_sizes


def unmerge_units(x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Merged units ``[B, (T,) U, C]`` back on the full grid ``[B, (T,) U0, C]``: each input unit takes its token
    (``groups`` ``[B, U0]``, the current index of each input unit)."""
    index = groups[(slice(None),) + (None,) * (x.ndim - 3) + (slice(None), None)]  # [B, (1,) U0, 1]
    return x.gather(-2, index.expand(-1, *x.shape[1:-2], -1, x.shape[-1]))


def attend(attn: Attention, x: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``attn(x)`` with the additive logit ``bias`` ``[B, 1, 1, N]`` (proportional attention), and the keys averaged
    over heads ``[B, N, D]`` that the matching compares."""
    q, k, v = rearrange(attn.qkv(x), "b n (three h d) -> three b h n d", three=3, h=attn.num_heads)
    mask = None if bias is None else bias.to(q.dtype)
    dropout_p = attn.attn_drop if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return attn.proj_drop(attn.proj(rearrange(out, "b h n d -> b n (h d)"))), k.mean(1)


class TokenMerging(TokenReducer, VisionTransformer):
    """A ``VisionTransformer`` that merges tokens in its blocks (ToMe); made by ``from_vit``.

    After each forward pass: ``merge_sizes`` ``[B, prefix + tokens]``, how many input patches each returned token
    stands for (``None`` where nothing merged), which a pooling head weighs ``avg`` pooling by; ``merge_groups``
    ``[B, U0]``, the final token of each input unit (``None`` where nothing merged).
    """

    token_reduction = "token_merging"
    merge_r: int | tuple[int, ...]
    schedule: MergeSchedule

    @classmethod
    def from_vit(cls, vit: Backbone, *, r: int | Sequence[int], schedule: MergeSchedule = "constant") -> TokenMerging:
        """Make ``vit`` merge tokens, in place: the same object, weights and parameter names, so checkpoints of the
        dense model (ours, timm's, MONAI's UNETR) load as they are, and nothing new to train.

        Args:
            vit: a ViT, DeiT, TimeSformer (joint or divided attention) or UNETR encoder.
            r: units merged per block (``schedule: decreasing``: the mean over blocks), or a list, one per block;
                0 merges none.
            schedule: ``constant`` (``r`` in every block) or ``decreasing`` (``1.5 r`` down to ``0.5 r``).
        """
        if isinstance(vit, MixTransformer):
            raise ValueError(
                "token_merging needs a ViT backbone (vit_*, deit, timesformer_*, unetr_vit_*); on MiT (mit_*, SegFormer) "
                "it does not pay, as measured by benchmarks/bench_mit_merging.py: the spatial-reduction attention and "
                "Mix-FFN need the full grid in every block, so tokens can only merge inside a block and unmerge after "
                "it. Merging stage 1-2's tokens around the attention's queries keeps mIoU, but the FLOPs fall 1.05x "
                "at most at 128x128 (1.25x at 512x512) and it ran no faster than dense; merging around Mix-FFN's "
                "linears too loses 11-17 points of mIoU at half of the tokens"
            )
        if type(vit) is not VisionTransformer:
            raise ValueError(
                f"token_merging needs a ViT backbone (vit_*, deit, timesformer_*, unetr_vit_*); {type(vit).__name__} "
                "has no token sequence to merge"
            )
        if vit.attention == "space_only":
            raise ValueError("token_merging needs joint or divided attention; space_only encodes frames apart")
        merge_schedule(r, len(vit.blocks), schedule)  # checks r and the schedule
        vit.__class__ = cls  # same parameters and methods; only forward_tokens/forward change
        model: TokenMerging = vit  # type: ignore[assignment]
        model.merge_r, model.schedule = r if isinstance(r, int) else tuple(r), schedule
        model.merge_sizes, model.merge_groups = None, None
        return model

    # --- what a task reads (the token-reduction hooks of ``Backbone``) ---------------------------------------

    def token_keep_weights(self) -> torch.Tensor | None:
        """The returned tokens' sizes: ``avg`` pooling over merged tokens weighted by size is the average over the
        input patches, as the dense model pools."""
        return self.merge_sizes

    def token_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One map ``[B, *unit_grid]`` of merge groups (integers): patches with the same value ended in one token."""
        grid = self.unit_grid(self.patch_embed.grid(x.shape[2:]))
        groups = self.merge_groups
        if groups is None:
            groups = torch.arange(self._units(grid), device=x.device).expand(x.shape[0], -1)
        return [groups.reshape(groups.shape[0], *grid)]

    def sharding_units(self) -> list[nn.Module]:
        """None: the merging blocks call their attention and MLP themselves, not through the blocks' ``forward`` that
        FSDP's per-unit gathering hooks, so FSDP shards the model as one unit, gathered around each step."""
        return []

    # --- merging --------------------------------------------------------------------------------------------

    def merge_counts(self) -> list[int]:
        """Units merged in each block (before the ``U // 2`` cap of each block's matching)."""
        return merge_schedule(self.merge_r, len(self.blocks), self.schedule)

    def unit_grid(self, grid: Sequence[int]) -> tuple[int, ...]:
        """The grid of merge units: the patch grid, or per-frame positions under divided attention."""
        return tuple(grid[1:]) if self.attention == "divided" else tuple(grid)

    def _units(self, grid: Sequence[int]) -> int:
        n = 1
        for side in self.unit_grid(grid):
            n *= side
        return n

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        x, grid = self.embed(x)
        state = _MergeState(self.num_prefix_tokens, grid[0] if self.attention == "divided" else 1)
        for i in range(len(self.blocks)):
            x = self._run_merging_block(i, x, grid, state)
        self._keep_state(state, x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The blocks' outputs in ``out_indices`` on the full grid: merged tokens copied back to their patches."""
        if torch.onnx.is_in_onnx_export() and any(self.merge_counts()):
            raise ValueError(
                "ONNX export of token merging's unmerged feature maps (segmentation, UNETR) is not supported: the "
                "exporter loses the decoder's shapes. Export it as torchscript, or without token_merging"
            )
        x, grid = self.embed(x)
        state = _MergeState(self.num_prefix_tokens, grid[0] if self.attention == "divided" else 1)
        outs = []
        for i in range(self.out_indices[-1] + 1):
            x = self._run_merging_block(i, x, grid, state)
            if i in self.out_indices:
                y = self.norm(x) if i == len(self.blocks) - 1 else x
                outs.append(self.tokens_to_map(state.unmerge(y), grid))
        self._keep_state(state, x)
        return outs

    def _keep_state(self, state: _MergeState, x: torch.Tensor) -> None:
        self.merge_groups = state.groups
        self.merge_sizes = None if state.sizes is None else state.token_sizes(x)

    def _run_merging_block(self, index: int, x: torch.Tensor, grid: Sequence[int], state: _MergeState) -> torch.Tensor:
        """Block ``index``: the dense block until the first merge, then with merging and proportional attention."""
        r = self.merge_counts()[index]
        if state.sizes is None and r == 0:
            return self.run_block(index, x, grid)
        if state.sizes is None:
            state.start(x.shape[0], (x.shape[1] - state.prefix) // state.frames, x.device)
        block = self.blocks[index]
        run = self._divided_block if isinstance(block, DividedSpaceTimeBlock) else self._joint_block
        x, sizes, step = run_checkpointed(partial(run, block, r, state.frames), x, state.sizes,
                                          enabled=self.activation_checkpointing)
        state.update(sizes, step)
        return x

    def _joint_block(
        self, block: Block, r: int, frames: int, x: torch.Tensor, sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``Block.forward`` with proportional attention and a merge between the attention and the MLP."""
        p = self.num_prefix_tokens
        y, keys = attend(block.attn, block.norm1(x), _log_sizes(sizes, p))
        x = x + block.drop_path1(block.ls1(y))
        step = None
        if r:
            step, count = bipartite_matching(keys[:, p:], r)
            patches, sizes = merge_units(x[:, p:], sizes, step, count)
            x = torch.cat([x[:, :p], patches], dim=1)
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x)))), sizes, step

    def _divided_block(
        self, block: DividedSpaceTimeBlock, r: int, frames: int, x: torch.Tensor, sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``DividedSpaceTimeBlock.forward`` with proportional spatial attention and a merge of whole positions
        between the spatial attention and the MLP. Temporal attention needs no ``log(size)``: the frames of one
        position share its size, and a constant added to every logit of a row leaves its softmax unchanged."""
        p, t = self.num_prefix_tokens, frames
        prefix, patches = x[:, :p], x[:, p:]
        xt = rearrange(block.temporal_norm1(patches), "b (t n) c -> (b n) t c", t=t)
        res = block.temporal_fc(block.temporal_attn(xt))
        patches = patches + block.drop_path1(rearrange(res, "(b n) t c -> b (t n) c", b=x.shape[0]))
        xs = rearrange(patches, "b (t n) c -> (b t) n c", t=t)
        if p:
            xs = torch.cat([repeat(prefix, "b p c -> (b t) p c", t=t), xs], dim=1)
        bias = repeat(_log_sizes(sizes, p), "b one1 one2 n -> (b t) one1 one2 n", t=t)
        res, keys = attend(block.attn, block.norm1(xs), bias)  # [(B T), p + U, C]
        res = block.drop_path1(block.ls1(res))
        patches = patches + rearrange(res[:, p:], "(b t) n c -> b (t n) c", t=t)
        if p:
            prefix = prefix + reduce(res[:, :p], "(b t) p c -> b p c", "mean", t=t)
        step = None
        if r:
            step, count = bipartite_matching(reduce(keys[:, p:], "(b t) n d -> b n d", "mean", t=t), r)
            grid_patches, sizes = merge_units(rearrange(patches, "b (t n) c -> b t n c", t=t), sizes, step, count)
            patches = rearrange(grid_patches, "b t n c -> b (t n) c")
        x = torch.cat([prefix, patches], dim=1) if p else patches
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x)))), sizes, step


def _log_sizes(sizes: torch.Tensor, prefix: int) -> torch.Tensor:
    """Proportional attention's logit bias ``[B, 1, 1, prefix + U]``: log of each key's size (prefix tokens: 1)."""
    return F.pad(sizes.log(), (prefix, 0))[:, None, None]


class _MergeState:
    """What one forward pass tracks from block to block: each unit's size ``[B, U]`` and the current unit of each input
    unit ``[B, U0]`` (both ``None`` until the first merge); ``frames`` tokens per unit (divided attention: T)."""

    def __init__(self, prefix: int, frames: int) -> None:
        self.prefix, self.frames = prefix, frames
        self.sizes: torch.Tensor | None = None
        self.groups: torch.Tensor | None = None

    def start(self, batch: int, units: int, device: torch.device) -> None:
        self.sizes = torch.ones(batch, units, device=device)
        self.groups = torch.arange(units, device=device).expand_as(self.sizes)

    def update(self, sizes: torch.Tensor, step: torch.Tensor | None) -> None:
        self.sizes = sizes
        if step is not None:
            self.groups = step.gather(1, self.groups)

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, p + T*U, C]`` on the full grid ``[B, p + T*U0, C]``."""
        if self.groups is None:
            return x
        p, t = self.prefix, self.frames
        patches = unmerge_units(rearrange(x[:, p:], "b (t n) c -> b t n c", t=t), self.groups)
        return torch.cat([x[:, :p], rearrange(patches, "b t n c -> b (t n) c")], dim=1)

    def token_sizes(self, x: torch.Tensor) -> torch.Tensor:
        """The size of every token of ``x`` ``[B, p + T*U, C]``: ``[B, p + T*U]`` (prefix tokens: 1)."""
        sizes = repeat(self.sizes, "b n -> b (t n)", t=self.frames)
        return F.pad(sizes, (self.prefix, 0), value=1.0)


def merge_options(value: int | list[int] | dict[str, Any]) -> dict[str, Any]:
    """``reduce_tokens`` options of the task option ``token_merging``: ``r``, ``[r per block]`` or
    ``{r: .., schedule: ..}``."""
    if isinstance(value, (list, tuple)):
        return {"method": "tome", "r": list(value)}
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"r", "schedule"})
        if unknown or "r" not in value:
            raise ValueError(f"token_merging takes r or {{r: .., schedule: constant|decreasing}}, got {value}")
        return {"method": "tome", **value}
    return {"method": "tome", "r": value}


register_token_reduction("tome", TokenMerging.from_vit)

__all__ = ["TokenMerging", "bipartite_matching", "merge_options", "merge_schedule", "merge_units", "unmerge_units"]
