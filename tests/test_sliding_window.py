"""Region-wise stitching (``engine/sliding_window.py``) against MONAI's full stitching: the same blended output bit
for bit, so the same labels, Dice and HD95; the loss summed region by region equal to ``DiceCELoss`` on the full
logits; the medical and segmentation tasks' whole-image paths."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss

from tasks.medical import MedicalSegmentationModule
from engine.volume_metrics import volume_scores
from tasks.segmentation import SegmentationModule
from engine.sliding_window import DiceCESink, LabelSink, stitch_windows

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


class Canvas:
    """A sink that paints each region into a full output and counts how often each voxel is painted."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.out = torch.full(shape, float("nan"))
        self.times = torch.zeros((shape[0], *shape[2:]), dtype=torch.int64)

    def __call__(self, index: int, region: tuple[slice, ...], blended: torch.Tensor) -> None:
        self.out[(index, slice(None), *region)] = blended
        self.times[(index, *region)] += 1


@pytest.mark.parametrize(
    "shape, roi, overlap, mode, sw_batch_size",
    [
        ((2, 1, 23, 30, 17), (8, 12, 8), 0.25, "gaussian", 3),  # window batches straddle the two volumes
        ((1, 1, 7, 40, 9), (8, 16, 8), 0.5, "constant", 4),  # an axis shorter than the window: MONAI pads it
        ((1, 1, 19, 21, 18), (8, 8, 8), (0.6, 0.3, 0.5), "gaussian", 1),
        ((2, 3, 45, 61), (16, 20), 0.4, "constant", 5),  # 2-D
    ],
)
def test_regions_compose_monais_full_output(shape, roi, overlap, mode, sw_batch_size) -> None:
    torch.manual_seed(0)
    conv = (torch.nn.Conv2d if len(shape) == 4 else torch.nn.Conv3d)(shape[1], 6, 3, padding=1)
    x = torch.randn(shape)
    with torch.no_grad():
        full = sliding_window_inference(x, roi, sw_batch_size, conv, overlap=overlap, mode=mode)
        canvas, labels = Canvas(tuple(full.shape)), LabelSink((shape[0], *shape[2:]))
        stitch_windows(x, roi, sw_batch_size, conv, lambda *a: (canvas(*a), labels(*a)), overlap=overlap, mode=mode)
    assert (canvas.times == 1).all()  # every voxel handed over exactly once
    assert torch.equal(canvas.out, full)  # same windows, weights and summation order: bit for bit
    assert torch.equal(labels.labels, full.argmax(1).byte())


def test_streamed_dice_ce_equals_monais_loss_on_the_full_logits() -> None:
    torch.manual_seed(0)
    x, target = torch.randn(2, 1, 21, 19, 26), torch.randint(0, 4, (2, 1, 21, 19, 26))
    conv = torch.nn.Conv3d(1, 4, 3, padding=1)
    for batch in (False, True):
        loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=batch, lambda_dice=0.7, lambda_ce=1.3)
        with torch.no_grad():
            full = sliding_window_inference(x, (8, 8, 8), 4, conv, overlap=0.5, mode="gaussian")
            streamed = DiceCESink(loss, target, 4)
            stitch_windows(x, (8, 8, 8), 4, conv, streamed, overlap=0.5, mode="gaussian")
        torch.testing.assert_close(streamed.compute(), loss(full, target), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="squared_pred"):
        DiceCESink(DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True), target, 4)


def medical_module(**kwargs) -> MedicalSegmentationModule:
    vit = {"img_size": 16, "embed_dim": 32, "depth": 4, "num_heads": 2, "out_indices": [0, 1, 2, 3]}
    torch.manual_seed(0)
    return MedicalSegmentationModule(
        backbone="unetr_vit_base", backbone_kwargs=vit, num_classes=4, feature_size=4, sw_overlap=0.5, **kwargs
    ).eval()


def test_medical_evaluation_equals_full_stitching() -> None:
    """Labels, Dice, HD95 and loss of the region-wise evaluation equal those of MONAI's stitched logits, on a volume
    that is no multiple of the 16³ window."""
    module = medical_module(sw_batch_size=3)
    x = torch.randn(1, 1, 37, 29, 22)
    target = torch.randint(0, 4, (1, 1, 37, 29, 22))
    target[:, :, :10] = 0  # some structure-free space, as in a scan
    with torch.no_grad():
        logits = module.sliding_window(x)
        batch = module.prepare_batch({"input": x, "target": target}, "val")
        labels = module.forward_stage(batch["input"], "val")
        loss = module.compute_loss(labels, target)
    assert labels.dtype == torch.uint8 and labels.shape == (1, 1, 37, 29, 22)
    assert torch.equal(labels[:, 0], logits.argmax(1).byte())
    pred, tgt, _ = module.metric_inputs(labels, target)
    dice, hd = volume_scores(pred, tgt, 4)
    dice_full, hd_full = volume_scores(logits.argmax(1), target, 4)
    assert torch.equal(dice, dice_full) and torch.equal(hd, hd_full)
    torch.testing.assert_close(loss, module.loss(logits, target), atol=1e-6, rtol=1e-5)


def test_medical_predict_writes_probabilities_on_request(tmp_path) -> None:
    import nibabel as nib

    module = medical_module(output_probabilities=True)
    module.predict_output_dir = tmp_path
    x = torch.randn(1, 1, 20, 18, 17)
    batch = {
        "input": x, "index": torch.tensor([0]), "path": [str(tmp_path / "case.nii.gz")], "affine": torch.eye(4)[None],
        "original_affine": torch.eye(4)[None], "original_shape": torch.tensor([[20, 18, 17]]),
    }
    with torch.no_grad():
        soft = module.predict_step(batch, 0)[0]["label"]
        module.hparams.output_probabilities = False
        hard = module.predict_step(batch, 0)[0]["label"]
        probabilities = module.sliding_window(x).softmax(1)[0]
    assert torch.equal(soft, hard)
    written = nib.load(tmp_path / "case_probabilities.nii.gz")
    assert written.shape == (20, 18, 17, 4)
    torch.testing.assert_close(torch.from_numpy(written.get_fdata(dtype="float32")), probabilities.permute(1, 2, 3, 0))


def test_segmentation_predict_stitches_labels_band_by_band() -> None:
    torch.manual_seed(0)
    module = SegmentationModule(
        backbone="mit_b0", num_classes=5, decoder_dim=16, inference="slide", window_size=(32, 32),
        window_stride=(21, 21), sw_batch_size=2,
    ).eval()
    x = torch.randn(1, 3, 70, 53)
    batch = {"input": x, "index": torch.tensor([0]), "path": ["a.png"], "name": ["a"], "size": torch.tensor([[70, 53]])}
    with torch.no_grad():
        label = module.predict_step(batch, 0)[0]["label"]
        full = module.sliding_window(x).argmax(1)[0]
    assert label.dtype.name == "uint8" and torch.equal(torch.from_numpy(label).long(), full)


def test_windows_per_pass_auto_is_one_on_a_cpu() -> None:
    """``sw_batch_size: auto`` (the default and the UNETR configs') runs one window per pass where windows run on a CPU
    (batching gains ~6 % there, each extra window costs its decoder maps), MONAI's 4 on an accelerator."""
    module = medical_module()
    assert module.hparams.sw_batch_size == "auto"
    assert module.windows_per_pass(torch.device("cpu")) == 1 and module.windows_per_pass(torch.device("cuda")) == 4
    assert medical_module(sw_batch_size=3).windows_per_pass(torch.device("cpu")) == 3


def test_the_caller_sets_what_happens_after_each_window_batch(monkeypatch) -> None:
    """The stitcher has no memory policy of its own: it calls ``after_batch`` once per window batch. The medical
    task gives glibc's ``malloc_trim`` for windows on a CPU (its freed activations back to the system)."""
    import tasks.medical

    x = torch.randn(1, 1, 20, 18, 17)
    conv = torch.nn.Conv3d(1, 2, 3, padding=1)
    passes, after = [], []
    with torch.no_grad():
        stitch_windows(x, (8, 8, 8), 3, lambda w: passes.append(1) or conv(w), lambda *a: None,
                       after_batch=lambda: after.append(len(passes)))
    assert len(passes) > 1 and after == list(range(1, len(passes) + 1))

    trims = []
    monkeypatch.setattr(tasks.medical, "release_freed_memory", lambda: trims.append(1))
    module = medical_module(sw_batch_size=2)
    module.register_forward_hook(lambda *a: passes.append(1))
    passes.clear()
    with torch.no_grad():
        module.sliding_window_labels(x)
    assert len(passes) > 1 and len(trims) == len(passes)
