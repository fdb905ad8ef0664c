"""What each task draws at every validation (``pictures.ValidationPictures`` logs it), from the validation step's
own outputs: a fixed few samples kept on rank 0, and for the class tasks a confusion matrix over the whole set.

- classification: the confusion matrix (torchmetrics' plot) and misclassified images with true/predicted names;
- video: per-class accuracy and a strip of frames of misclassified clips;
- segmentation: the same few validation images each time, ground truth and prediction blended over them in the
  data's palette;
- medical: axial, coronal and sagittal slices through each volume's largest structure, ground truth (solid) and
  prediction (dashed) contours per class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassConfusionMatrix

from .pictures import PictureMaker, display_image, new_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Palette = Sequence[tuple[int, int, int]]


def first_view(x: torch.Tensor, sample_dims: int) -> torch.Tensor:
    """Drop a view axis (multi-view video ``[V, C, T, H, W]``) from one sample, keeping the first view."""
    return x[0] if x.ndim > sample_dims else x


class ClassificationPictures(PictureMaker):
    """The confusion matrix of the whole validation set (all processes), and up to ``max_images`` misclassified
    images with their true and predicted class names.

    Args:
        class_names: one name per class.
        max_images: misclassified samples kept (rank 0's first ones).
        max_matrix_classes: above this many classes the matrix shows the classes with the most errors.
    """

    sample_dims = 3  # [C, H, W]

    def __init__(self, class_names: Sequence[str], *, max_images: int = 16, max_matrix_classes: int = 30) -> None:
        self.names = list(class_names)
        self.max_images, self.max_matrix_classes = max_images, max_matrix_classes
        self.confusion = MulticlassConfusionMatrix(len(self.names), validate_args=False)
        self.matrix: torch.Tensor | None = None
        self.kept: list[tuple[torch.Tensor, int, int, float]] = []  # sample, true, predicted, its probability

    def reset(self, device: torch.device) -> None:
        self.confusion = self.confusion.to(device)
        self.confusion.reset()
        self.matrix, self.kept = None, []

    def update(self, batch: dict[str, Any], output: torch.Tensor, *, keep: bool) -> None:
        target, predicted = batch["target"], output.argmax(-1)
        self.confusion.update(predicted, target)
        room = self.max_images - len(self.kept)
        if not keep or room <= 0:
            return
        wrong = (predicted != target).nonzero().flatten()[:room].tolist()
        probs = output.float().softmax(-1)  # of log-probabilities too (multi-view video): the probabilities again
        for i in wrong:
            sample = first_view(batch["input"][i], self.sample_dims).detach().float().cpu()
            self.kept.append((sample, int(target[i]), int(predicted[i]), float(probs[i, predicted[i]])))

    def compute(self) -> None:
        self.matrix = self.confusion.compute().cpu()

    def figures(self) -> dict[str, Figure]:
        figures = {"val/confusion_matrix": self.confusion_figure()}
        if self.kept:
            figures["val/misclassified"] = self.misclassified_figure()
        return figures

    def most_confused(self) -> list[int]:
        """All classes, or the ``max_matrix_classes`` with the most errors (missed plus wrongly predicted)."""
        matrix = self.matrix
        if len(self.names) <= self.max_matrix_classes:
            return list(range(len(self.names)))
        errors = matrix.sum(0) + matrix.sum(1) - 2 * matrix.diag()
        return sorted(errors.topk(self.max_matrix_classes).indices.tolist())

    def confusion_figure(self) -> Figure:
        classes = self.most_confused()
        n = len(classes)
        figure = new_figure(3 + 0.45 * n, 2.5 + 0.45 * n)
        ax = figure.subplots()
        matrix = self.matrix[classes][:, classes]
        self.confusion.plot(matrix, ax=ax, add_text=n <= 12, labels=[self.names[c] for c in classes])
        shown = "" if n == len(self.names) else f" ({n} most confused of {len(self.names)} classes)"
        ax.set_title(f"validation confusion matrix{shown}", fontsize=11)
        return figure

    def misclassified_figure(self) -> Figure:
        cols = min(4, len(self.kept))
        rows = math.ceil(len(self.kept) / cols)
        figure = new_figure(2.6 * cols, 2.8 * rows)
        axes = np.atleast_1d(figure.subplots(rows, cols, squeeze=False).ravel())
        for ax, (sample, true, predicted, prob) in zip(axes, self.kept):
            ax.imshow(display_image(sample))
            ax.set_title(f"true {self.names[true]}\npredicted {self.names[predicted]} ({prob:.2f})", fontsize=8)
        for ax in axes:
            ax.set_axis_off()
        return figure


class VideoPictures(ClassificationPictures):
    """Per-class accuracy of the whole validation set (the lowest ``max_matrix_classes`` when there are more) and
    frames of up to ``max_images`` misclassified clips, one clip per row."""

    sample_dims = 4  # [C, T, H, W]

    def __init__(self, class_names: Sequence[str], *, max_images: int = 4, max_frames: int = 8, max_matrix_classes: int = 30) -> None:
        super().__init__(class_names, max_images=max_images, max_matrix_classes=max_matrix_classes)
        self.max_frames = max_frames

    def figures(self) -> dict[str, Figure]:
        figures = {"val/per_class_accuracy": self.accuracy_figure()}
        if self.kept:
            figures["val/misclassified_clips"] = self.clips_figure()
        return figures

    def accuracy_figure(self) -> Figure:
        matrix = self.matrix.double()
        seen = matrix.sum(1)
        accuracy = (matrix.diag() / seen.clamp_min(1)).tolist()
        classes = [c for c in range(len(self.names)) if seen[c] > 0]
        classes = sorted(classes, key=lambda c: accuracy[c])[: self.max_matrix_classes]
        figure = new_figure(7, 1.2 + 0.3 * max(1, len(classes)))
        ax = figure.subplots()
        ax.barh(range(len(classes)), [accuracy[c] for c in classes], color="tab:blue")
        ax.set_yticks(range(len(classes)), [self.names[c] for c in classes], fontsize=8)
        ax.invert_yaxis()  # lowest first, at the top
        ax.set(xlim=(0, 1), xlabel="accuracy")
        shown = "" if len(classes) == len(self.names) else f" (the {len(classes)} lowest of {len(self.names)} classes)"
        ax.set_title(f"validation accuracy per class{shown}", fontsize=11)
        return figure

    def clips_figure(self) -> Figure:
        frames = min(self.max_frames, self.kept[0][0].shape[1])
        figure = new_figure(1.6 * frames, 2.0 * len(self.kept))
        for panel, (clip, true, predicted, prob) in zip(figure.subfigures(len(self.kept), 1, squeeze=False)[:, 0], self.kept):
            panel.suptitle(f"true {self.names[true]}, predicted {self.names[predicted]} ({prob:.2f})", fontsize=9)
            picks = np.linspace(0, clip.shape[1] - 1, frames).round().astype(int)
            for t, ax in zip(picks, panel.subplots(1, frames, squeeze=False)[0]):
                ax.imshow(display_image(clip[:, t]))
                ax.set_title(f"frame {t}", fontsize=7)
                ax.set_axis_off()
        return figure


def blend(image: np.ndarray, label: np.ndarray, palette: np.ndarray, ignore_index: int | None = None) -> np.ndarray:
    """The label map's colours blended half and half over ``image`` ([H, W, 3] in 0..1); ignored pixels show the image."""
    colours = palette[np.minimum(label, len(palette) - 1)] / 255.0
    mixed = 0.5 * image + 0.5 * colours
    return mixed if ignore_index is None else np.where((label == ignore_index)[..., None], image, mixed)


def class_legend(figure: Figure, names: Sequence[str], classes: Sequence[int], palette: np.ndarray, limit: int = 20) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=palette[c % len(palette)] / 255.0, label=names[c]) for c in sorted(classes)[:limit]]
    if handles:
        figure.legend(handles=handles, loc="outside lower center", ncols=min(6, len(handles)), fontsize=8)


class SegmentationPictures(PictureMaker):
    """The first ``max_images`` validation images of rank 0, the same ones at every validation: the image, the
    ground truth and the prediction blended over it in the data's palette, at the label map's size.

    Args:
        class_names: one name per class.
        palette: RGB colour per class (``datamodules.label_maps``).
        ignore_index: label shown as the bare image.
        align_corners: of the upsampling of logits to the label size (the model's own).
        max_images: images shown.
        max_side: longest displayed side in pixels (larger maps are subsampled for the picture only).
    """

    def __init__(
        self, class_names: Sequence[str], palette: Palette, *, ignore_index: int, align_corners: bool = False,
        max_images: int = 4, max_side: int = 384,
    ) -> None:
        self.names, self.palette = list(class_names), np.asarray(palette, dtype=np.float64)
        self.ignore_index, self.align_corners = ignore_index, align_corners
        self.max_images, self.max_side = max_images, max_side
        self.kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # image, ground truth, prediction

    def reset(self, device: torch.device) -> None:
        self.kept = []

    def update(self, batch: dict[str, Any], output: torch.Tensor, *, keep: bool) -> None:
        for i in range(min(output.shape[0], self.max_images - len(self.kept)) if keep else 0):
            target = batch["target"][i]  # [H, W] at the label's size, which the image may not have
            size = tuple(target.shape)
            logits = output[i : i + 1]
            if tuple(logits.shape[2:]) != size:
                logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=self.align_corners)
            image = F.interpolate(batch["input"][i : i + 1].float(), size=size, mode="bilinear", align_corners=False)[0]
            step = math.ceil(max(size) / self.max_side)
            self.kept.append((
                display_image(image[:, ::step, ::step]),
                target[::step, ::step].cpu().numpy(),
                logits[0].argmax(0)[::step, ::step].cpu().numpy(),
            ))

    def figures(self) -> dict[str, Figure]:
        if not self.kept:
            return {}
        height, width = self.kept[0][1].shape
        scale = 3.2 / max(height, width)
        figure = new_figure(3 * width * scale + 0.5, len(self.kept) * (height * scale + 0.4) + 0.6)
        axes = figure.subplots(len(self.kept), 3, squeeze=False)
        present: set[int] = set()
        for row, (image, truth, predicted) in zip(axes, self.kept):
            present |= {int(c) for c in np.unique(truth) if c != self.ignore_index} | {int(c) for c in np.unique(predicted)}
            shown = (image, blend(image, truth, self.palette, self.ignore_index), blend(image, predicted, self.palette))
            for ax, picture, title in zip(row, shown, ("image", "ground truth", "prediction")):
                ax.imshow(picture)
                ax.set_title(title, fontsize=9)
                ax.set_axis_off()
        class_legend(figure, self.names, [c for c in present if c < len(self.names)], self.palette)
        return {"val/segmentation": figure}


VIEWS = (("axial", 2), ("coronal", 1), ("sagittal", 0))  # name, the axis held fixed in a RAS-ordered [X, Y, Z] volume


class MedicalPictures(PictureMaker):
    """For each of the first ``max_volumes`` validation volumes of rank 0: axial, coronal and sagittal slices through
    its largest structure (each where that structure's cross-section is largest), ground truth contours solid and
    prediction contours dashed, one colour per class.

    Args:
        class_names: one name per class, background first.
        palette: RGB colour per class.
        max_volumes: volumes shown.
    """

    def __init__(self, class_names: Sequence[str], palette: Palette, *, max_volumes: int = 4) -> None:
        self.names, self.palette = list(class_names), np.asarray(palette, dtype=np.float64)
        self.max_volumes = max_volumes
        self.kept: list[dict[str, Any]] = []

    def reset(self, device: torch.device) -> None:
        self.kept = []

    def update(self, batch: dict[str, Any], output: torch.Tensor, *, keep: bool) -> None:
        for b in range(min(output.shape[0], self.max_volumes - len(self.kept)) if keep else 0):
            truth = batch["target"][b, 0].to(output.device)  # [X, Y, Z]
            # whole-volume evaluation gives labels [B, 1, X, Y, Z]; logits [B, K, X, Y, Z] otherwise
            predicted = output[b].argmax(0) if output.is_floating_point() else output[b, 0]
            counts = torch.bincount(truth.flatten(), minlength=len(self.names))[1:]
            largest = int(counts.argmax()) + 1 if counts.sum() > 0 else None
            spacing = batch["spacing"][b].tolist() if "spacing" in batch else [1.0, 1.0, 1.0]
            slices = []
            for name, axis in VIEWS:
                if largest is None:
                    index = truth.shape[axis] // 2
                else:
                    others = tuple(d for d in range(3) if d != axis)
                    index = int((truth == largest).sum(others).argmax())
                pick = [slice(None)] * 3
                pick[axis] = index
                p, q = (d for d in range(3) if d != axis)
                slices.append({
                    "title": f"{name} {'xyz'[axis]}={index}", "aspect": spacing[q] / spacing[p],
                    "image": batch["input"][b, 0][tuple(pick)].float().cpu().numpy(),
                    "truth": truth[tuple(pick)].cpu().numpy(), "predicted": predicted[tuple(pick)].cpu().numpy(),
                })
            structure = self.names[largest] if largest is not None else "no structure"
            self.kept.append({"name": f"{Path(str(batch['path'][b])).name}: largest {structure}", "slices": slices})

    def figures(self) -> dict[str, Figure]:
        if not self.kept:
            return {}
        figure = new_figure(10, 3.5 * len(self.kept) + 0.8)
        figure.suptitle("ground truth solid, prediction dashed", fontsize=10)
        present: set[int] = set()
        for panel, volume in zip(figure.subfigures(len(self.kept), 1, squeeze=False)[:, 0], self.kept):
            panel.suptitle(volume["name"], fontsize=9)
            for ax, view in zip(panel.subplots(1, 3), volume["slices"]):
                present |= self.draw_slice(ax, view)
                ax.set_title(view["title"], fontsize=9)
        class_legend(figure, self.names, sorted(present), self.palette)
        return {"val/slices": figure}

    def draw_slice(self, ax: Axes, view: dict[str, Any]) -> set[int]:
        """The slice in grey (anterior or superior up), contours of every class in it; returns the classes drawn."""
        image = np.rot90(view["image"])
        lo, hi = np.percentile(image, (1, 99))
        ax.imshow(image, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6), aspect=view["aspect"])
        drawn: set[int] = set()
        for label, style in ((view["truth"], "solid"), (view["predicted"], "dashed")):
            label = np.rot90(label)
            for c in np.unique(label).tolist():
                mask = label == c
                if c == 0 or c >= len(self.names) or mask.all():
                    continue
                ax.contour(mask.astype(np.float32), levels=[0.5], colors=[self.palette[c % len(self.palette)] / 255.0],
                           linewidths=1.2, linestyles=style)
                drawn.add(int(c))
        ax.set_axis_off()
        return drawn
