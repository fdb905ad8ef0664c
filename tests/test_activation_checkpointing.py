"""Activation checkpointing (``activation_checkpointing: true``): the same gradients as without it, dropout and drop
path included (the recomputation replays the random state), for every ViT-based model of the suite and MiT, with
intermediate outputs and token pruning; far fewer activations kept; a clear error where a backbone lacks it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from backbones import create_backbone
from tasks.classification import ClassificationModule
from tasks.medical import MedicalSegmentationModule
from tasks.segmentation import SegmentationModule
from tasks.video import VideoClassificationModule

pytestmark = pytest.mark.usefixtures("one_thread")

DROPS = {"drop_rate": 0.1, "attn_drop_rate": 0.1, "drop_path_rate": 0.3}
TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 48, "num_heads": 2, **DROPS}


def gradients(module: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], checkpointing: bool) -> dict[str, torch.Tensor]:
    """Parameter gradients of ``loss_fn(module)`` in training mode from a fixed random state."""
    backbone = module.backbone if hasattr(module, "backbone") else module
    backbone.set_activation_checkpointing(checkpointing)
    module.train().zero_grad(set_to_none=True)
    torch.manual_seed(7)
    loss_fn(module).backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_same_gradients(module: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> None:
    plain, checkpointed = gradients(module, loss_fn, False), gradients(module, loss_fn, True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 0.9 * len(list(module.parameters()))
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-6, msg=name)
    torch.manual_seed(8)  # dropout really draws: another random state gives other gradients
    module.zero_grad(set_to_none=True)
    loss_fn(module).backward()
    assert any(not torch.allclose(p.grad, plain[n]) for n, p in module.named_parameters() if p.grad is not None)


def test_vit_classification_and_intermediate_maps() -> None:
    module = ClassificationModule(backbone="vit_tiny_patch16", backbone_kwargs=TINY_VIT, num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    assert_same_gradients(module, lambda m: m(x).logsumexp(1).sum())
    vit = create_backbone("vit_tiny_patch16", **TINY_VIT, out_indices=(0, 2))
    assert_same_gradients(vit, lambda m: sum((f * f).mean() for f in m(x)))


@pytest.mark.parametrize("attention", ["divided", "joint"])
def test_timesformer(attention: str) -> None:
    kwargs = {"depth": 2, "embed_dim": 48, "num_heads": 2, "attention": attention, **DROPS}
    module = VideoClassificationModule(backbone="timesformer_nano_patch8", backbone_kwargs=kwargs, num_classes=3)
    x = torch.randn(2, 3, 4, 32, 32)  # 4 of the 8 frames: the temporal embedding is interpolated
    assert_same_gradients(module, lambda m: m(x).logsumexp(1).sum())


@pytest.mark.slow
def test_unetr_through_the_task_hyperparameter() -> None:
    vit = {"img_size": 32, "embed_dim": 48, "depth": 4, "num_heads": 2, "out_indices": [0, 1, 2, 3], **DROPS}
    module = MedicalSegmentationModule(backbone="unetr_vit_base", backbone_kwargs=vit, num_classes=3, feature_size=8,
                                       activation_checkpointing=True)
    assert module.backbone.activation_checkpointing
    x = torch.randn(1, 1, 32, 32, 32)
    assert_same_gradients(module, lambda m: m(x).logsumexp(1).mean())


def test_token_pruning_composes() -> None:
    """DynamicViT's Gumbel decisions are drawn between blocks, so the replayed random state keeps them too."""
    module = ClassificationModule(backbone="vit_tiny_patch16", backbone_kwargs={**TINY_VIT, "depth": 4}, num_classes=3,
                                  token_pruning=True, activation_checkpointing=True)
    x = torch.randn(2, 3, 32, 32)

    def loss(m: nn.Module) -> torch.Tensor:
        out = m(x).logsumexp(1).sum()
        return out + sum(t.value for t in m.backbone.pop_auxiliary_losses().values())

    assert_same_gradients(module, loss)


def test_mit_segformer() -> None:
    mit = {"embed_dims": (16, 32, 64, 128), "depths": (2, 1, 1, 1), "num_heads": (1, 1, 2, 4), "drop_path_rate": 0.3}
    module = SegmentationModule(backbone="mit_b0", backbone_kwargs=mit, decoder_dim=16, num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    assert_same_gradients(module, lambda m: m(x).logsumexp(1).mean())


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward pass during one forward pass."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum().backward()
    return total


def test_checkpointing_keeps_far_fewer_activations() -> None:
    vit = {"img_size": 64, "patch_size": 8, "depth": 6, "embed_dim": 48, "num_heads": 2}
    module = ClassificationModule(backbone="vit_tiny_patch16", backbone_kwargs=vit, num_classes=3).train()
    x = torch.randn(2, 3, 64, 64)
    plain = saved_bytes(module, x)
    module.backbone.set_activation_checkpointing(True)
    assert saved_bytes(module, x) < plain / 5  # only each block's input: 1 [B, N, C] tensor instead of ~20


def test_backbones_without_it_say_so() -> None:
    backbone = create_backbone("efficientformerv2_s0")
    assert not backbone.supports_activation_checkpointing
    backbone.set_activation_checkpointing(False)  # asking for nothing is fine
    with pytest.raises(TypeError, match="EfficientFormerV2 does not support activation checkpointing"):
        ClassificationModule(backbone="efficientformerv2_s0", num_classes=3, activation_checkpointing=True)
    assert create_backbone("vit_tiny_patch16", img_size=32).supports_activation_checkpointing
