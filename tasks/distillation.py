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

DistillationKind = Literal["none", "soft", "hard"]


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
        self.network.eval()  # whatever train() calls reached it
        param = next(self.network.parameters(), None)
        if param is not None and param.device != x.device:
            self.network.to(x.device)
        return self.network(x).float()

    def state_fingerprint(self) -> dict[str, torch.Tensor]:
        """A copy of the teacher's weights (tests check that training leaves them untouched)."""
        return {k: v.detach().clone() for k, v in self.network.state_dict().items()}


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, kind: DistillationKind, temperature: float = 1.0
) -> torch.Tensor:
    """DeiT's distillation terms on logits ``[B, K]``.

    ``soft``: KL divergence between the tempered distributions, ``KL(p_t || p_s) * tau²`` summed and divided
    by the number of logits (DeiT's normalisation); ``hard``: cross-entropy with the teacher's argmax as label.
    """
    if kind == "hard":
        return F.cross_entropy(student, teacher.argmax(dim=-1))
    if kind == "soft":
        t = temperature
        kl = F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1), reduction="sum", log_target=True)
        return kl * (t * t) / student.numel()
    raise ValueError(f"distillation must be 'soft' or 'hard' for a loss, got {kind!r}")
