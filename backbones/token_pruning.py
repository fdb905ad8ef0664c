"""DynamicViT token pruning (Rao et al., NeurIPS 2021) on our ``VisionTransformer``: images and TimeSformer.

Prediction modules before the blocks in ``prune_at`` score the patch tokens that are still kept; a stage keeps
the fraction ``keep_ratio`` of them, so ``rho, rho², rho³`` of the patch tokens remain after three stages. The
prefix (class, distillation) tokens always stay.

- Training (``masked``): hard Gumbel-softmax decisions, multiplied stage to stage, enter attention as the
  policy (``layers.softmax_with_policy``), so every sample keeps its shape and the decisions get gradients.
  The keep-ratio loss is left for the task as the auxiliary loss ``keep_ratio`` (weight 2.0, the release's).
- Inference (gathered): the top-k kept units by keep score (a fixed count per sample, so batches stay
  rectangular) are gathered and the rest are gone, so the later blocks really run on fewer tokens.

A pruning *unit* is a patch token for images and joint space-time attention (so a clip prunes over all its
``T×N`` tokens), and a whole spatial position, all its frames together, for divided attention: temporal
attention then still sees one token per frame at every kept position, and a gathered clip stays a ``T×K`` grid.

Registered as the token reduction ``dynamicvit`` (``backbones.token_reduction.reduce_tokens``), which tasks build
from ``token_pruning: true``: the predictors train at the task's ``lr``, the pretrained network at
``lr * pretrained_lr_mult``; the prefix tokens and the position and time embeddings stay fixed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch import nn

from .base import Backbone
from .token_reduction import TokenReducer, register_token_reduction
from .vit import VisionTransformer


class KeepPredictor(nn.Module):
    """DynamicViT's prediction module: LayerNorm → Linear → GELU; half the channels stay per token, the other half
    are averaged over the kept tokens (the global context); then an MLP to (keep, drop) log-probabilities.

    Args:
        dim: token width.
        keep_ratio: the keep probability every unit starts at (the stage's target; the release starts at 0.5).
    """

    def __init__(self, dim: int, keep_ratio: float = 0.5) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.score = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
            nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1),
        )
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        with torch.no_grad():  # log-probabilities (keep, drop) = (log rho, log(1 - rho)) before any training
            self.score[-2].bias.copy_(torch.tensor([math.log(keep_ratio), math.log(max(1.0 - keep_ratio, 1e-6))]))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, U, C]`` unit features, ``keep`` ``[B, U, 1]`` (1 kept) -> log-probabilities ``[B, U, 2]``."""
        x = self.embed(x)
        half = x.shape[-1] // 2
        local, context = x[..., :half], x[..., half:]
        # clamp: a training sample whose every token was dropped would divide 0 by 0
        context = (context * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1e-6)
        return self.score(torch.cat([local, context.expand(-1, x.shape[1], -1)], dim=-1))


def default_prune_at(depth: int) -> tuple[int, ...]:
    """Blocks before which to prune: DynamicViT's 3, 6, 9 of 12, scaled to ``depth`` (quarters of it)."""
    return tuple(sorted({max(1, round(depth * k / 4)) for k in (1, 2, 3)} - {depth}))


class DynamicViT(TokenReducer, VisionTransformer):
    """A ``VisionTransformer`` with DynamicViT's prediction modules (``predictors``); made by ``from_vit``.

    ``forward_tokens`` prunes (masked in training, gathered in eval mode); ``forward`` (dense maps for
    segmentation or UNETR) refuses, since pruned tokens are gone. After each forward pass:
    ``token_weights`` ``[B, prefix + tokens]`` holds the policy of the returned tokens (1 kept, 0 dropped; in
    training, where dropped tokens are still there) or ``None`` (inference: every returned token is kept), and
    ``kept_units`` the keep mask of every stage over the original units, ``[B, U]`` booleans.
    """

    token_reduction = "token_pruning"
    keep_ratio: float
    prune_at: tuple[int, ...]
    predictors: nn.ModuleList

    @classmethod
    def from_vit(
        cls, vit: Backbone, *, keep_ratio: float = 0.7, prune_at: Sequence[int] | None = None
    ) -> DynamicViT:
        """Make ``vit`` a DynamicViT in place: the same object, weights and parameter names (so dense checkpoints,
        ours and timm's, load into it as they are) plus one ``KeepPredictor`` per pruning stage.

        Args:
            vit: a plain ViT or TimeSformer (joint or divided attention).
            keep_ratio: fraction of the still-kept patch tokens each stage keeps, in (0, 1].
            prune_at: increasing block indices before which to prune; default 3, 6, 9 for 12 blocks, scaled.
        """
        if type(vit) is not VisionTransformer:
            raise ValueError(
                f"token_pruning needs a ViT backbone (vit_*, deit, timesformer_*); {type(vit).__name__} "
                "has no token sequence to prune"
            )
        if vit.attention == "space_only":
            raise ValueError("token_pruning needs joint or divided attention; space_only encodes frames apart")
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        depth = len(vit.blocks)
        stages = default_prune_at(depth) if prune_at is None else tuple(int(i) for i in prune_at)
        if not stages or any(not 0 <= i < depth for i in stages) or sorted(set(stages)) != list(stages):
            raise ValueError(f"prune_at must be increasing block indices in [0, {depth}) (depth {depth}), got {prune_at}")
        vit.__class__ = cls  # same parameters and methods; only forward_tokens/forward change
        model: DynamicViT = vit  # type: ignore[assignment]
        model.keep_ratio, model.prune_at = float(keep_ratio), stages
        model.predictors = nn.ModuleList(KeepPredictor(vit.embed_dim, keep_ratio) for _ in stages)
        model.predictors.to(vit.pos_embed.device)
        model.token_weights, model.kept_units = None, []
        return model

    # --- what a task reads (the token-reduction hooks of ``Backbone``) ---------------------------------------

    def added_modules(self) -> dict[str, nn.Module]:
        return {"predictors": self.predictors}

    def frozen_parameters(self) -> list[nn.Parameter]:
        """The release's: class and distillation tokens, position and time embeddings."""
        return [p for p in (self.cls_token, self.dist_token, self.pos_embed, self.time_embed) if p is not None]

    def token_keep_weights(self) -> torch.Tensor | None:
        return self.token_weights

    def training_logs(self) -> dict[str, torch.Tensor]:
        """The kept fraction of the units after each stage, which the keep-ratio loss holds at rho, rho², rho³."""
        return {f"kept_fraction_{s}": kept.float().mean() for s, kept in enumerate(self.kept_units)}

    def distillation_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The patch tokens of a masked (training) pass, every one still in place, and the policy: 1 where kept."""
        p, weights = self.num_prefix_tokens, self.token_weights
        return tokens[:, p:], None if weights is None else weights[:, p:]

    def token_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The kept units of each stage ``[B, *unit_grid]`` (a clip under divided attention: spatial positions)."""
        grid = self.unit_grid(self.patch_embed.grid(x.shape[2:]))
        return [kept.reshape(kept.shape[0], *grid).float() for kept in self.kept_units]

    # --- pruning --------------------------------------------------------------------------------------------

    def keep_counts(self, units: int) -> list[int]:
        """Units kept after each stage at inference: ``int(units * rho^s)``, at least one."""
        return [max(1, int(units * self.keep_ratio ** (s + 1) + 1e-9)) for s in range(len(self.prune_at))]

    def unit_grid(self, grid: Sequence[int]) -> tuple[int, ...]:
        """The grid of pruning units: the patch grid, or per-frame positions under divided attention."""
        return tuple(grid[1:]) if self.attention == "divided" else tuple(grid)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise ValueError(
            "a backbone with token pruning (DynamicViT) has no dense feature maps: pruned tokens are gone. "
            "Segmentation and UNETR need the full token grid; build the backbone without token_pruning"
        )

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pruned(x, masked=self.training, sample=self.training)

    def forward_pruned(self, x: torch.Tensor, *, masked: bool, sample: bool) -> torch.Tensor:
        """Final-normalised tokens with pruning: ``masked`` keeps every token and passes the decisions to
        attention as a policy (``[B, prefix + N, C]``), otherwise the kept ones are gathered (``[B, prefix + K, C]``);
        ``sample`` draws hard Gumbel-softmax decisions (training), otherwise the top-k units are kept. With
        ``sample`` the keep-ratio loss is left as the auxiliary loss ``keep_ratio``."""
        if sample and not masked:
            raise ValueError("sampled (Gumbel) decisions need the masked forward")
        x, grid = self.embed(x)
        batch, units = x.shape[0], self._num_units(grid)
        keep = x.new_ones(batch, units, 1)  # masked: decisions over all units; gathered: the kept ones (all 1)
        origin = torch.arange(units, device=x.device).expand(batch, -1)  # gathered: original index of each unit
        policy, decisions, kept_units = None, [], []
        counts = self.keep_counts(units)
        stage = 0
        for i in range(len(self.blocks)):
            if stage < len(self.prune_at) and i == self.prune_at[stage]:
                log_probs = self.predictors[stage](self._unit_features(x, grid), keep)  # [B, U, 2]
                if sample:
                    keep = F.gumbel_softmax(log_probs, hard=True)[..., :1] * keep
                    decisions.append(keep[..., 0])
                    kept_units.append(keep[..., 0].detach() > 0.5)
                else:
                    score = log_probs[..., 0].masked_fill(keep[..., 0] == 0, float("-inf"))
                    top = score.topk(counts[stage], dim=1).indices.sort(dim=1).values  # [B, K], in grid order
                    if masked:
                        keep = torch.zeros_like(keep).scatter_(1, top[..., None], 1.0)
                        kept_units.append(keep[..., 0] > 0.5)
                    else:
                        x, origin = self._gather(x, top, grid), origin.gather(1, top)
                        keep = x.new_ones(batch, top.shape[1], 1)
                        kept = torch.ones_like(origin, dtype=torch.bool)  # a tensor: ONNX export has no scatter of a scalar
                        kept_units.append(torch.zeros(batch, units, dtype=torch.bool, device=x.device).scatter(1, origin, kept))
                if masked:
                    policy = self._token_policy(keep, grid)
                stage += 1
            x = self.run_block(i, x, grid, policy)
        self.token_weights = None if policy is None else policy[..., 0].detach()
        self.kept_units = kept_units
        if decisions:
            self.add_auxiliary_loss("keep_ratio", self.keep_ratio_loss(decisions), weight=2.0)
        return self.norm(x)

    def keep_ratio_loss(self, decisions: list[torch.Tensor]) -> torch.Tensor:
        """DynamicViT's ratio loss: per stage, the squared gap between each sample's kept fraction of the units
        ``[B, U]`` and the target ``rho^s``, averaged over samples, then over stages."""
        terms = [((d.mean(1) - self.keep_ratio ** (s + 1)) ** 2).mean() for s, d in enumerate(decisions)]
        return torch.stack(terms).mean()

    # --- units: patch tokens, or spatial positions across frames (divided attention) ----------------------

    def _num_units(self, grid: Sequence[int]) -> int:
        n = 1
        for side in self.unit_grid(grid):
            n *= side
        return n

    def _unit_features(self, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """What the predictor scores: the patch tokens ``[B, N, C]``, or each position's mean over frames."""
        patches = x[:, self.num_prefix_tokens :]
        if self.attention == "divided":
            return reduce(patches, "b (t n) c -> b n c", "mean", t=grid[0])
        return patches

    def _token_policy(self, keep: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Unit decisions ``[B, U, 1]`` as the attention policy of all tokens ``[B, prefix + tokens, 1]``."""
        if self.attention == "divided":
            keep = repeat(keep, "b n one -> b (t n) one", t=grid[0])
        return torch.cat([keep.new_ones(keep.shape[0], self.num_prefix_tokens, 1), keep], dim=1)

    def _gather(self, x: torch.Tensor, index: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Keep the prefix tokens and the units ``index`` ``[B, K]`` (each position in every frame, divided)."""
        p, c = self.num_prefix_tokens, x.shape[-1]
        if self.attention == "divided":
            patches = rearrange(x[:, p:], "b (t n) c -> b t n c", t=grid[0])
            patches = patches.gather(2, index[:, None, :, None].expand(-1, grid[0], -1, c))
            patches = rearrange(patches, "b t k c -> b (t k) c")
        else:
            patches = x[:, p:].gather(1, index[..., None].expand(-1, -1, c))
        return torch.cat([x[:, :p], patches], dim=1)


register_token_reduction("dynamicvit", DynamicViT.from_vit)
