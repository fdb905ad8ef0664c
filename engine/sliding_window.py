"""Sliding-window inference that hands each finished region of the stitched output to a consumer, instead of
holding the whole ``[B, C, *spatial]`` output at once.

MONAI's ``sliding_window_inference`` stitches every window into one output tensor of the full size: for a
512x512x200 CT volume with 14 classes that is 2.7 GiB of fp32 logits (plus the count map), before a single label
is known (its ``buffer_steps`` option buffers windows on the model's device but still writes into that full
output). Here the windows are the same (MONAI's placement, importance map, padding and window batches), but the
output is split into *cells*: the boxes between consecutive window borders along every axis. A cell is blended
as MONAI blends (``sum(w * p) / sum(w)``, windows added in MONAI's order), and as soon as the last window covering
it is done it goes to the sink (``LabelSink`` writes its argmax into a ``uint8`` volume, ``DiceCESink`` adds it to
the validation loss) and is freed. Windows run slowest axis first, so what is alive at a time is about the
overlap of one row of windows with the next: labels equal to ``sliding_window_inference(...).argmax(1)`` bit for
bit, at a fraction of its memory.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices, get_valid_patch_size

Predictor = Callable[[torch.Tensor], torch.Tensor]


Region = tuple[slice, ...]


class RegionSink(Protocol):
    """Receives each finished region of the stitched output exactly once."""

    def __call__(self, index: int, region: Region, blended: torch.Tensor) -> None:
        """``blended`` is ``[C, *region]``: the window outputs over ``region`` (of batch item ``index``, in the
        input's coordinates), blended as MONAI blends them."""


def scan_interval(image_size: Sequence[int], roi_size: Sequence[int], overlap: Sequence[float]) -> tuple[int, ...]:
    """MONAI's window step per axis: ``int(roi * (1 - overlap))`` (at least 1), the whole ROI where it fills the axis."""
    return tuple(
        r if r == s else max(int(r * (1 - o)), 1) for s, r, o in zip(image_size, roi_size, overlap)
    )


def _axis_cells(starts: Sequence[int], roi: int, size: int) -> tuple[list[tuple[int, int]], list[range], list[int]]:
    """Along one axis: the cells (intervals between consecutive window borders), for each window start the range
    of cells it covers, and for each cell the number of window starts covering it."""
    borders = sorted({0, size, *starts, *(s + roi for s in starts)})
    cells = list(itertools.pairwise(borders))
    index = {a: i for i, (a, _) in enumerate(cells)}
    covers = [range(index[s], index[s] + sum(1 for a, b in cells if s <= a and b <= s + roi)) for s in starts]
    counts = [sum(1 for r in covers if i in r) for i in range(len(cells))]
    return cells, covers, counts


def stitch_windows(
    inputs: torch.Tensor,
    roi_size: Sequence[int],
    sw_batch_size: int,
    predictor: Predictor,
    sink: RegionSink,
    *,
    overlap: Sequence[float] | float = 0.25,
    mode: Literal["constant", "gaussian"] = "constant",
    sigma_scale: Sequence[float] | float = 0.125,
    cval: float = 0.0,
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
    after_batch: Callable[[], None] | None = None,
) -> None:
    """Run ``predictor`` over windows of ``inputs`` ``[B, C_in, *spatial]`` placed, weighted and batched as
    ``monai.inferers.sliding_window_inference`` places them (inputs smaller than the window are padded with
    ``cval`` on both sides, as MONAI's constant padding), and give each finished region to ``sink``.

    Args:
        inputs: the batch of images or volumes.
        roi_size: window size (a dimension larger than the input shrinks to it).
        sw_batch_size: windows per call of ``predictor``, counted over the whole batch as MONAI counts them.
        predictor: windows ``[n, C_in, *roi]`` -> outputs ``[n, C, *roi]``.
        sink: receives ``(batch index, region, blended [C, *region])``, each region once, in no fixed order.
        overlap, mode, sigma_scale: as MONAI (``gaussian`` weighs window centres over borders).
        cval: padding value.
        sw_device: where windows run (default: the input's device); ``device``: where cells are stitched.
        after_batch: called after each window batch's forward pass, before its output is stitched (a caller's
            memory policy, e.g. giving the pass's freed activations back to the system).
    """
    spatial = tuple(inputs.shape[2:])
    dims = len(spatial)
    roi = tuple(int(r) for r in roi_size)
    if len(roi) != dims:
        raise ValueError(f"roi_size {tuple(roi_size)} has {len(roi)} dimensions, the input {dims} spatial ones {spatial}")
    overlap = tuple(overlap) if isinstance(overlap, Sequence) else (float(overlap),) * dims
    sw_device = torch.device(sw_device) if sw_device is not None else inputs.device
    device = torch.device(device) if device is not None else inputs.device
    compute_dtype = inputs.dtype if inputs.dtype.is_floating_point else torch.float32

    # MONAI pads each axis shorter than the window by half the difference on either side
    pad_lo = [max(r - s, 0) // 2 for s, r in zip(spatial, roi)]
    pads = [p for lo, s, r in reversed(list(zip(pad_lo, spatial, roi))) for p in (lo, max(r - s, 0) - lo)]
    if any(pads):
        inputs = F.pad(inputs, pads, mode="constant", value=cval)
    image_size = tuple(inputs.shape[2:])
    patch = get_valid_patch_size(image_size, roi)
    windows = dense_patch_slices(image_size, patch, scan_interval(image_size, roi, overlap))  # slowest axis first
    weight = compute_importance_map(patch, mode=mode, sigma_scale=sigma_scale, device=sw_device, dtype=compute_dtype)
    weight = weight.to(device=sw_device, dtype=compute_dtype)[None, None]  # [1, 1, *patch]
    count_weight = weight.to(device)[0, 0]

    axes = [_axis_cells(sorted({w[d].start for w in windows}), patch[d], image_size[d]) for d in range(dims)]
    start_index = [{s: i for i, s in enumerate(sorted({w[d].start for w in windows}))} for d in range(dims)]
    covering = [  # per axis and cell: the window starts covering it, ascending
        [[s for s, r in zip(sorted(start_index[d]), axes[d][1]) if i in r] for i in range(len(axes[d][0]))]
        for d in range(dims)
    ]
    remaining: dict[tuple[int, ...], int] = {}
    acc: dict[tuple[int, ...], torch.Tensor] = {}

    def cell_box(cell: tuple[int, ...]) -> list[tuple[int, int]]:
        return [axes[d][0][cell[d]] for d in range(dims)]

    def cell_count(cell: tuple[int, ...]) -> torch.Tensor:
        """MONAI's count map over ``cell``: the weights of the windows covering it, added in MONAI's window order (so
        bit for bit), computed when the cell is done instead of kept alive beside its sum."""
        box = cell_box(cell)
        total = torch.zeros([e - a for a, e in box], dtype=compute_dtype, device=device)
        for starts in itertools.product(*(covering[d][cell[d]] for d in range(dims))):  # lexicographic: MONAI's order
            total += count_weight[tuple(slice(a - s, e - s) for s, (a, e) in zip(starts, box))]
        return total

    def finish(b: int, cell: tuple[int, ...]) -> None:
        blended = acc.pop((b, *cell)).div_(cell_count(cell))  # MONAI's ``output /= count_map``
        region, local = [], []
        for (a, e), lo, s in zip(cell_box(cell), pad_lo, spatial):  # back to the unpadded input's coordinates
            a0, e0 = max(a - lo, 0), min(e - lo, s)
            if a0 >= e0:
                return  # all padding
            region.append(slice(a0, e0))
            local.append(slice(a0 + lo - a, e0 + lo - a))
        sink(b, tuple(region), blended[(slice(None), *local)])

    total = len(windows) * inputs.shape[0]
    for first in range(0, total, sw_batch_size):
        batch = [(i // len(windows), windows[i % len(windows)]) for i in range(first, min(first + sw_batch_size, total))]
        window_inputs = torch.cat([inputs[(slice(b, b + 1), slice(None), *w)] for b, w in batch]).to(sw_device)
        out = predictor(window_inputs)
        if not isinstance(out, torch.Tensor) or tuple(out.shape[2:]) != patch:
            raise ValueError(
                f"stitch_windows needs the predictor to return one tensor [n, C, *{patch}] per window batch, "
                f"got {type(out).__name__} {tuple(getattr(out, 'shape', ()))}"
            )
        if after_batch is not None:
            after_batch()
        out *= weight  # as MONAI: weighted in place on the window device, then moved to the stitching device
        out = out.to(device)
        for (b, w), p in zip(batch, out):
            covered = [axes[d][1][start_index[d][w[d].start]] for d in range(dims)]
            for cell in itertools.product(*covered):
                key = (b, *cell)
                box = cell_box(cell)
                local = tuple(slice(a - w[d].start, e - w[d].start) for d, (a, e) in enumerate(box))
                if key not in acc:
                    acc[key] = torch.zeros([p.shape[0], *(e - a for a, e in box)], dtype=compute_dtype, device=device)
                    remaining[key] = math.prod(axes[d][2][cell[d]] for d in range(dims))
                acc[key] += p[(slice(None), *local)]
                remaining[key] -= 1
                if remaining[key] == 0:
                    del remaining[key]
                    finish(b, cell)


class LabelSink:
    """Writes the argmax over classes of each finished region into a label volume ``[B, *spatial]``.

    Args:
        shape: ``[B, *spatial]`` of the input.
        dtype: of the labels (``uint8`` holds 256 classes and takes a quarter of ``int32``'s memory).
        device: where the labels live.
        max_label: labels above it are clipped to it (a file type's largest value).
    """

    def __init__(
        self, shape: Sequence[int], *, dtype: torch.dtype = torch.uint8, device: torch.device | str = "cpu",
        max_label: int | None = None,
    ) -> None:
        self.labels = torch.zeros(tuple(shape), dtype=dtype, device=device)
        self.max_label = max_label

    def __call__(self, index: int, region: Region, blended: torch.Tensor) -> None:
        labels = blended.argmax(0)
        if self.max_label is not None:
            labels = labels.clamp_(max=self.max_label)
        self.labels[(index, *region)] = labels.to(self.labels.dtype)


class DiceCESink:
    """MONAI's ``DiceCELoss`` (softmax, one-hot target, background included) of the whole stitched output, summed
    region by region: the Dice terms' per-class sums and the cross-entropy's per-voxel sum, in float64, so the loss
    of a volume is known without its full logits (equal to the loss of the full output up to summation order).

    Args:
        loss: the ``DiceCELoss`` whose settings (``lambda_dice``, ``lambda_ce``, ``batch``, smoothing) are followed.
        target: labels ``[B, 1, *spatial]`` aligned with the stitched input.
        num_classes: output channels.
    """

    def __init__(self, loss: torch.nn.Module, target: torch.Tensor, num_classes: int) -> None:
        dice = loss.dice
        unsupported = {
            "sigmoid": dice.sigmoid, "other_act": dice.other_act is not None, "squared_pred": dice.squared_pred,
            "jaccard": dice.jaccard, "include_background=False": not dice.include_background,
            "class_weight": dice.class_weight is not None, "ignore_index": dice.ignore_index is not None,
            "ce weight": loss.cross_entropy.weight is not None, "label_smoothing": loss.cross_entropy.label_smoothing > 0,
        }
        if not (dice.softmax and dice.to_onehot_y) or any(unsupported.values()) or dice.reduction != "mean":
            raise ValueError(
                "DiceCESink follows DiceCELoss(softmax=True, to_onehot_y=True, reduction='mean') only; this loss sets "
                f"{[k for k, v in unsupported.items() if v] or 'another activation or reduction'}"
            )
        self.loss, self.target, self.num_classes = loss, target, num_classes
        shape = (target.shape[0], num_classes)
        self.tp, self.pred_sum, self.target_sum = (torch.zeros(shape, dtype=torch.float64) for _ in range(3))
        self.ce_sum = torch.zeros((), dtype=torch.float64)

    def __call__(self, index: int, region: Region, blended: torch.Tensor) -> None:
        logits = blended.float().flatten(1)  # [C, N]
        target = self.target[(index, 0, *region)].to(logits.device).flatten().long()  # [N]
        log_prob = torch.log_softmax(logits, 0)
        prob = log_prob.exp()
        onehot = F.one_hot(target, self.num_classes).T.to(prob.dtype)  # [C, N]
        self.tp[index] += (prob * onehot).sum(1, dtype=torch.float64).cpu()
        self.pred_sum[index] += prob.sum(1, dtype=torch.float64).cpu()
        self.target_sum[index] += onehot.sum(1, dtype=torch.float64).cpu()
        self.ce_sum += -log_prob.gather(0, target[None]).sum(dtype=torch.float64).cpu()

    def compute(self) -> torch.Tensor:
        """The loss of the whole batch, as ``DiceCELoss`` on the full output would give it."""
        dice, tp, denominator = self.loss.dice, self.tp, self.pred_sum + self.target_sum
        if dice.batch:
            tp, denominator = tp.sum(0), denominator.sum(0)
        dice_loss = (1 - (2 * tp + dice.smooth_nr) / (denominator + dice.smooth_dr)).mean()
        ce_loss = self.ce_sum / self.target[:, 0].numel()
        return (self.loss.lambda_dice * dice_loss + self.loss.lambda_ce * ce_loss).float()
