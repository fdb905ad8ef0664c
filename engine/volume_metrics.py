"""Per-class Dice and HD95 over whole volumes (MONAI's functions) as torchmetrics, with missed structures
counted as failures.

For every volume and foreground class: both ground truth and prediction empty -> not counted (nothing to
find, nothing found); one of them empty (a structure missed entirely, or one predicted that is not
there) -> Dice 0 and HD95 = the diagonal of the volume in mm (the worst distance possible inside it);
otherwise MONAI's Dice and 95th-percentile Hausdorff distance in mm. A class's score is the mean over the
volumes where it counts; the reported mean is the mean over classes (macro average), so a class the model
never finds pulls the mean down instead of dropping out of it.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat

MetricKind = Literal["dice", "hd95"]
NOT_COUNTED = -1.0  # not NaN: torchmetrics compares states with allclose to form compute groups


def volume_scores(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    spacing: torch.Tensor | None = None,
    *,
    percentile: float = 95.0,
    with_hd: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice and HD (mm) of each foreground class in each volume: two ``[B, num_classes - 1]`` tensors,
    ``NOT_COUNTED`` (-1) where neither the ground truth nor the prediction holds the class.

    Args:
        pred, target: label volumes ``[B, D, H, W]`` (or ``[B, 1, D, H, W]``).
        spacing: voxel size per volume ``[B, 3]`` in mm; ``None`` measures in voxels.
        with_hd: compute HD too (the costly part); ``False`` leaves it ``NOT_COUNTED``.
    """
    pred, target = pred.reshape(pred.shape[0], *pred.shape[-3:]), target.reshape(target.shape[0], *target.shape[-3:])
    batch = pred.shape[0]
    dice = torch.full((batch, num_classes - 1), NOT_COUNTED)
    hd = torch.full((batch, num_classes - 1), NOT_COUNTED)
    for b in range(batch):
        step = [1.0, 1.0, 1.0] if spacing is None else [float(s) for s in spacing[b]]
        diagonal = float(sum((n * s) ** 2 for n, s in zip(pred.shape[-3:], step)) ** 0.5)
        for c in range(1, num_classes):
            box = class_box(pred[b], target[b], c)
            if box is None:  # in neither
                continue
            p = (pred[b][box] == c)[None, None].float()  # [1, 1, *box]: one class and its box at a time bounds memory
            t = (target[b][box] == c)[None, None].float()
            if not (bool(p.any()) and bool(t.any())):
                dice[b, c - 1], hd[b, c - 1] = 0.0, diagonal
                continue
            dice[b, c - 1] = compute_dice(p, t, include_background=True).item()
            if with_hd:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    hd[b, c - 1] = compute_hausdorff_distance(
                        p, t, include_background=True, percentile=percentile, spacing=step
                    ).item()
    return dice, hd


def class_box(pred: torch.Tensor, target: torch.Tensor, c: int) -> tuple[slice, ...] | None:
    """The bounding box of class ``c`` in either label volume ``[D, H, W]``, one voxel wider on each side within the
    volume (``None`` if neither holds it). Dice and MONAI's HD on that box equal those on the whole volume: MONAI
    crops to the same box (margin 1, zeros past the volume's border) before finding edges, and Dice counts voxels,
    so the full-size float copies of each class are never made."""
    union = (pred == c).logical_or_(target == c)
    box = []
    for axis in range(union.ndim):
        hits = union.any(dim=[d for d in range(union.ndim) if d != axis]).nonzero()
        if hits.numel() == 0:
            return None
        box.append(slice(max(int(hits[0]) - 1, 0), min(int(hits[-1]) + 2, union.shape[axis])))
    return tuple(box)


class VolumeMetric(Metric):
    """One number from per-volume Dice/HD scores: a class's mean, or the mean over classes.

    Every instance keeps the same states, so a ``MetricCollection`` of them (one per class and kind) puts
    them in one compute group and scores each volume once.

    Args:
        num_classes: including background.
        kind: ``dice`` or ``hd95`` (the Hausdorff percentile is ``percentile``).
        class_index: the foreground class reported; ``None`` reports the mean over classes.
        percentile: Hausdorff percentile.
        with_hd: compute distances at all (``False`` for cheap training-time Dice).
    """

    full_state_update = False

    def __init__(
        self,
        num_classes: int,
        *,
        kind: MetricKind = "dice",
        class_index: int | None = None,
        percentile: float = 95.0,
        with_hd: bool = True,
    ) -> None:
        super().__init__()
        if class_index is not None and not 1 <= class_index < num_classes:
            raise ValueError(f"class_index must be a foreground class in [1, {num_classes}), got {class_index}")
        self.num_classes, self.kind, self.class_index = num_classes, kind, class_index
        self.percentile, self.with_hd = percentile, with_hd
        self.add_state("dice", default=[], dist_reduce_fx="cat")
        self.add_state("hd", default=[], dist_reduce_fx="cat")

    def update(self, pred: torch.Tensor, target: torch.Tensor, spacing: torch.Tensor | None = None) -> None:
        dice, hd = volume_scores(
            pred.detach().cpu(), target.detach().cpu(), self.num_classes,
            None if spacing is None else spacing.cpu(), percentile=self.percentile, with_hd=self.with_hd,
        )
        self.dice.append(dice.to(self.device))
        self.hd.append(hd.to(self.device))

    def per_class(self) -> torch.Tensor:
        """``[num_classes - 1]`` means over the volumes where each class counts (NaN: never counted)."""
        scores = dim_zero_cat(self.dice if self.kind == "dice" else self.hd).reshape(-1, self.num_classes - 1)
        return torch.where(scores == NOT_COUNTED, torch.nan, scores).nanmean(0)

    def compute(self) -> torch.Tensor:
        if len(self.dice) == 0:  # a list here, but one tensor once synchronised across processes
            return torch.tensor(float("nan"))
        per_class = self.per_class()
        return per_class[self.class_index - 1] if self.class_index is not None else per_class.nanmean()


def metric_suffixes(num_classes: int, class_names: Sequence[str] | None = None) -> list[str]:
    """The foreground classes' names as metric-key suffixes (``liver``, ``left_kidney``); their indices
    (``1``, ``2``, ...) without names, or where names are missing, repeated or would clash once cleaned."""
    if class_names is None or len(class_names) != num_classes:
        return [str(c) for c in range(1, num_classes)]
    cleaned = [re.sub(r"[^0-9a-zA-Z]+", "_", str(n)).strip("_").lower() for n in class_names[1:]]
    return cleaned if all(cleaned) and len(set(cleaned)) == len(cleaned) else [str(c) for c in range(1, num_classes)]


def volume_metrics(
    num_classes: int, *, percentile: float = 95.0, per_class: bool = True, class_names: Sequence[str] | None = None
) -> MetricCollection:
    """``dice`` and ``hd95`` (means over classes) and, with ``per_class``, ``dice_<class>``/``hd95_<class>``
    named by ``metric_suffixes``."""
    metrics: dict[str, Metric] = {}
    for kind in ("dice", "hd95"):
        metrics[kind] = VolumeMetric(num_classes, kind=kind, percentile=percentile)
        if per_class:
            for c, suffix in enumerate(metric_suffixes(num_classes, class_names), start=1):
                metrics[f"{kind}_{suffix}"] = VolumeMetric(num_classes, kind=kind, class_index=c, percentile=percentile)
    # one group given up front: found by torchmetrics instead, the first batch would be scored once per metric (28
    # times for 14 classes, a whole validation of one volume)
    return MetricCollection(metrics, compute_groups=[list(metrics)])
