"""Video action recognition: ``VideoClassificationModule`` on a video backbone (TimeSformer), with
multi-view testing and skip-and-count handling of clips that fail to decode.

``python -m tasks.video fit --config configs/timesformer_nano.yaml``
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from einops import rearrange
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from engine.cli import TaskCLI, run_cli
from engine.picture_makers import VideoPictures

from .classification import ClassificationModule
from .module import Stage


class VideoClassificationModule(ClassificationModule):
    """Clip classifier: video backbone, pooling head, cross-entropy; test and predict average the
    softmax scores of every view of a video (``[B, V, C, T, H, W]`` batches: clips × crops). Distillation
    from a frozen video teacher, token pruning (``token_pruning``: over all T×N tokens under joint attention, over
    whole spatial positions across frames under divided attention), token merging and mixup work as in
    ``ClassificationModule`` (cutmix does not: it is for images). ``save_token_maps`` draws up to 8 evenly spaced
    frames of each clip with the maps over them (``engine.token_maps.clip_token_map_image``); for multi-view batches,
    those of the first view, which the model then runs once more on its own.

    Args:
        views_per_forward: at most this many clips per forward pass when testing many views (bounds
            memory); ``None`` runs all views of a batch at once.
        **kwargs: head, loss, distillation and mixup options of ``ClassificationModule`` (``pool`` takes
            ``cls``, ``avg`` or ``map``, default the backbone's), backbone and optimisation recipe of ``TaskModule``.
    """

    def __init__(self, *, views_per_forward: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.backbone.spatial_dims != 3:
            raise ValueError(f"{kwargs['backbone']!r} takes images; use a video backbone (e.g. timesformer_base_patch16)")
        if self.hparams.cutmix_alpha > 0:
            raise ValueError("cutmix_alpha is for images; use mixup_alpha for video clips")
        self.skipped: dict[str, int] = {"train": 0, "val": 0, "test": 0}
        self.readers: dict[str, Counter[str]] = {"train": Counter(), "val": Counter(), "test": Counter()}

    def build_head(self) -> nn.Module:
        if self.hparams.pool == "native" or not self.backbone.has_tokens:
            raise ValueError("video classification pools the tokens of a token backbone by 'cls', 'avg' or 'map'")
        return super().build_head()

    def picture_maker(self) -> VideoPictures:
        return VideoPictures([self.class_name(i) for i in range(self.num_classes)])

    def build_metrics(self, stage: Stage) -> MetricCollection:
        metrics = {
            "top1": MulticlassAccuracy(self.num_classes, top_k=1, average="micro"),
            "mean_class_acc": MulticlassAccuracy(self.num_classes, top_k=1, average="macro"),
        }
        if self.num_classes > 5:
            metrics["top5"] = MulticlassAccuracy(self.num_classes, top_k=5, average="micro")
        return MetricCollection(metrics)

    def view_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Log of the softmax scores averaged over the views of each video: ``[B, V, C, T, H, W]`` -> ``[B, K]``."""
        views = x.shape[1]
        clips = rearrange(x, "b v c t h w -> (b v) c t h w")
        chunk = self.hparams.views_per_forward or clips.shape[0]
        logits = torch.cat([self(part) for part in clips.split(chunk)])
        probs = rearrange(logits.float().softmax(-1), "(b v) k -> b v k", v=views).mean(1)
        return probs.clamp_min(1e-12).log()  # cross-entropy of log-probabilities is their NLL

    def forward_stage(self, x: torch.Tensor, stage: Stage) -> torch.Tensor:
        return self.view_log_probs(x) if x.ndim == 6 else super().forward_stage(x, stage)

    # --- clips that failed to decode -----------------------------------------------------------------

    def skip_batch(self, batch: dict[str, Any], stage: Stage) -> bool:
        self.skipped[stage] += len(batch.get("skipped", ()))
        self.readers[stage].update(batch.get("readers", ()))
        return batch["input"] is None

    def _report_skipped(self, stage: Stage) -> None:
        count = self.skipped[stage]
        self.log(f"{stage}/skipped_clips", float(count), reduce_fx="sum", sync_dist=True)
        for reader in ("decord", "pyav"):  # which reader served the clips (PyAV reads what decord cannot)
            self.log(f"{stage}/clips_read_by_{reader}", float(self.readers[stage][reader]), reduce_fx="sum", sync_dist=True)
        self.readers[stage].clear()
        if count:
            rank_zero_warn(f"{count} {stage} clip(s) could not be decoded this epoch and were skipped (see warnings above)")
        self.skipped[stage] = 0

    def on_train_epoch_end(self) -> None:
        self._report_skipped("train")

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._report_skipped("val")
        self.skipped["val"] = 0
        self.readers["val"].clear()

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
        rows = [
            {
                "index": int(i),
                "path": path,
                "top5_classes": ";".join(self.class_name(c) for c in cls),
                "top5_probabilities": ";".join(f"{p:.6f}" for p in ps),
            }
            for i, path, cls, ps in zip(batch["index"].tolist(), batch["path"], top_i.tolist(), top_p.tolist())
        ]
        if self.hparams.save_token_maps:
            from engine.token_maps import clip_token_map_image

            clip = x if x.ndim == 5 else x[:, 0]
            if x.ndim == 6:
                self(clip)  # the maps are those of the last forward pass
            self._write_token_maps(clip, rows, clip_token_map_image)
        return rows


def main(args: Any = None) -> TaskCLI:
    """``python -m tasks.<task>``; returns the CLI, its trainer and model after the subcommand ran."""
    from datamodules.video import VideoDataModule

    return run_cli(VideoClassificationModule, VideoDataModule, args=args)


if __name__ == "__main__":
    main()
