"""Space-time pieces of the video ViT (TimeSformer, Bertasius et al., 2021).

Video tokens are laid out time-major, ``[B, prefix + T*N, C]`` with ``N = H*W`` patches per frame, so
folding them into a channel-first map ``[B, C, T, H, W]`` is a plain reshape. Parameter names follow the
original release (``temporal_norm1``, ``temporal_attn``, ``temporal_fc``) so its checkpoints load as they are.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from einops import rearrange, reduce, repeat
from torch import nn

from .layers import Block

VideoAttention = Literal["joint", "divided", "space_only"]


class DividedSpaceTimeBlock(Block):
    """TimeSformer block: temporal attention, then spatial attention, then the MLP, each pre-norm residual.

    A ``Block`` (its ``norm1``, ``attn``, ``norm2``, ``mlp`` serve the spatial attention and the MLP) with a
    temporal branch in front: ``temporal_norm1``, ``temporal_attn`` and ``temporal_fc``. Temporal attention
    runs over the frames of each patch position (prefix tokens take no part); its output passes
    ``temporal_fc`` before joining the residual stream. ``temporal_fc`` starts at zero, so a block inflated
    from an image ViT begins as that image block. Spatial attention runs per frame with the prefix (class)
    tokens copied into every frame; the copies' updates are averaged over frames.

    Args:
        dim: token width.
        num_heads: heads of both attentions.
        num_prefix_tokens: leading non-patch tokens (class and distillation tokens).
        **block_kwargs: the rest of ``Block``'s arguments (``mlp_ratio``, ``qkv_bias``, dropouts, ``drop_path``
            for all three residual branches, the parts as classes); the temporal norm and attention are built
            as copies of the spatial ones, so they share their configuration.
    """

    def __init__(self, dim: int, num_heads: int, *, num_prefix_tokens: int = 1, **block_kwargs: Any) -> None:
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        super().__init__(dim, num_heads, **block_kwargs)
        self.num_prefix_tokens = num_prefix_tokens
        self.temporal_norm1 = copy.deepcopy(self.norm1)
        self.temporal_attn = copy.deepcopy(self.attn)
        for layer in self.temporal_attn.modules():
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()  # a fresh draw, as if constructed: not the spatial attention's weights
        self.temporal_fc = nn.Linear(dim, dim)
        # the release's order, temporal branch first: models initialise their layers in module order, so a model
        # built from scratch with a given seed starts from the same weights as the release's (and as before)
        first = ("temporal_norm1", "temporal_attn", "temporal_fc")
        self._modules = {**{k: self._modules[k] for k in first}, **{k: v for k, v in self._modules.items() if k not in first}}

    def reset_temporal(self) -> None:
        """Zero ``temporal_fc`` so the block starts as a spatial-only (image) block."""
        nn.init.zeros_(self.temporal_fc.weight)
        nn.init.zeros_(self.temporal_fc.bias)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, num_frames: int, policy: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x``: time-major tokens ``[B, prefix + T*N, C]``; ``policy``: optional token-keep state
        ``[B, prefix + T*N, 1]`` (1 kept, 0 dropped), applied to the keys of both attentions."""
        p, t = self.num_prefix_tokens, num_frames
        keep_time, keep_space = self._split_policy(x, t, policy)
        prefix, patches = x[:, :p], x[:, p:]
        xt = rearrange(self.temporal_norm1(patches), "b (t n) c -> (b n) t c", t=t)
        res = self.temporal_fc(self.temporal_attn(xt, keep_time))  # per token, so before folding back (faster)
        patches = patches + self.drop_path1(rearrange(res, "(b n) t c -> b (t n) c", b=x.shape[0]))

        xs = rearrange(patches, "b (t n) c -> (b t) n c", t=t)
        if p:
            xs = torch.cat([repeat(prefix, "b p c -> (b t) p c", t=t), xs], dim=1)
        res = self.drop_path1(self.ls1(self.attn(self.norm1(xs), keep_space)))  # [(B T), p + N, C]
        res_patches = rearrange(res[:, p:], "(b t) n c -> b (t n) c", t=t)
        if p:
            res_prefix = reduce(res[:, :p], "(b t) p c -> b p c", "mean", t=t)
            x = torch.cat([prefix + res_prefix, patches + res_patches], dim=1)
        else:
            x = patches + res_patches
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def _split_policy(
        self, x: torch.Tensor, num_frames: int, policy: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The keep state of the patch tokens per patch position over time ``[(B N), T]`` and per frame with
        the prefix tokens (always kept) in front ``[(B T), prefix + N]``."""
        if policy is None:
            return None, None
        if policy.shape[:2] != x.shape[:2] or policy[0].numel() != x.shape[1]:
            raise ValueError(
                f"policy must have shape [B, N, 1] or [B, N] for tokens {tuple(x.shape)}, got {tuple(policy.shape)}"
            )
        p = self.num_prefix_tokens
        keep = policy.reshape(x.shape[:2])[:, p:]  # [B, T*N]
        keep_time = rearrange(keep, "b (t n) -> (b n) t", t=num_frames)
        keep_space = rearrange(keep, "b (t n) -> (b t) n", t=num_frames)
        keep_space = torch.cat([keep_space.new_ones(keep_space.shape[0], p), keep_space], dim=1)
        return keep_time, keep_space


def frames_to_clip(x: torch.Tensor, num_frames: int, num_prefix_tokens: int) -> torch.Tensor:
    """Fold per-frame tokens ``[(B T), p + N, C]`` (space-only attention) into clip tokens
    ``[B, p + T*N, C]``; the frames' prefix tokens are averaged, as the original space-only baseline does."""
    p = num_prefix_tokens
    patches = rearrange(x[:, p:], "(b t) n c -> b (t n) c", t=num_frames)
    if not p:
        return patches
    return torch.cat([reduce(x[:, :p], "(b t) p c -> b p c", "mean", t=num_frames), patches], dim=1)
