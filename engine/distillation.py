"""Knowledge distillation: a frozen teacher owned by the task module, and the distillation losses of DeiT.

The teacher is held outside the module tree (``FrozenTeacher`` is not an ``nn.Module``), so it is never in a
checkpoint's state dict, never in the optimizer, and never seen by DDP's gradient synchronisation; only its name
and file are hyperparameters. It runs in eval mode, under ``torch.no_grad``, on the student's (augmented) input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from backbones import create_backbone
from backbones.base import PoolType
from backbones.weights import detect_format, load_pretrained, read_checkpoint
from heads.classification import Classifier, classification_head
from ops import CpuKernels, use_cpu_kernels

DistillationKind = Literal["none", "soft", "kl", "hard"]


class FrozenTeacher:
    """A teacher network that always runs frozen: eval mode, no gradients, moved to the input's device on use.

    Args:
        network: maps a batch of inputs to logits ``[B, num_classes]``.
    """

    def __init__(self, network: nn.Module) -> None:
        network.requires_grad_(False)
        self.network = network.eval()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._ready(x)(x).float()

    @torch.no_grad()
    def forward_with_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and final tokens ``[B, prefix + N, C]`` (token distillation, DynamicViT); the network must have
        ``forward_with_tokens``, as a ``Classifier`` over one of our token backbones does."""
        logits, tokens = self._ready(x).forward_with_tokens(x)
        return logits.float(), tokens.float()

    def _ready(self, x: torch.Tensor) -> nn.Module:
        self.network.eval()  # whatever train() calls reached it
        param = next(self.network.parameters(), None)
        if param is not None and param.device != x.device:
            self.network.to(x.device)
        return self.network

    def state_fingerprint(self) -> dict[str, torch.Tensor]:
        """A copy of the teacher's weights (tests check that training leaves them untouched)."""
        return {k: v.detach().clone() for k, v in self.network.state_dict().items()}


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, kind: DistillationKind, temperature: float = 1.0
) -> torch.Tensor:
    """DeiT's distillation terms on logits ``[B, K]``.

    ``soft``: KL divergence between the tempered distributions, ``KL(p_t || p_s) * tau²`` summed and divided
    by the number of logits (DeiT's normalisation); ``kl``: the same summed over classes and averaged over the
    batch (DynamicViT's, ``num_classes`` times ``soft``); ``hard``: cross-entropy with the teacher's argmax as label.
    """
    if kind == "hard":
        return F.cross_entropy(student, teacher.argmax(dim=-1))
    if kind in ("soft", "kl"):
        t = temperature
        kl = F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1), reduction="sum", log_target=True)
        return kl * (t * t) / (student.numel() if kind == "soft" else student.shape[0])
    raise ValueError(f"distillation must be 'soft', 'kl' or 'hard' for a loss, got {kind!r}")


def token_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """DynamicViT's token distillation: mean squared error between the student's and the teacher's final patch
    tokens ``[B, N, C]`` over the tokens the student kept (``keep`` ``[B, N]``, > 0.5; ``None``: all); zero when
    it kept none."""
    if student.shape != teacher.shape:
        raise ValueError(f"token distillation needs tokens of one shape, got student {tuple(student.shape)} and teacher {tuple(teacher.shape)}")
    if keep is None:
        return F.mse_loss(student, teacher)
    kept = keep.detach() > 0.5
    if not kept.any():
        return student.new_zeros(())
    return F.mse_loss(student[kept], teacher[kept])


def saved_pool(path: str | None) -> PoolType | None:
    """The ``pool`` a Lightning checkpoint of ours was trained with (its ``hyper_parameters``); ``None`` for other
    files (state dicts, safetensors, npz, Hub names) and runs that left it to the backbone's default."""
    file = Path(path) if path else None
    if file is None or not file.is_file() or file.suffix in (".safetensors", ".npz"):
        return None
    try:  # mapped: only the pickle is read, the tensors (read_checkpoint already has them) stay on disk
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a file in torch's legacy (non-zip) format cannot be mapped
        obj = torch.load(file, map_location="cpu", weights_only=True)
    hparams = obj.get("hyper_parameters") if isinstance(obj, dict) else None
    return hparams.get("pool") if isinstance(hparams, dict) else None


def build_teacher(
    name: str, *, num_classes: int, pretrained: str | None, kwargs: dict[str, Any] | None, pool: PoolType | None = None,
    cpu_kernels: CpuKernels = "off",
) -> FrozenTeacher:
    """The teacher network: a ``Classifier`` over one of our backbones (any file ``load_pretrained`` reads, our
    checkpoints included), or for ``timm:<name>`` with a timm file the whole timm model with its classifier.
    Ours pools by ``pool``, else as its checkpoint was trained (``saved_pool``), else by the backbone's default:
    a head trained on averaged tokens gives other logits on the class token (the dense ViT-S of
    ``configs/vit_small_patch16.yaml``: val top-1 0.95 by ``avg``, 0.74 by ``cls``). Its linear layers run as the
    student's ``cpu_kernels`` says, so one policy holds for the whole run."""
    state = read_checkpoint(pretrained) if pretrained else None
    ours = state is not None and detect_format(state).name == "vision-suite"
    if name.startswith("timm:") and not ours:
        import timm

        network: nn.Module = timm.create_model(name.removeprefix("timm:"), num_classes=num_classes, **(kwargs or {}))
        if state is not None:
            try:
                network.load_state_dict(state)
            except RuntimeError as err:
                raise ValueError(f"teacher checkpoint {pretrained} does not fit timm model {name!r}: {err}") from err
    else:
        backbone = create_backbone(name, **(kwargs or {}))
        network = Classifier(backbone, classification_head(backbone, num_classes, pool or (saved_pool(pretrained) if ours else None)))
        if pretrained:
            load_pretrained(network, pretrained, state=state)
    if not pretrained:
        rank_zero_warn(f"the teacher {name!r} has no teacher_pretrained file: it distils its random initial weights")
    return FrozenTeacher(use_cpu_kernels(network, cpu_kernels))  # the student's switch: one policy for the run
