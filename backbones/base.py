"""The backbone contract shared by every task.

A backbone maps an input of fixed layout (image ``[B, C, H, W]``, video ``[B, C, T, H, W]``, volume
``[B, C, D, H, W]``) to a list of channel-first feature maps, shallow to deep, and declares each map's
channels and stride up front in ``feature_info`` so heads can be built without running the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

PoolType = Literal["cls", "avg", "map", "native"]


@dataclass(frozen=True)
class FeatureInfo:
    """One output of a backbone: its channel count and its stride per spatial dimension."""

    channels: int
    stride: tuple[int, ...]

    @property
    def reduction(self) -> int:
        """The largest stride, timm's ``reduction`` (for 2-D maps with equal strides they coincide)."""
        return max(self.stride)


class Backbone(nn.Module):
    """Base class of every backbone.

    Subclasses set ``feature_info`` in ``__init__`` and implement ``forward(x) -> list[Tensor]``.
    ``in_chans`` and ``spatial_dims`` describe the input. Token models (ViTs) also implement
    ``forward_tokens(x) -> [B, num_prefix_tokens + N, num_features]`` so a head can pool by class token,
    average or attention; ``default_pool`` is what a classification head uses unless told otherwise.
    """

    feature_info: list[FeatureInfo]
    in_chans: int = 3
    spatial_dims: int = 2
    num_features: int
    num_prefix_tokens: int = 0
    default_pool: PoolType = "avg"

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def has_tokens(self) -> bool:
        return type(self).forward_tokens is not Backbone.forward_tokens

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} is not a token model; pool by 'avg' over its last feature map")

    def no_weight_decay(self) -> set[str]:
        """Names of parameters, besides norms and biases, that must not be weight-decayed."""
        return set()

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming the expected layout when ``x`` does not fit this backbone."""
        if x.ndim != 2 + self.spatial_dims or x.shape[1] != self.in_chans:
            layout = "[B, C, H, W]" if self.spatial_dims == 2 else "[B, C, D, H, W] or video [B, C, T, H, W]"
            raise ValueError(
                f"{type(self).__name__} expects input {layout} with C={self.in_chans}, got shape {tuple(x.shape)}"
            )
