"""Image classification: a pooling head over any backbone, and ``ClassificationModule``.

``python -m tasks.classification fit --config configs/vit_small_patch16.yaml``
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.layers import AttentionPoolLatent
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from backbones.base import PoolType

from .base import Stage, TaskModule, run_cli


class ClassificationHead(nn.Module):
    """Pool backbone features to one vector per sample, then a linear classifier.

    Args:
        in_features: width of the tokens or pooled features.
        num_classes: classifier outputs.
        pool: ``cls`` (class token), ``avg`` (mean of patch tokens), ``map`` (multi-head attention
            pooling with a learned query, as in SigLIP), or ``native`` (features already pooled by the
            backbone's own architecture, e.g. a timm model).
        num_prefix_tokens: leading non-patch tokens (class token) in the token sequence.
        num_heads: heads of the ``map`` pooling.
        drop_rate: dropout before the classifier.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        pool: PoolType = "cls",
        num_prefix_tokens: int = 1,
        num_heads: int = 8,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if pool == "cls" and num_prefix_tokens == 0:
            raise ValueError("pool='cls' needs a backbone with a class token; use 'avg' or 'map'")
        self.pool = pool
        self.num_prefix_tokens = num_prefix_tokens
        self.attn_pool = AttentionPoolLatent(in_features, num_heads=num_heads) if pool == "map" else None
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.pool == "native":
            x = features  # [B, C]
        elif self.pool == "cls":
            x = features[:, 0]  # [B, P + N, C] -> [B, C]
        elif self.pool == "avg":
            x = features[:, self.num_prefix_tokens :].mean(1)
        else:
            x = self.attn_pool(features[:, self.num_prefix_tokens :])
        return self.fc(self.drop(x))


class ClassificationModule(TaskModule):
    """Image classifier: backbone, pooling head, cross-entropy with label smoothing, optional mixup/cutmix.

    Args:
        pool: head pooling (see ``ClassificationHead``); ``None`` takes the backbone's default
            (``cls`` for ViTs with a class token, ``native`` for timm models, ``avg`` otherwise).
        head_drop_rate: dropout before the classifier.
        label_smoothing: cross-entropy label smoothing (ignored under mixup, which smooths itself).
        mixup_alpha, cutmix_alpha: Beta parameters of timm's Mixup/CutMix; 0 disables each.
        mixup_prob, mixup_switch_prob: chance to apply either, and to pick cutmix when both are on.
        **kwargs: backbone, data link and optimisation recipe of ``TaskModule``.
    """

    def __init__(
        self,
        *,
        pool: PoolType | None = None,
        head_drop_rate: float = 0.0,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        **kwargs: Any,
    ) -> None:
        self.pool = pool
        self.head_drop_rate = head_drop_rate
        super().__init__(**kwargs)
        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            self.mixup = Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                prob=mixup_prob,
                switch_prob=mixup_switch_prob,
                label_smoothing=label_smoothing,
                num_classes=self.num_classes,
            )

    def build_head(self) -> nn.Module:
        pool = self.pool or self.backbone.default_pool
        if pool == "native" and not self.backbone.has_pooled:
            raise ValueError(f"pool='native' needs a timm backbone; {type(self.backbone).__name__} pools by cls/avg/map")
        if pool == "cls" and not self.backbone.has_tokens:
            raise ValueError("pool='cls' needs a token backbone (a ViT); use 'avg', 'map' or 'native'")
        self.pool = pool
        return ClassificationHead(
            self.backbone.num_features,
            self.num_classes,
            pool=pool,
            num_prefix_tokens=self.backbone.num_prefix_tokens,
            drop_rate=self.head_drop_rate,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "native":
            features = self.backbone.forward_pooled(x)
        elif self.backbone.has_tokens:
            features = self.backbone.forward_tokens(x)
        else:
            features = self.backbone(x)[-1].flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, HW, C]
        return self.head(features)

    def build_metrics(self) -> MetricCollection:
        metrics = {"top1": MulticlassAccuracy(self.num_classes, top_k=1, average="micro")}
        if self.num_classes > 5:
            metrics["top5"] = MulticlassAccuracy(self.num_classes, top_k=5, average="micro")
        return MetricCollection(metrics)

    def prepare_batch(self, batch: dict[str, Any], stage: Stage) -> dict[str, Any]:
        if stage != "train" or self.mixup is None:
            return batch
        if batch["input"].shape[0] % 2:
            raise ValueError("mixup/cutmix needs an even batch size (set data.batch_size to an even number)")
        x, soft = self.mixup(batch["input"], batch["target"])
        return {**batch, "input": x, "loss_target": soft}

    def compute_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == 2:  # soft targets from mixup/cutmix
            return torch.sum(-target * F.log_softmax(output, dim=-1), dim=-1).mean()
        return F.cross_entropy(output, target, label_smoothing=self.hparams.label_smoothing)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        probs = self(batch["input"]).float().softmax(-1)
        conf, pred = probs.max(-1)
        return [
            {"index": int(i), "path": p, "predicted_class": self.class_name(c), "probability": f"{v:.6f}"}
            for i, p, c, v in zip(batch["index"].tolist(), batch["path"], pred.tolist(), conf.tolist())
        ]


def main(args: Any = None) -> None:
    from datamodules.classification import ClassificationDataModule

    run_cli(ClassificationModule, ClassificationDataModule, args=args)


if __name__ == "__main__":
    main()
