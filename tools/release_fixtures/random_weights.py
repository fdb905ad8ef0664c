"""Random weights for a release's tiny model, shared by the fixture writers of this folder: every parameter moved by
``scale`` times a normal draw, batch-norm statistics moved off their initial values too (so an eval-mode forward
depends on them), in the module's own order, after the caller's ``torch.manual_seed``."""

from __future__ import annotations

import torch
from torch import nn


def randomise(model: nn.Module, scale: float = 0.2) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.add_(torch.randn_like(b) * scale)
            elif name.endswith("running_var"):
                b.mul_(torch.rand_like(b) + 0.5)
