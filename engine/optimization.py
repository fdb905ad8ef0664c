"""The optimisation recipe: parameter groups, optimizers and learning-rate schedules of every task."""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

OptimizerName = Literal["adamw", "sgd", "adafactor", "adafactor_bv"]
ScheduleName = Literal["cosine", "linear", "poly", "step", "constant", "rsqrt"]


NamedParameters = Iterable[tuple[str, nn.Parameter]]


def parameter_groups(
    parts: Iterable[tuple[str, nn.Module | NamedParameters, float, float]], no_decay_names: set[str] = frozenset()
) -> list[dict[str, Any]]:
    """One pair of groups per ``(name, module, lr, weight_decay)`` part (``module`` may also be ``(name, parameter)``
    pairs, a module's share): decayed weights and undecayed norms/biases/embeddings (1-D tensors,
    ``no_decay_names`` of the backbone, ``pos_embed``, ``cls_token``). Frozen parameters are left out."""
    groups: list[dict[str, Any]] = []
    for part, module, lr, wd in parts:
        decay, no_decay = [], []
        for name, param in module.named_parameters() if isinstance(module, nn.Module) else module:
            if not param.requires_grad:
                continue
            skip = param.ndim <= 1 or name in no_decay_names or name.endswith(("pos_embed", "cls_token"))
            (no_decay if skip else decay).append(param)
        for params, weight_decay, suffix in ((decay, wd, ""), (no_decay, 0.0, "_no_decay")):
            if params:
                groups.append({"params": params, "lr": lr, "weight_decay": weight_decay, "name": part + suffix})
    if not groups:
        raise ValueError("no trainable parameters (is freeze_backbone set on a model without a head?)")
    return groups


def drop_frozen_gradients(optimizer: torch.optim.Optimizer, epoch: int) -> None:
    """Hold the groups marked ``frozen_epochs`` fixed before that epoch: their gradients are dropped, so the
    optimizer skips them (no update, no weight decay, no moment statistics) whatever the schedule's lr."""
    for group in optimizer.param_groups:
        if epoch < group.get("frozen_epochs", 0):
            for param in group["params"]:
                param.grad = None


def build_optimizer(
    name: OptimizerName, groups: list[dict[str, Any]], *, lr: float, momentum: float, betas: tuple[float, float]
) -> torch.optim.Optimizer:
    """``adafactor_bv`` is big_vision's Adafactor (Zhai et al., 2022) through timm: factored second moment for
    weights whose two largest dimensions are at least 32, beta2 ``min(0.999, 1 - t^-0.8)``, momentum ``momentum``
    kept in bfloat16, no parameter-relative step size. Its weight decay is decoupled and follows the schedule:
    ``p -= lr_t * weight_decay * p``, which is big_vision's ``wd`` (given as ``weight_decay * lr``) times its
    schedule multiplier."""
    if name == "adafactor_bv":
        from timm.optim import AdafactorBigVision

        return AdafactorBigVision(
            groups, lr=lr, min_dim_size_to_factor=32, decay_rate=0.8, beta2_cap=0.999,
            momentum=momentum, momentum_dtype=torch.bfloat16, unscaled_wd=False,
        )
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    return torch.optim.Adafactor(groups, lr=lr)


def build_schedule(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_steps: int,
    schedule: ScheduleName,
    warmup_start_ratio: float = 1e-3,
    min_lr_ratio: float = 0.0,
    poly_power: float = 1.0,
    milestones: list[int] | None = None,
    gamma: float = 0.1,
    timescale: int = 10_000,
    cooldown_steps: int = 0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup followed by one of torch's schedulers, stepped once per optimizer step. ``rsqrt`` is
    big_vision's in one function (``rsqrt_factor``): linear warmup, reciprocal square root with ``timescale``,
    and a linear cooldown to zero over the last ``cooldown_steps``."""
    from torch.optim import lr_scheduler as sch

    if schedule == "rsqrt":
        return sch.LambdaLR(
            optimizer, partial(rsqrt_factor, total_steps=total_steps, warmup_steps=warmup_steps, timescale=timescale,
                               cooldown_steps=cooldown_steps, warmup_start_ratio=warmup_start_ratio)
        )

    main_steps = max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        main: sch.LRScheduler = sch.LambdaLR(
            optimizer, lambda s: min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(s, main_steps) / main_steps))
        )
    elif schedule == "linear":
        main = sch.LinearLR(optimizer, start_factor=1.0, end_factor=max(min_lr_ratio, 0.0), total_iters=main_steps)
    elif schedule == "poly":
        main = sch.PolynomialLR(optimizer, total_iters=main_steps, power=poly_power)
    elif schedule == "step":
        main = sch.MultiStepLR(optimizer, milestones=[max(0, m - warmup_steps) for m in milestones or []], gamma=gamma)
    else:
        main = sch.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup_steps <= 0:
        return main
    warmup = sch.LinearLR(optimizer, start_factor=warmup_start_ratio, end_factor=1.0, total_iters=warmup_steps)
    return sch.SequentialLR(optimizer, [warmup, main], milestones=[warmup_steps])


def rsqrt_factor(
    step: int, *, total_steps: int, warmup_steps: int, timescale: int, cooldown_steps: int, warmup_start_ratio: float = 0.0
) -> float:
    """big_vision's ``rsqrt`` learning-rate multiplier at ``step`` (``create_learning_rate_schedule``, shift 0):
    ``1 / sqrt(1 + (step - warmup) / timescale)`` after warmup, times the linear warmup and cooldown ramps.
    The warmup starts at ``warmup_start_ratio`` (big_vision: 0)."""
    factor = 1.0 / math.sqrt(1.0 + (step - warmup_steps) / timescale) if step >= warmup_steps else 1.0
    if warmup_steps:
        factor *= min(1.0, warmup_start_ratio + (1.0 - warmup_start_ratio) * step / warmup_steps)
    if cooldown_steps:
        factor *= max(0.0, min(1.0, (total_steps - step) / cooldown_steps))
    return factor
