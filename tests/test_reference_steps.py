"""A training step of each task under mixed precision equals its reference implementation's, on the same weights
and input: the logits and the input gradient of the loss, within a multiple of the reference's own mixed-precision
error (its distance from its fp32 result), so the bound holds on any processor or GPU. The CPU runs bfloat16
autocast on tiny models; the ``gpu`` tier repeats the same step on CUDA in bf16 and fp16 (skipped without one)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tasks.classification import ClassificationModule
from tasks.medical import MedicalSegmentationModule
from tasks.segmentation import SegmentationModule
from tasks.video import VideoClassificationModule

Pair = tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor], torch.nn.Module, torch.Tensor]


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Weights moved off their initial values (zero biases, unit norms), so a mix-up of tensors shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


def vit_pair(tmp_path: Path) -> Pair:
    import timm

    reference = perturbed(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=5))
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    ours = ClassificationModule(
        backbone="vit_tiny_patch16", backbone_kwargs={"img_size": 32, "patch_size": 8, "depth": 2}, num_classes=5,
        pretrained=str(tmp_path / "timm.pth"),
    )
    return reference, reference, ours, torch.randn(2, 3, 32, 32)


def segformer_pair(tmp_path: Path) -> Pair:
    import segmentation_models_pytorch as smp

    reference = perturbed(smp.Segformer(encoder_name="mit_b0", encoder_weights=None, classes=4))
    torch.save(reference.state_dict(), tmp_path / "smp.pth")
    ours = SegmentationModule(backbone="mit_b0", num_classes=4, pretrained=str(tmp_path / "smp.pth"), align_corners=True)
    return reference, reference, ours, torch.randn(2, 3, 64, 64)


def unetr_pair(tmp_path: Path) -> Pair:
    from monai.networks.nets import UNETR

    reference = perturbed(UNETR(
        in_channels=1, out_channels=3, img_size=(32, 32, 32), feature_size=4, hidden_size=32, mlp_dim=64, num_heads=2,
        proj_type="perceptron", norm_name="instance", res_block=True,
    ))
    torch.save(reference.state_dict(), tmp_path / "unetr.pt")
    ours = MedicalSegmentationModule(
        backbone="unetr_vit_base", num_classes=3, feature_size=4, pretrained=str(tmp_path / "unetr.pt"),
        backbone_kwargs={"img_size": 32, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2.0},
    )
    return reference, reference, ours, torch.randn(1, 1, 32, 32, 32)


def timesformer_pair(tmp_path: Path) -> Pair:
    transformers = pytest.importorskip("transformers")
    config = transformers.TimesformerConfig(
        image_size=32, patch_size=8, num_frames=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=5,
    )
    reference = perturbed(transformers.TimesformerForVideoClassification(config))
    reference.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours = VideoClassificationModule(
        backbone="timesformer_nano_patch8", num_classes=5, pretrained=str(tmp_path / "hf" / "model.safetensors"),
        backbone_kwargs={"num_frames": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0},
    )
    run = lambda clip: reference(pixel_values=clip.transpose(1, 2)).logits  # noqa: E731  (takes [B, T, C, H, W])
    return reference, run, ours, torch.randn(2, 3, 4, 32, 32)


PAIRS = {"vit_timm": vit_pair, "segformer_smp": segformer_pair, "unetr_monai": unetr_pair, "timesformer_hf": timesformer_pair}


def step(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the input gradient of a cross-entropy against fixed labels (a training step's backward)."""
    x = x.clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = run(x)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    labels = torch.arange(logits.shape[1], device=x.device).roll(1)[: logits.shape[0]]
    target = labels.view(-1, *[1] * (logits.ndim - 2)).expand(logits.shape[0], *logits.shape[2:])
    F.cross_entropy(logits, target).backward()
    return logits.detach(), x.grad


def check_against_reference(pair: Pair, device: str, dtype: torch.dtype, factor: float = 4.0) -> None:
    """Ours is at most ``factor`` times further than the reference from the exact result: in fp32 from the
    reference's float64 result (on the CPU), and under ``dtype`` autocast from the reference's fp32 result."""
    reference, run_reference, ours, x = pair
    reference.to(device).train(False)
    ours.to(device).train(False)  # dropout and drop path off; both sides see the same deterministic network
    x = x.to(device)
    fp32 = step(run_reference, x, None)
    if device == "cpu":
        reference.double()
        truth = step(run_reference, x.double(), None)
        reference.float()
        compare("fp32", truth, fp32, step(ours, x, None), factor, torch.float32)
    compare(str(dtype), fp32, step(run_reference, x, dtype), step(ours, x, dtype), factor, dtype)


def compare(case: str, truth: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...], got: tuple[torch.Tensor, ...],
            factor: float, dtype: torch.dtype) -> None:
    for name, t, r, g in zip(("logits", "input gradient"), truth, ref, got):
        t = t.double()
        own_error = (r.double() - t).abs().max().item()
        error = (g.double() - t).abs().max().item()
        bound = factor * own_error + 8 * torch.finfo(dtype).eps * t.abs().max().item()
        assert error <= bound, f"{case} {name}: ours is {error:.3g} from the exact result, the reference {own_error:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_a_bfloat16_step_equals_the_reference_on_the_cpu(name: str, tmp_path: Path) -> None:
    check_against_reference(PAIRS[name](tmp_path), "cpu", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_a_mixed_precision_step_equals_the_reference_on_a_gpu(name: str, dtype: torch.dtype, tmp_path: Path) -> None:
    check_against_reference(PAIRS[name](tmp_path), "cuda", dtype)
