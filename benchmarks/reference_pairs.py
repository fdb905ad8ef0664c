"""Each task's model and its reference implementation with the same weights (ours loaded from the reference's own
file through ``pretrained=``), and the check that a mixed-precision step of ours equals the reference's.

Used by ``tests/test_reference_steps.py`` (tiny models, CPU and GPU) and ``benchmarks/gpu.py`` (the paper sizes on a
GPU). ``scale="tiny"``: toy sizes; ``scale="full"``: ViT-B/16 224², SegFormer-B0 512², UNETR-Base 96³, TimeSformer-B
8x224². Each builder returns ``(reference, run_reference, ours, x)``: the reference module, how to call it on our
input layout, our ``TaskModule`` and one input batch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

Scale = Literal["tiny", "full"]
Pair = tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor], torch.nn.Module, torch.Tensor]


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Weights moved off their initial values (zero biases, unit norms), so a mix-up of tensors shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


# each builder imports its task and reference library itself: a run that needs one pair loads one stack


def vit_pair(tmp_path: Path, scale: Scale = "tiny", batch: int = 2) -> Pair:
    import timm

    from tasks.classification import ClassificationModule

    if scale == "tiny":
        reference = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=5)
        ours_kwargs = {"backbone": "vit_tiny_patch16", "backbone_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2},
                       "num_classes": 5}
        size = 32
    else:
        reference, size = timm.create_model("vit_base_patch16_224", num_classes=1000), 224
        ours_kwargs = {"backbone": "vit_base_patch16", "num_classes": 1000}
    reference = perturbed(reference)
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    ours = ClassificationModule(**ours_kwargs, pretrained=str(tmp_path / "timm.pth"))
    return reference, reference, ours, torch.randn(batch, 3, size, size)


def segformer_pair(tmp_path: Path, scale: Scale = "tiny", batch: int = 2) -> Pair:
    import segmentation_models_pytorch as smp

    from tasks.segmentation import SegmentationModule

    classes, size = (4, 64) if scale == "tiny" else (19, 512)
    reference = perturbed(smp.Segformer(encoder_name="mit_b0", encoder_weights=None, classes=classes))
    torch.save(reference.state_dict(), tmp_path / "smp.pth")
    ours = SegmentationModule(backbone="mit_b0", num_classes=classes, pretrained=str(tmp_path / "smp.pth"),
                              align_corners=True)
    return reference, reference, ours, torch.randn(batch, 3, size, size)


def unetr_pair(tmp_path: Path, scale: Scale = "tiny", batch: int = 1) -> Pair:
    from monai.networks.nets import UNETR

    from tasks.medical import MedicalSegmentationModule

    if scale == "tiny":
        size, classes, feature_size, width, mlp, heads = 32, 3, 4, 32, 64, 2
        kwargs = {"img_size": 32, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2.0}
    else:
        size, classes, feature_size, width, mlp, heads = 96, 14, 16, 768, 3072, 12
        kwargs = {"img_size": 96}
    reference = perturbed(UNETR(
        in_channels=1, out_channels=classes, img_size=(size,) * 3, feature_size=feature_size, hidden_size=width,
        mlp_dim=mlp, num_heads=heads, proj_type="perceptron", norm_name="instance", res_block=True,
    ))
    torch.save(reference.state_dict(), tmp_path / "unetr.pt")
    ours = MedicalSegmentationModule(
        backbone="unetr_vit_base", num_classes=classes, feature_size=feature_size,
        pretrained=str(tmp_path / "unetr.pt"), backbone_kwargs=kwargs,
    )
    return reference, reference, ours, torch.randn(batch, 1, size, size, size)


def timesformer_pair(tmp_path: Path, scale: Scale = "tiny", batch: int = 2) -> Pair:
    import transformers

    from tasks.video import VideoClassificationModule

    if scale == "tiny":
        config = transformers.TimesformerConfig(
            image_size=32, patch_size=8, num_frames=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, num_labels=5,
        )
        ours_kwargs = {"backbone": "timesformer_nano_patch8", "num_classes": 5, "backbone_kwargs": {
            "num_frames": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}}
    else:  # the defaults are TimeSformer-B: 224², patch 16, 8 frames, width 768, 12 blocks, divided attention
        config = transformers.TimesformerConfig(num_labels=400)
        ours_kwargs = {"backbone": "timesformer_base_patch16", "num_classes": 400, "backbone_kwargs": {"num_frames": 8}}
    reference = perturbed(transformers.TimesformerForVideoClassification(config))
    reference.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours = VideoClassificationModule(**ours_kwargs, pretrained=str(tmp_path / "hf" / "model.safetensors"))

    def run(clip: torch.Tensor) -> torch.Tensor:  # transformers takes [B, T, C, H, W]
        return reference(pixel_values=clip.transpose(1, 2)).logits

    size = config.image_size
    return reference, run, ours, torch.randn(batch, 3, config.num_frames, size, size)


PAIRS: dict[str, Callable[..., Pair]] = {
    "vit_timm": vit_pair, "segformer_smp": segformer_pair, "unetr_monai": unetr_pair,
    "timesformer_hf": timesformer_pair,
}


def step(
    run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the input gradient of a cross-entropy against fixed labels (a training step's backward)."""
    x = x.clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = run(x)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    labels = torch.arange(logits.shape[1], device=x.device).roll(1)[: logits.shape[0]]
    if labels.shape[0] < logits.shape[0]:
        labels = labels.repeat(-(-logits.shape[0] // labels.shape[0]))[: logits.shape[0]]
    target = labels.view(-1, *[1] * (logits.ndim - 2)).expand(logits.shape[0], *logits.shape[2:])
    F.cross_entropy(logits, target).backward()
    return logits.detach(), x.grad


def check_against_reference(
    pair: Pair, device: str, dtype: torch.dtype, factor: float = 4.0, strict: bool = True
) -> list[dict[str, float | str]]:
    """Ours is at most ``factor`` times further than the reference from the exact result: in fp32 from the
    reference's float64 result (on the CPU), and under ``dtype`` autocast from the reference's fp32 result.
    Returns the comparisons (``case``, ``quantity``, ``error``, ``reference_error``, ``bound``); ``strict``: raise
    ``AssertionError`` naming the first one over its bound."""
    reference, run_reference, ours, x = pair
    reference.to(device).train(False)
    ours.to(device).train(False)  # dropout and drop path off; both sides see the same deterministic network
    x = x.to(device)
    fp32 = step(run_reference, x, None)
    found = []
    if device == "cpu":
        reference.double()
        truth = step(run_reference, x.double(), None)
        reference.float()
        found += compare("fp32", truth, fp32, step(ours, x, None), factor, torch.float32)
    found += compare(str(dtype), fp32, step(run_reference, x, dtype), step(ours, x, dtype), factor, dtype)
    for c in found if strict else ():
        assert c["error"] <= c["bound"], (
            f"{c['case']} {c['quantity']}: ours is {c['error']:.3g} from the exact result, the reference "
            f"{c['reference_error']:.3g}"
        )
    return found


def compare(case: str, truth: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...], got: tuple[torch.Tensor, ...],
            factor: float, dtype: torch.dtype) -> list[dict[str, float | str]]:
    found = []
    for name, t, r, g in zip(("logits", "input gradient"), truth, ref, got):
        t = t.double()
        own_error = (r.double() - t).abs().max().item()
        error = (g.double() - t).abs().max().item()
        bound = factor * own_error + 8 * torch.finfo(dtype).eps * t.abs().max().item()
        found.append({"case": case, "quantity": name, "error": error, "reference_error": own_error, "bound": bound})
    return found
