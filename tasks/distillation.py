"""Knowledge distillation: a frozen teacher owned by the task module, and the distillation losses of DeiT.

The teacher is held outside the module tree (``FrozenTeacher`` is not an ``nn.Module``), so it is never in a
checkpoint's state dict, never in the optimizer, and never seen by DDP's gradient synchronisation; only its name
and file are hyperparameters. It runs in eval mode, under ``torch.no_grad``, on the student's (augmented) input.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

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
