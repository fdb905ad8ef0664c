"""Video action recognition: ``VideoClassificationModule`` on a video backbone (TimeSformer), with
multi-view testing and skip-and-count handling of clips that fail to decode.

``python -m tasks.video fit --config configs/timesformer_nano.yaml``
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from backbones.base import PoolType

from .base import Stage, TaskModule, run_cli
from .classification import ClassificationHead


class VideoClassificationModule(TaskModule):
    """Clip classifier: video backbone, pooling head, cross-entropy; test and predict average the
    softmax scores of every view of a video (``[B, V, C, T, H, W]`` batches: clips × crops).

    Args:
        pool: head pooling (``cls``, ``avg``, ``map``); ``None`` takes the backbone's default (``cls``).
        head_drop_rate: dropout before the classifier.
        label_smoothing: cross-entropy label smoothing.
        views_per_forward: at most this many clips per forward pass when testing many views (bounds
            memory); ``None`` runs all views of a batch at once.
        **kwargs: backbone, data link and optimisation recipe of ``TaskModule``.
    """

    def __init__(
        self,
        *,
        pool: PoolType | None = None,
        head_drop_rate: float = 0.0,
        label_smoothing: float = 0.0,
        views_per_forward: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.pool = pool
        self.head_drop_rate = head_drop_rate
        super().__init__(**kwargs)
        if self.backbone.spatial_dims != 3:
            raise ValueError(f"{kwargs['backbone']!r} takes images; use a video backbone (e.g. timesformer_base_patch16)")
        self.skipped: dict[str, int] = {"train": 0, "val": 0, "test": 0}

    def build_head(self) -> nn.Module:
        pool = self.pool or self.backbone.default_pool
        if pool == "native" or not self.backbone.has_tokens:
            raise ValueError("video classification pools the tokens of a token backbone by 'cls', 'avg' or 'map'")
        self.pool = pool
        return ClassificationHead(
            self.backbone.num_features, self.num_classes, pool=pool,
            num_prefix_tokens=self.backbone.num_prefix_tokens, drop_rate=self.head_drop_rate,
        )

    def build_metrics(self) -> MetricCollection:
        metrics = {
            "top1": MulticlassAccuracy(self.num_classes, top_k=1, average="micro"),
            "mean_class_acc": MulticlassAccuracy(self.num_classes, top_k=1, average="macro"),
        }
        if self.num_classes > 5:
            metrics["top5"] = MulticlassAccuracy(self.num_classes, top_k=5, average="micro")
        return MetricCollection(metrics)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_tokens(x))

    def view_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Log of the softmax scores averaged over the views of each video: ``[B, V, C, T, H, W]`` -> ``[B, K]``."""
        views = x.shape[1]
        clips = rearrange(x, "b v c t h w -> (b v) c t h w")
        chunk = self.hparams.views_per_forward or clips.shape[0]
        logits = torch.cat([self(part) for part in clips.split(chunk)])
        probs = rearrange(logits.float().softmax(-1), "(b v) k -> b v k", v=views).mean(1)
        return probs.clamp_min(1e-12).log()  # cross-entropy of log-probabilities is their NLL

    def forward_stage(self, x: torch.Tensor, stage: Stage) -> torch.Tensor:
        return self.view_log_probs(x) if x.ndim == 6 else self(x)

    def compute_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target, label_smoothing=self.hparams.label_smoothing)

    # --- clips that failed to decode -----------------------------------------------------------------

    def _usable(self, batch: dict[str, Any], stage: Stage) -> bool:
        self.skipped[stage] += len(batch.get("skipped", ()))
        return batch["input"] is not None

    def _report_skipped(self, stage: Stage) -> None:
        count = self.skipped[stage]
        self.log(f"{stage}/skipped_clips", float(count), reduce_fx="sum", sync_dist=True)
        if count:
            rank_zero_warn(f"{count} {stage} clip(s) could not be decoded this epoch and were skipped (see warnings above)")
        self.skipped[stage] = 0

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        return self.shared_step(batch, "train") if self._usable(batch, "train") else None

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self._usable(batch, "val"):
            self.shared_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self._usable(batch, "test"):
            self.shared_step(batch, "test")

    def on_train_epoch_end(self) -> None:
        self._report_skipped("train")

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._report_skipped("val")
        self.skipped["val"] = 0

    def on_test_epoch_end(self) -> None:
        self._report_skipped("test")

    # --- prediction ------------------------------------------------------------------------------------

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        for path in batch.get("skipped", ()):
            rank_zero_warn(f"no prediction for {path}: it could not be decoded")
        if batch["input"] is None:
            return []
        x = batch["input"]
        probs = self.view_log_probs(x).exp() if x.ndim == 6 else self(x).float().softmax(-1)
        top_p, top_i = probs.topk(min(5, self.num_classes), dim=-1)
        return [
            {
                "index": int(i),
                "path": path,
                "top5_classes": ";".join(self.class_name(c) for c in cls),
                "top5_probabilities": ";".join(f"{p:.6f}" for p in ps),
            }
            for i, path, cls, ps in zip(batch["index"].tolist(), batch["path"], top_i.tolist(), top_p.tolist())
        ]


def main(args: Any = None) -> None:
    from datamodules.video import VideoDataModule

    run_cli(VideoClassificationModule, VideoDataModule, args=args)


if __name__ == "__main__":
    main()
