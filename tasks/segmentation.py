"""Semantic segmentation: ``SegmentationModule``, the SegFormer all-MLP decoder (``heads.segformer``) over any backbone.

``python -m tasks.segmentation fit --config configs/segformer_b0.yaml``
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from engine.cli import TaskCLI, run_cli
from engine.picture_makers import SegmentationPictures
from engine.sliding_window import LabelSink, stitch_windows
from heads.segformer import SegFormerHead

from .module import Stage, TaskModule


# How to run a trained model, not part of it: left out of checkpoints, because LightningCLI lets a checkpoint's
# hyperparameters override the command line, and ``validate --ckpt_path ... --model.inference slide`` must work.
EVAL_OPTIONS = ("inference", "window_size", "window_stride", "sw_batch_size", "save_overlay")


class SegmentationModule(TaskModule):
    """Semantic segmentation: backbone, ``SegFormerHead``, logits upsampled to the label size.

    Args:
        decoder_dim: width of the decoder (``SegFormerHead.embed_dim``).
        decoder_dropout: channel dropout before the classifier.
        ignore_index: label left out of the loss and the metrics (linked from the data).
        align_corners: of the final bilinear upsampling; mmseg uses ``False``, segmentation-models-pytorch
            ``True``. ``None``: the convention of the ``pretrained`` checkpoint's format (``True`` for an smp file,
            said in the load report), else ``False``.
        ce_weight, dice_weight, lovasz_weight: weights of cross-entropy and of smp's Dice and Lovasz losses.
        class_weights: cross-entropy weight per class.
        inference: ``whole`` image or ``slide`` (windows of ``window_size`` every ``window_stride``,
            averaged) for validation, test and predict.
        window_size, window_stride: sliding-window size and step (height, width).
        sw_batch_size: windows per forward pass.
        save_overlay: ``predict`` also writes the colour mask blended over the image.
        **kwargs: backbone, data link and optimisation recipe of ``TaskModule``.
    """

    main_metric = "miou"

    def __init__(
        self,
        *,
        decoder_dim: int = 256,
        decoder_dropout: float = 0.1,
        ignore_index: int = 255,
        align_corners: bool | None = None,
        ce_weight: float = 1.0,
        dice_weight: float = 0.0,
        lovasz_weight: float = 0.0,
        class_weights: list[float] | None = None,
        inference: Literal["whole", "slide"] = "whole",
        window_size: tuple[int, int] = (512, 512),
        window_stride: tuple[int, int] = (341, 341),
        sw_batch_size: int = 1,
        save_overlay: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if self.hparams.align_corners is None:  # not set, and no convention from a checkpoint
            self.hparams.align_corners = False
        if class_weights is not None and len(class_weights) != self.num_classes:
            raise ValueError(f"class_weights has {len(class_weights)} entries for {self.num_classes} classes")
        weights = None if class_weights is None else torch.tensor(class_weights)
        self.register_buffer("class_weights", weights, persistent=False)
        self._last_summary = ""  # the last validation's per-class IoU line, printed again when fit ends
        self.extra_losses = nn.ModuleDict()
        if dice_weight or lovasz_weight:
            from segmentation_models_pytorch.losses import DiceLoss, LovaszLoss

            if dice_weight:
                self.extra_losses["dice"] = DiceLoss("multiclass", ignore_index=ignore_index)
            if lovasz_weight:
                self.extra_losses["lovasz"] = LovaszLoss("multiclass", ignore_index=ignore_index)
        self.class_names = self.class_names or [str(i) for i in range(self.num_classes)]

    def build_head(self) -> nn.Module:
        return SegFormerHead(
            [f.channels for f in self.backbone.feature_info], self.num_classes, embed_dim=self.hparams.decoder_dim,
            dropout=self.hparams.decoder_dropout,
        )

    def picture_maker(self) -> SegmentationPictures:
        from datamodules.label_maps import voc_palette
        from datamodules.segmentation import SegmentationDataModule

        data = self.trainer.datamodule
        if isinstance(data, SegmentationDataModule):  # the colours of the masks predict writes (class + 1 for ADE20K)
            palette = data.palette[int(data.reduce_zero_label) :]
        else:
            palette = voc_palette(max(256, self.num_classes))
        hp = self.hparams
        return SegmentationPictures(self.class_names, palette, ignore_index=hp.ignore_index, align_corners=hp.align_corners)

    def build_metrics(self, stage: Stage) -> MetricCollection:
        k, ignore = self.num_classes, self.hparams.ignore_index
        return MetricCollection(
            {
                "miou": MulticlassJaccardIndex(k, average="macro", ignore_index=ignore, validate_args=False),
                "acc": MulticlassAccuracy(k, average="micro", ignore_index=ignore, validate_args=False),
                "macc": MulticlassAccuracy(k, average="macro", ignore_index=ignore, validate_args=False),
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes, H, W]`` at the input's size."""
        logits = self.head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=self.hparams.align_corners)

    def forward_stage(self, x: torch.Tensor, stage: Stage) -> torch.Tensor:
        if stage == "train" or self.hparams.inference == "whole":
            return self(x)
        return self.sliding_window(x)

    def _window_grid(self, x: torch.Tensor) -> tuple[list[int], list[float]]:
        """Window size and MONAI overlap for ``window_size``/``window_stride`` over ``x``: windows larger than the image
        shrink to it, so no padding enters the model."""
        roi = [min(c, s) for c, s in zip(self.hparams.window_size, x.shape[2:])]
        # MONAI steps int(roi * (1 - overlap)); the half pixel keeps the float product from rounding down
        overlap = [1.0 - (min(st, r) + 0.5) / r for st, r in zip(self.hparams.window_stride, roi)]
        return roi, overlap

    def sliding_window(self, x: torch.Tensor) -> torch.Tensor:
        """Average the logits of windows of ``window_size`` placed every ``window_stride`` (the last one flush with
        the border, as mmseg)."""
        from monai.inferers import sliding_window_inference

        roi, overlap = self._window_grid(x)
        return sliding_window_inference(x, roi, self.hparams.sw_batch_size, self, overlap=overlap, mode="constant")

    def sliding_window_labels(self, x: torch.Tensor) -> torch.Tensor:
        """``sliding_window(x).argmax(1)`` ``[B, H, W]``, stitched band by band: each finished region of the window grid
        becomes labels at once, so a 10 000 x 10 000 tile never holds its ``[num_classes, H, W]`` logits."""
        roi, overlap = self._window_grid(x)
        dtype = torch.uint8 if self.num_classes <= 256 else torch.int32
        labels = LabelSink((x.shape[0], *x.shape[2:]), dtype=dtype, device=x.device)
        stitch_windows(x, roi, self.hparams.sw_batch_size, self, labels, overlap=overlap, mode="constant")
        return labels.labels

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        for key in EVAL_OPTIONS:
            checkpoint.get("hyper_parameters", {}).pop(key, None)

    def to_label_size(self, logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if tuple(logits.shape[2:]) == tuple(size):
            return logits
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=self.hparams.align_corners)

    def compute_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        hp = self.hparams
        output = self.to_label_size(output, target.shape[1:])
        loss = hp.ce_weight * F.cross_entropy(output, target, weight=self.class_weights, ignore_index=hp.ignore_index)
        if "dice" in self.extra_losses:
            loss = loss + hp.dice_weight * self.extra_losses["dice"](output, target)
        if "lovasz" in self.extra_losses:
            loss = loss + hp.lovasz_weight * self.extra_losses["lovasz"](output, target)
        return loss

    def metric_inputs(self, output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.to_label_size(output, target.shape[1:]).argmax(1), target

    # --- per-class IoU and the summary line -------------------------------------------------------------

    def class_iou(self, stage: Literal["val", "test"]) -> torch.Tensor:
        """IoU per class from the stage's accumulated confusion matrix (NaN where a class never occurs)."""
        metric = self.metrics[f"{stage}_metrics"]["miou"]
        with metric.sync_context():
            confmat = metric.confmat.double().clone()
        inter = confmat.diag()
        return (inter / (confmat.sum(0) + confmat.sum(1) - inter)).float()

    def _epoch_summary(self, stage: Literal["val", "test"]) -> None:
        """Per-class IoU: logged as ``<stage>/iou/<class>`` and printed by validate/test, printed at the end of fit."""
        if self.trainer.sanity_checking:
            return
        iou = self.class_iou(stage)
        per_class = ", ".join(f"{n} {v:.3f}" for n, v in zip(self.class_names, iou.tolist()) if v == v)  # v == v: not NaN
        self._last_summary = f"[{stage}] epoch {self.current_epoch}: mIoU {float(iou.nanmean()):.4f} | per class: {per_class}"
        if self.trainer.state.fn == "fit":
            return  # during fit the epoch line shows val/miou; per class it would print a class count of numbers
        for name, value in zip(self.class_names, iou.tolist()):
            if value == value:  # the class occurred in the labels or the predictions
                self.log(f"{stage}/iou/{name}", value, sync_dist=False)
        rank_zero_info(self._last_summary)

    def on_validation_epoch_end(self) -> None:
        self._epoch_summary("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_summary("test")

    def on_fit_end(self) -> None:
        if self._last_summary:
            rank_zero_info(self._last_summary)

    # --- predict --------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """The CLI links ``data.ignore_index`` into the model; a trainer given both directly checks they agree."""
        from datamodules.segmentation import SegmentationDataModule

        dm = self.trainer.datamodule
        if isinstance(dm, SegmentationDataModule) and dm.ignore_index != self.hparams.ignore_index:
            raise ValueError(
                f"data.ignore_index={dm.ignore_index} but model.ignore_index={self.hparams.ignore_index}: "
                "set both to the same value"
            )

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """One row per image: its predicted ``label`` map ``[H, W]`` (0-based classes) at the image's original size,
        for the DataModule's ``write_prediction`` to write in the data's own format (and the overlay if asked)."""
        x = batch["input"]
        dtype = torch.uint8 if self.num_classes <= 256 else torch.int32  # predictions may be kept until the end
        sizes = batch["size"].tolist()
        if self.hparams.inference == "slide" and all(tuple(hw) == tuple(x.shape[2:]) for hw in sizes):
            labels = self.sliding_window_labels(x).cpu()  # at the label size already: no logits kept
        else:
            logits = self.forward_stage(x, "test")
            labels = [self.to_label_size(logits[i : i + 1].float(), hw).argmax(1)[0].to(dtype).cpu() for i, hw in enumerate(sizes)]
        rows = []
        samples = zip(batch["index"].tolist(), batch["path"], batch["name"], sizes)
        for i, (index, path, name, (height, width)) in enumerate(samples):
            rows.append({
                "index": index, "path": path, "name": name, "height": height, "width": width, "label": labels[i].numpy(),
                "save_overlay": self.hparams.save_overlay,
            })
        return rows


class SegmentationCLI(TaskCLI):
    """The task CLI, with the data's ignore label linked into the model (the loss and the metrics leave it out)."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments("data.ignore_index", "model.ignore_index", apply_on="instantiate")


def main(args: Any = None) -> TaskCLI:
    """``python -m tasks.<task>``; returns the CLI, its trainer and model after the subcommand ran."""
    from datamodules.segmentation import SegmentationDataModule

    return run_cli(SegmentationModule, SegmentationDataModule, args=args, cli_class=SegmentationCLI)


if __name__ == "__main__":
    main()
