"""The classification head: pooling of a backbone's tokens or last map (class token, average, attention probe or the
backbone's own pooling), then a linear classifier; and ``Classifier``, a backbone with such a head (a task's
network, a teacher, a searched sub-network)."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.layers import AttentionPoolLatent
from torch import nn

from backbones import Backbone
from backbones.base import PoolType


class ClassificationHead(nn.Module):
    """Pool backbone features to one vector per sample, then a linear classifier.

    Args:
        in_features: width of the tokens or pooled features.
        num_classes: classifier outputs.
        pool: ``cls`` (class token), ``avg`` (mean of patch tokens), ``map`` (multi-head attention
            pooling of the patch tokens by a learned probe, then LayerNorm and a residual MLP: big_vision's
            ``MAPHead``, timm's ``AttentionPoolLatent``), or ``native`` (features already pooled by the
            backbone's own architecture, e.g. a timm model).
        num_prefix_tokens: leading non-patch tokens (class token) in the token sequence.
        num_heads, mlp_ratio: attention heads and MLP width (relative to ``in_features``) of the ``map``
            pooling; big_vision and timm take the backbone's (``classification_head`` does).
        drop_rate: dropout before the classifier.
        distilled: a second classifier ``fc_dist`` on the distillation token (DeiT; token 1, ``pool='cls'``), or
            with ``pool='native'`` on the same pooled features (EfficientFormerV2); ``forward`` averages the two
            classifiers' logits, ``forward_both`` returns them apart.
        mlp_act: the ``map`` pooling MLP's GELU, ``gelu`` or ``gelu_tanh`` (the backbone's ``mlp_act``: big_vision's
            MAPHead uses the tanh approximation as its encoder does).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        pool: PoolType = "cls",
        num_prefix_tokens: int = 1,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        distilled: bool = False,
        mlp_act: str = "gelu",
    ) -> None:
        super().__init__()
        if pool == "cls" and num_prefix_tokens == 0:
            raise ValueError("pool='cls' needs a backbone with a class token; use 'avg' or 'map'")
        if distilled and pool != "native" and (pool != "cls" or num_prefix_tokens < 2):
            raise ValueError(
                "a distilled head reads the class and distillation tokens (pool='cls', 2 prefix tokens) or the "
                "backbone's own pooled features (pool='native')"
            )
        self.pool = pool
        self.num_prefix_tokens = num_prefix_tokens
        if pool == "map" and in_features % num_heads:
            raise ValueError(f"pool='map' splits {in_features} features over heads: num_heads={num_heads} does not divide it")
        self.attn_pool = (
            AttentionPoolLatent(
                in_features, num_heads=num_heads, mlp_ratio=mlp_ratio, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                act_layer=partial(nn.GELU, approximate="tanh") if mlp_act == "gelu_tanh" else nn.GELU,
            )
            if pool == "map" else None
        )
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes)
        self.fc_dist = nn.Linear(in_features, num_classes) if distilled else None

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Refuse a ``map`` head saved before it had its LayerNorm (and the backbone's head count): its weights
        would load but compute something else."""
        norm = [f"{prefix}attn_pool.norm.{p}" for p in ("weight", "bias")]
        if self.attn_pool is not None and any(k.startswith(f"{prefix}attn_pool.") for k in state_dict):
            lacking = [k for k in norm if k not in state_dict]
            if lacking:
                raise ValueError(
                    f"the checkpoint's pool='map' head has the old layout, without {', '.join(lacking)}: map heads now "
                    "have big_vision's LayerNorm and the backbone's number of heads (not 8). Retrain the head, or "
                    "load the file with pool='avg'/'cls' to reuse its backbone"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, features: torch.Tensor, token_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, K]``; ``token_weights`` ``[B, P + N]`` (1 kept, 0 dropped) restricts ``avg`` pooling to the
        tokens a pruned backbone kept in training (``DynamicViT.token_weights``), where dropped ones are still there."""
        if token_weights is not None and self.pool == "map":
            raise ValueError("pool='map' cannot leave out pruned tokens; pool a token-pruned backbone by 'cls' or 'avg'")
        if self.fc_dist is not None:
            logits, dist = self.forward_both(features)
            return (logits + dist) / 2
        if self.pool == "native":
            x = features  # [B, C]
        elif self.pool == "cls":
            x = features[:, 0]  # [B, P + N, C] -> [B, C]
        elif self.pool == "avg" and token_weights is not None:
            w = token_weights[:, self.num_prefix_tokens :, None].to(features.dtype)  # [B, N, 1]
            x = (features[:, self.num_prefix_tokens :] * w).sum(1) / w.sum(1).clamp_min(1e-6)
        elif self.pool == "avg":
            x = features[:, self.num_prefix_tokens :].mean(1)
        else:
            x = self.attn_pool(features[:, self.num_prefix_tokens :])
        return self.fc(self.drop(x))

    def forward_both(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the class-token and distillation-token classifiers, ``([B, K], [B, K])``."""
        if self.fc_dist is None:
            raise TypeError("forward_both needs a head built with distilled=True")
        if self.pool == "native":
            x = self.drop(features)  # [B, C]
            return self.fc(x), self.fc_dist(x)
        return self.fc(self.drop(features[:, 0])), self.fc_dist(self.drop(features[:, 1]))


def pooled_features(backbone: Backbone, pool: PoolType, x: torch.Tensor) -> torch.Tensor:
    """What a ``ClassificationHead`` with ``pool`` takes: the backbone's own pooled features (``native``), its
    tokens (a token model), or its last map as tokens ``[B, HW, C]``."""
    if pool == "native":
        return backbone.forward_pooled(x)
    if backbone.has_tokens:
        return backbone.forward_tokens(x)
    return backbone(x)[-1].flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, HW, C]


class Classifier(nn.Module):
    """A backbone with a ``ClassificationHead``: the network of ``ClassificationModule``, and of a teacher."""

    def __init__(self, backbone: Backbone, head: ClassificationHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(pooled_features(self.backbone, self.head.pool, x))

    def forward_with_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the backbone's final tokens (a teacher's, for token distillation)."""
        if self.head.pool == "native" or not self.backbone.has_tokens:
            raise TypeError(f"{type(self.backbone).__name__} with pool={self.head.pool!r} gives no tokens")
        tokens = self.backbone.forward_tokens(x)
        return self.head(tokens), tokens


def classification_head(
    backbone: Backbone, num_classes: int, pool: PoolType | None, drop_rate: float = 0.0
) -> ClassificationHead:
    """The head for ``backbone``: its default pooling unless told, checked against what it can do."""
    pool = pool or backbone.default_pool
    if pool == "native" and not backbone.has_pooled:
        raise ValueError(
            f"pool='native' needs a backbone with its own pooling (timm, EfficientFormerV2); "
            f"{type(backbone).__name__} pools by cls/avg/map"
        )
    if pool == "cls" and not backbone.has_tokens:
        raise ValueError("pool='cls' needs a token backbone (a ViT); use 'avg', 'map' or 'native'")
    return ClassificationHead(
        backbone.num_features, num_classes, pool=pool, num_prefix_tokens=backbone.num_prefix_tokens,
        num_heads=backbone.num_heads or 8, mlp_ratio=backbone.mlp_ratio, drop_rate=drop_rate,
        distilled=backbone.distilled and pool in ("cls", "native"), mlp_act=getattr(backbone, "mlp_act", "gelu"),
    )
