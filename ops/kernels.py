"""The one switch over the hand-written CPU kernels of ``ops/``: its values, where a kernel may run at all, and the
``auto`` choice between a kernel and plain PyTorch, timed once per process on the real shapes.

``off`` (the default): plain PyTorch everywhere. ``on``: each hand-written kernel wherever it applies. ``auto``: the
first call of a kernel on a new signature (its tensors' shapes, strides and dtypes, the thread count, whether autograd
records) times the plain path and the kernel, forward and, when autograd records, backward, and keeps the faster
for the rest of the process (``CHOICES``). Whatever the switch, tensors on other devices or dtypes, autocast,
compilers, tracers and exporters, and dispatch modes (FLOP counters) get plain PyTorch (``eager_cpu``), and a private
op this PyTorch build lacks is never called (``has_op``). The switch lives on the modules (``CpuKernelModule``), not
in a global: parameters, their names and checkpoints are the same whatever it says.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, get_args

import torch
from torch import nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

CpuKernels = Literal["off", "auto", "on"]
CPU_KERNELS: tuple[str, ...] = get_args(CpuKernels)

Path = Literal["plain", "fast"]
Timer = Callable[[Path, Callable[[], object]], float]
"""Seconds taken by one run of a path (``run`` runs it); ``set_timer`` replaces the clock (tests)."""

_Signature = tuple[Any, ...]
CHOICES: dict[_Signature, bool] = {}
"""``auto``'s table: (op, tensors' signature, threads, grad mode) -> whether the hand-written kernel was faster."""


def check_cpu_kernels(value: str) -> CpuKernels:
    """``value`` if it is a switch value, else a ``ValueError`` naming it."""
    if value not in CPU_KERNELS:
        raise ValueError(f"cpu_kernels must be one of {CPU_KERNELS}, got {value!r}")
    return value  # type: ignore[return-value]


class CpuKernelModule:
    """A module with hand-written CPU kernels, run as its ``cpu_kernels`` says: ``off`` unless its constructor,
    ``set_cpu_kernels`` or ``ops.use_cpu_kernels`` (a task's ``cpu_kernels`` argument) set it."""

    cpu_kernels: CpuKernels = "off"


def set_cpu_kernels(module: nn.Module, cpu_kernels: CpuKernels) -> nn.Module:
    """Set the switch of every ``CpuKernelModule`` under ``module`` (itself included); returns ``module``."""
    check_cpu_kernels(cpu_kernels)
    for m in module.modules():
        if isinstance(m, CpuKernelModule):
            m.cpu_kernels = cpu_kernels
    return module


def is_tracing() -> bool:
    """Whether a compiler or exporter (dynamo, ``torch.export``, TorchScript tracing for ONNX) is tracing the model."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()


def eager_cpu(*tensors: torch.Tensor | None) -> bool:
    """Whether a hand-written kernel may run on ``tensors``: eager mode (checked first, so that a compiler reads
    nothing else and traces the plain path without a graph break), fp32 CPU tensors, no autocast, no dispatch mode."""
    return (
        not is_tracing()
        and all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors)
        and not torch.is_autocast_enabled("cpu")
        and not is_in_torch_dispatch_mode()
    )


@functools.cache
def has_op(name: str) -> bool:
    """Whether this PyTorch build has the private op ``namespace::name`` or ``namespace::name.overload`` (oneDNN's
    only where PyTorch was built with it)."""
    namespace, _, op = name.partition("::")
    op, _, overload = op.partition(".")
    try:
        packet = getattr(getattr(torch.ops, namespace), op)
        if overload:
            getattr(packet, overload)
    except (AttributeError, RuntimeError):
        return False
    return namespace != "mkldnn" or torch.backends.mkldnn.is_available()


def onednn_enabled(*ops: str) -> bool:
    """Whether oneDNN is built, enabled now (``torch.backends.mkldnn.enabled``) and has each of ``ops``."""
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and all(has_op(op) for op in ops)


def _clock(path: Path, run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


_timer: Timer = _clock


def set_timer(timer: Timer | None) -> None:
    """Time ``auto``'s candidates with ``timer`` (``None``: the wall clock again); the table is cleared."""
    global _timer
    _timer = timer or _clock
    CHOICES.clear()


def signature(tensors: Iterable[torch.Tensor | None]) -> tuple[Any, ...]:
    """What ``auto`` tells shapes apart by: each tensor's shape, strides (its layout), dtype and whether it needs a
    gradient."""
    return tuple(
        None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.requires_grad) for t in tensors
    )


def prefer_fast(cpu_kernels: CpuKernels, op: str, tensors: Sequence[torch.Tensor | None], plain: Callable[[], object],
                fast: Callable[[], object]) -> bool:
    """Whether to run the hand-written kernel ``op`` on ``tensors`` (checked by the caller to be ``eager_cpu`` and
    within the kernel's domain): always with ``on``, never with ``off``; with ``auto``, the faster of the two runs
    ``plain`` and ``fast`` (each warmed up once, then timed interleaved, best of up to three), measured the first
    time this signature is seen and kept in ``CHOICES``. The runs must leave their inputs as they found them;
    ``timed_step`` makes one that also back-propagates."""
    if cpu_kernels != "auto":
        return cpu_kernels == "on"
    key = (op, signature(tensors), torch.get_num_threads(), torch.is_grad_enabled())
    choice = CHOICES.get(key)
    if choice is None:
        start = time.perf_counter()
        fast(), plain()  # first calls: oneDNN's primitives, weight reorders and the allocator's pages are made here
        repeats = 3 if time.perf_counter() - start < 0.05 else 1
        best = {"plain": float("inf"), "fast": float("inf")}
        for i in range(repeats):
            for path, run in (("plain", plain), ("fast", fast)) if i % 2 == 0 else (("fast", fast), ("plain", plain)):
                best[path] = min(best[path], _timer(path, run))
        choice = CHOICES[key] = best["fast"] < best["plain"]
    return choice


def timed_step(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor | None],
               params: Iterable[torch.Tensor] = ()) -> Callable[[], None]:
    """A run of ``fn(*inputs)`` for ``prefer_fast`` on detached copies of the inputs; when autograd records and
    anything needs a gradient, also the backward (``torch.autograd.grad``: no ``.grad`` is touched) to the inputs
    and to ``params`` (the module's parameters ``fn`` reads)."""
    params = [p for p in params if p is not None and p.requires_grad]

    def run() -> None:
        leaves = [None if t is None else t.detach().requires_grad_(t.requires_grad) for t in inputs]
        out = fn(*leaves)
        wrt = [t for t in leaves if t is not None and t.requires_grad] + params
        if torch.is_grad_enabled() and wrt and out.requires_grad:
            torch.autograd.grad(out, wrt, torch.ones_like(out), allow_unused=True)

    return run


def run_kernel(module: CpuKernelModule, op: str, inputs: tuple[torch.Tensor, ...], usable: bool,
               plain: Callable[..., torch.Tensor], fast: Callable[..., torch.Tensor]) -> torch.Tensor:
    """``fast(*inputs)``, the hand-written kernel ``op`` of ``module`` (an ``nn.Module``), where it is ``usable``
    (``eager_cpu`` and the kernel's own conditions) and ``module.cpu_kernels`` chooses it (``prefer_fast``: the
    signature includes the module's parameters, so layers of other widths are timed apart), else ``plain(*inputs)``."""
    if module.cpu_kernels == "off" or not usable:
        return plain(*inputs)
    if module.cpu_kernels == "on":
        return fast(*inputs)
    params = list(module.parameters())
    if prefer_fast(module.cpu_kernels, op, [*inputs, *params], timed_step(plain, inputs, params),
                   timed_step(fast, inputs, params)):
        return fast(*inputs)
    return plain(*inputs)


__all__ = [
    "CHOICES", "CPU_KERNELS", "CpuKernelModule", "CpuKernels", "check_cpu_kernels", "eager_cpu", "has_op", "is_tracing",
    "onednn_enabled", "prefer_fast", "run_kernel", "set_cpu_kernels", "set_timer", "signature", "timed_step",
]
