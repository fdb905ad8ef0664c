"""3-D medical segmentation: ``MedicalSegmentationModule``, UNETR's decoder (``heads.unetr``) over the shared ViT.

``python -m tasks.medical fit --config configs/unetr.yaml`` (small, CPU) or ``configs/unetr_btcv.yaml``.
Training sees random ROI crops; validation and testing run sliding-window inference over whole volumes
and score per-class Dice and HD95 (``engine/volume_metrics.py``); ``predict`` hands each input's label volume to the
DataModule, which writes it as NIfTI in the input file's own grid, orientation and affine. Whole volumes are
stitched region by region (``engine/sliding_window.py``): each finished region becomes labels and adds to the loss, so
the full ``[B, num_classes, D, H, W]`` logits are never held, unless ``output_probabilities`` asks for them.
"""

from __future__ import annotations

import ctypes
import gzip
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.transforms import CenterSpatialCrop, SpatialPad
from torch import nn
from torchmetrics import MetricCollection

from backbones.vit import VisionTransformer
from datamodules.io import atomic_write
from engine.cli import TaskCLI, run_cli
from engine.picture_makers import MedicalPictures
from engine.sliding_window import DiceCESink, LabelSink, stitch_windows
from engine.volume_metrics import VolumeMetric, volume_metrics
from heads.unetr import NormName, UnetrDecoder
from ops.kernels import is_tracing
from ops.unetr_blocks import fuse_decoder_blocks

from .module import Stage, TaskModule


class MedicalSegmentationModule(TaskModule):
    """UNETR-style volumetric segmentation: ViT backbone, ``UnetrDecoder``, DiceCE loss, sliding-window
    evaluation with per-class Dice/HD95, NIfTI predictions.

    Args:
        in_channels: input channels (linked from the data: 1 for CT, one per MRI sequence); sets the
            backbone's ``in_chans``. ``None`` keeps ``backbone_kwargs``.
        feature_size, norm_name, res_block, conv_block: the decoder (see ``UnetrDecoder``).
        lambda_dice, lambda_ce: weights of the Dice and cross-entropy terms of MONAI's ``DiceCELoss``.
        batch_dice: Dice over the whole batch rather than per crop (nnU-Net's choice), which helps small
            structures that many crops do not contain.
        sw_roi_size: sliding-window size (linked from ``data.roi_size`` by the CLI); ``None`` uses the
            backbone's ``img_size``.
        sw_batch_size: windows per forward pass; ``auto``: 1 where the windows run on a CPU (batching them speeds CPU
            inference up by ~6 % only, and each window adds its decoder's full-resolution maps, ~0.4 GiB at UNETR-Base
            width: benchmarks/RESULTS.md), 4 on an accelerator (MONAI's UNETR setting).
        sw_overlap: overlap of neighbouring windows (fraction of the ROI).
        sw_mode: ``gaussian`` weights window centres over their borders when stitching; ``constant`` averages.
        sw_stitch_on_cpu: stitch the whole volume in CPU memory while windows run on the model's device (large
            volumes on a small GPU).
        output_probabilities: ``predict`` also writes the class probabilities ``<input name>_probabilities.nii.gz``
            (float32, classes on the 4th axis, on the preprocessed grid with its affine) for users who need soft
            outputs; this stitches the full ``[num_classes, D, H, W]`` logits (MONAI's way), where the default
            turns each finished region into labels and keeps only the ``uint8`` label volume (same labels).
        save_token_maps: with ``token_merging`` (or a ``token_reduction``), ``predict`` also draws each volume's merge
            groups over a few axial slices (``engine.token_maps.volume_token_map_image``) as
            ``<output_dir>/token_maps/<index>_<name>.png``, named in the ``token_map`` column. The sliding windows each
            merge on their own, so the groups drawn are those of one extra encoder pass over a window of the sliding
            window's size at the centre of the volume (zero-padded where the volume is smaller, as the windows are).
        hd_percentile: percentile of the Hausdorff distance (95: HD95).
        channels_last: run the decoder in channels-last memory layout, where oneDNN's 3-D convolutions are
            1.6-4x faster on a CPU; with ``cpu_kernels`` ``on``/``auto`` its blocks are fused (each instance norm and
            its LeakyReLU as one exact channels-last op, 1x1x1 convolutions as matrix products:
            ``ops/unetr_blocks.py``). Same parameters and outputs (within float rounding of the NCDHW form).
            ``False``: MONAI's blocks in NCDHW.
        **kwargs: backbone, data link and optimisation recipe of ``TaskModule``.
    """

    main_metric = "dice"

    def __init__(
        self,
        *,
        in_channels: int | None = None,
        feature_size: int = 16,
        norm_name: NormName = "instance",
        res_block: bool = True,
        conv_block: bool = True,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        batch_dice: bool = False,
        sw_roi_size: tuple[int, int, int] | None = None,
        sw_batch_size: int | Literal["auto"] = "auto",
        sw_overlap: float = 0.5,
        sw_mode: Literal["gaussian", "constant"] = "gaussian",
        sw_stitch_on_cpu: bool = False,
        output_probabilities: bool = False,
        save_token_maps: bool = False,
        hd_percentile: float = 95.0,
        channels_last: bool = True,
        **kwargs: Any,
    ) -> None:
        if sw_batch_size != "auto" and (
            isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, int) or sw_batch_size < 1
        ):
            raise ValueError(f"sw_batch_size must be 'auto' or a number of windows >= 1, got {sw_batch_size!r}")
        if in_channels is not None:
            kwargs["backbone_kwargs"] = {**(kwargs.get("backbone_kwargs") or {}), "in_chans": in_channels}
        super().__init__(**kwargs)
        if save_token_maps and self.backbone.token_reduction is None:
            raise ValueError("save_token_maps draws the merge groups of token_merging (or a token_reduction); set one")
        self.loss = DiceCELoss(
            to_onehot_y=True, softmax=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce, batch=batch_dice
        )
        if sw_roi_size is None and not isinstance(self.backbone, VisionTransformer):
            raise ValueError(f"set sw_roi_size: backbone {type(self.backbone).__name__} has no img_size to use instead")
        self.roi_size = tuple(int(s) for s in (sw_roi_size or self.backbone.img_size))
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.head.to(memory_format=self.memory_format)
        if channels_last:  # the fused blocks where cpu_kernels asks for them (off: MONAI's)
            fuse_decoder_blocks(self.head, self.hparams.cpu_kernels)
        self._spacing: torch.Tensor | None = None
        self._target: torch.Tensor | None = None  # the evaluated volumes' labels, for the loss streamed while stitching
        self._volume_loss: torch.Tensor | None = None

    def build_head(self) -> nn.Module:
        return UnetrDecoder(
            self.backbone.feature_info, in_chans=self.backbone.in_chans, num_classes=self.num_classes,
            spatial_dims=self.backbone.spatial_dims, feature_size=self.hparams.feature_size,
            norm_name=self.hparams.norm_name, res_block=self.hparams.res_block, conv_block=self.hparams.conv_block,
        )

    def picture_maker(self) -> MedicalPictures:
        from datamodules.label_maps import voc_palette

        return MedicalPictures([self.class_name(i) for i in range(self.num_classes)], voc_palette(max(256, self.num_classes)))

    def example_input(self) -> torch.Tensor:
        """One ROI window: the sliding window runs the model on these."""
        return torch.zeros(1, self.backbone.in_chans, *self.roi_size)

    def build_metrics(self, stage: Stage) -> MetricCollection:
        """Dice and HD95 per class; training logs Dice only (HD95 on every crop would cost more than the step).
        Per-class metrics are logged under the data's class names (``val/dice_liver``), by index without them."""
        hp = self.hparams  # saved by TaskModule before it builds the metrics
        if stage == "train":
            return MetricCollection({"dice": VolumeMetric(self.num_classes, with_hd=False)})
        return volume_metrics(self.num_classes, percentile=hp.hd_percentile, class_names=self.class_names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_tracing():  # exporters (TorchScript's ONNX) take no memory formats; the layout does not change results
            return self.head(self.backbone(x), x)
        features = [f.contiguous(memory_format=self.memory_format) for f in self.backbone(x)]
        return self.head(features, x.contiguous(memory_format=self.memory_format)).contiguous()

    # --- the shared step's hooks ---------------------------------------------------------------------------

    def prepare_batch(self, batch: dict[str, Any], stage: Stage) -> dict[str, Any]:
        self._spacing = batch.get("spacing")  # voxel size for HD95 in mm
        self._target = batch.get("target") if stage != "train" else None
        return batch

    def forward_stage(self, x: torch.Tensor, stage: Stage) -> torch.Tensor:
        """Training: logits of the crops. Evaluation: the whole volumes' labels ``[B, 1, D, H, W]`` (``uint8``),
        the loss summed while stitching (``compute_loss`` returns it)."""
        if stage == "train":
            return self(x)
        target, self._target = self._target, None
        labels, self._volume_loss = self.sliding_window_labels(x, target)
        return labels

    def compute_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if output.is_floating_point():
            return self.loss(output, target.to(output.device))
        loss, self._volume_loss = self._volume_loss, None  # streamed by ``sliding_window_labels``
        if loss is None:
            raise RuntimeError("compute_loss got labels without a loss streamed by sliding_window_labels")
        return loss.to(self.device)

    def metric_inputs(self, output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        labels = output.argmax(1) if output.is_floating_point() else output
        return labels, target.to(labels.device), self._spacing

    def windows_per_pass(self, device: torch.device) -> int:
        """``sw_batch_size``, with ``auto`` resolved for the device the windows run on."""
        size = self.hparams.sw_batch_size
        return (1 if device.type == "cpu" else 4) if size == "auto" else int(size)

    def _window_options(self, x: torch.Tensor) -> dict[str, Any]:
        hp = self.hparams
        return {
            "roi_size": self.roi_size, "sw_batch_size": self.windows_per_pass(x.device), "overlap": hp.sw_overlap,
            "mode": hp.sw_mode,
            "sw_device": x.device, "device": torch.device("cpu") if hp.sw_stitch_on_cpu else x.device,
        }

    def sliding_window(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a whole volume ``[B, C, D, H, W]`` from overlapping ROI windows (MONAI), stitched on
        the model's device or, with ``sw_stitch_on_cpu``, in CPU memory: the full output, for soft predictions."""
        options = self._window_options(x)
        return sliding_window_inference(x, predictor=self, **options)

    def sliding_window_labels(
        self, x: torch.Tensor, target: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Labels ``[B, 1, D, H, W]`` (``uint8``, classes above 255 clipped) equal to ``sliding_window(x).argmax(1)``,
        and, given ``target`` labels ``[B, 1, D, H, W]``, the loss of those logits, without holding them: each
        region is blended, turned into labels and added to the loss once its last window is done."""
        options = self._window_options(x)
        labels = LabelSink((x.shape[0], *x.shape[2:]), device=options["device"], max_label=255)
        loss = None if target is None else DiceCESink(self.loss, target, self.num_classes)

        def sink(index: int, region: tuple[slice, ...], blended: torch.Tensor) -> None:
            labels(index, region, blended)
            if loss is not None:
                loss(index, region, blended)

        # on a CPU, the pass's freed activations go back to the system after each window batch
        after_batch = release_freed_memory if options["sw_device"].type == "cpu" else None
        stitch_windows(x, predictor=self, sink=sink, after_batch=after_batch, **options)
        return labels.labels[:, None], None if loss is None else loss.compute()

    # --- predict -------------------------------------------------------------------------------------------

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """One row per volume: its predicted ``label`` volume ``[1, D, H, W]`` on the preprocessed grid with that grid's
        ``affine`` and the file's own (``original_affine``, ``original_shape``), for the DataModule's
        ``write_prediction`` to write back in the input's space."""
        if self.hparams.output_probabilities:
            probabilities = self.sliding_window(batch["input"]).float().softmax(1)
            labels = probabilities.argmax(1, keepdim=True).clamp_(max=255).byte().cpu()  # [B, 1, D, H, W]
            for i, path in enumerate(batch["path"]):
                write_probabilities(self.predict_output_dir, Path(path), probabilities[i], batch["affine"][i])
            del probabilities
        else:
            labels = self.sliding_window_labels(batch["input"])[0].cpu()  # [B, 1, D, H, W] uint8, as the file stores
        affine, original_affine = batch["affine"].cpu(), batch["original_affine"].cpu()
        rows = [
            {
                "index": index, "path": batch["path"][i], "label": labels[i], "affine": affine[i],
                "original_affine": original_affine[i], "original_shape": batch["original_shape"][i].tolist(),
            }
            for i, index in enumerate(batch["index"].tolist())
        ]
        if self.hparams.save_token_maps:
            self._write_token_maps(batch["input"], rows)
        return rows

    def _write_token_maps(self, x: torch.Tensor, rows: list[dict[str, Any]]) -> None:
        """The encoder's token maps over the window of ``roi_size`` at the centre of each volume (``save_token_maps``),
        one PNG per row, named in ``token_map``."""
        from engine.token_maps import volume_token_map_image, write_row_token_maps

        volumes = x.flatten(0, 1)  # [B * C, D, H, W]: MONAI's transforms take channels first
        window = CenterSpatialCrop(self.roi_size)(SpatialPad(self.roi_size, method="symmetric")(volumes))
        window = window.as_subclass(torch.Tensor).reshape(*x.shape[:2], *self.roi_size)  # a plain tensor, not MONAI's
        self.backbone(window)  # the maps are those of the last forward pass
        out_dir = Path(self.predict_output_dir) / "token_maps"
        write_row_token_maps(window, self.backbone.token_maps(window), rows, out_dir, volume_token_map_image,
                             stem=lambda path: nifti_stem(Path(path)))


def nifti_stem(source: Path) -> str:
    """The file name without ``.nii`` or ``.nii.gz``."""
    return source.name.removesuffix(".gz").removesuffix(".nii")


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (AttributeError, OSError):
        return None


_MALLOC_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Give the heap memory freed since the last call back to the OS (glibc's ``malloc_trim``; nothing on other C
    libraries). Run after each CPU window batch of ``sliding_window_labels``: the model's freed activations otherwise
    stay resident beside the regions still being stitched, ~0.08 GiB per UNETR-Base window on top of the pass's
    peak."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def write_probabilities(output_dir: Path, source: Path, probabilities: torch.Tensor, affine: torch.Tensor) -> Path:
    """Write class probabilities ``[C, D, H, W]`` as ``<source name>_probabilities.nii.gz`` (float32, classes on the
    4th axis) on the grid of ``affine``, atomically."""
    data = probabilities.float().cpu().permute(1, 2, 3, 0).numpy()  # [D, H, W, C]: NIfTI keeps space first
    img = nib.Nifti1Image(np.ascontiguousarray(data), np.asarray(affine.cpu(), dtype=np.float64))
    img.set_sform(img.affine, code=1)
    img.set_qform(img.affine, code=1)
    payload = gzip.compress(img.to_bytes(), compresslevel=1)
    path = Path(output_dir) / f"{nifti_stem(source)}_probabilities.nii.gz"
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(payload))


class MedicalCLI(TaskCLI):
    """The task CLI, with the data's input channels (1 for CT, one per MRI sequence) and its training crop
    size (the sliding window's ROI) linked into the model as well."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments("data.in_channels", "model.in_channels", apply_on="instantiate")
        parser.link_arguments("data.roi_size", "model.sw_roi_size")


def main(args: Any = None) -> TaskCLI:
    """``python -m tasks.<task>``; returns the CLI, its trainer and model after the subcommand ran."""
    from datamodules.medical import MedicalDataModule

    return run_cli(MedicalSegmentationModule, MedicalDataModule, args=args, cli_class=MedicalCLI)


if __name__ == "__main__":
    main()
