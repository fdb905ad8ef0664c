"""Linear layers whose matrix products run in oneDNN instead of the BLAS behind ``F.linear``, forward and backward.

PyTorch's x86 wheels do CPU fp32 matrix products in MKL, which on AMD processors takes its generic AVX2 code path
(MKL dispatches on the vendor): on this project's AMD EPYC (AVX-512) one thread reaches ~105 GFLOP/s in
``F.linear``, while oneDNN, which PyTorch also ships and which dispatches on the instruction set, reaches
215-245 GFLOP/s on ViT-B's shapes (216 tokens x 768/2304/3072), as it already does in the convolutions. The
backward's two products (``G @ W`` and ``G^T @ X``) are taken by the same kernel on transposed views (no copies).
On Intel processors MKL takes its AVX-512 path and is as fast or faster, so the swap is off by default and chosen
by ``ops.kernels`` (``cpu_kernels``: ``on`` always, ``auto`` the faster per shape, timed once). Same function as
``nn.Linear`` (fp32 sums in another order); other devices and dtypes, autocast, compilers and exporters get
``F.linear`` whatever the switch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .kernels import CpuKernelModule, CpuKernels, check_cpu_kernels, eager_cpu, onednn_enabled, prefer_fast, timed_step

_LINEAR = "mkldnn::_linear_pointwise"


def _matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` for a 2-D ``x`` in oneDNN (any strides)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")  # checked: onednn_usable_for


class OneDnnLinearFunction(torch.autograd.Function):
    """``F.linear`` with each matrix product in oneDNN."""

    @staticmethod
    def forward(ctx: Any, x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # 2-D in and out: an output that is a view made inside the function could not be modified in place later
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        return _matmul(x2, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, weight = ctx.saved_tensors  # grad: [M, N], as the output
        gx = _matmul(grad, weight.t(), None) if ctx.needs_input_grad[0] else None  # G @ W
        gw = _matmul(grad.t(), x2.t(), None) if ctx.needs_input_grad[1] else None  # G^T @ X, [N, K]
        gb = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def onednn_usable_for(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``onednn_linear`` can run oneDNN on these tensors (``ops.kernels.eager_cpu``, oneDNN's linear built
    and enabled, shapes that fit)."""
    return (
        eager_cpu(x, weight)  # first: a compiler then reads nothing else (the checks below would break its graph)
        and x.dim() >= 2 and x.shape[-1] == weight.shape[1] and x.numel() > 0 and onednn_enabled(_LINEAR)
    )


def _fast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias is not None and bias.requires_grad):
        out = OneDnnLinearFunction.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    else:
        out = _matmul(x.reshape(-1, x.shape[-1]), weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  cpu_kernels: CpuKernels = "on") -> torch.Tensor:
    """``F.linear(x, weight, bias)``, in oneDNN where ``onednn_usable_for`` allows it and ``cpu_kernels`` chooses it
    (``ops.kernels.prefer_fast``)."""
    if cpu_kernels == "off" or not onednn_usable_for(x, weight):
        return F.linear(x, weight, bias)
    args = (x, weight, bias)
    if not prefer_fast(cpu_kernels, "linear", args, timed_step(F.linear, args), timed_step(_fast, args)):
        return F.linear(x, weight, bias)
    return _fast(x, weight, bias)


class OneDnnLinear(nn.Linear, CpuKernelModule):
    """``nn.Linear`` whose products run in oneDNN on a CPU as its ``cpu_kernels`` says (see the module docstring);
    same parameters and names.

    Args:
        in_features: input width.
        out_features: output width.
        bias: learn an additive bias.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.weight, self.bias, self.cpu_kernels)


def use_onednn_linears(module: nn.Module, cpu_kernels: CpuKernels = "on") -> nn.Module:
    """Swap, in place, every plain ``nn.Linear`` under ``module`` for a ``OneDnnLinear`` sharing its parameters, run
    as ``cpu_kernels`` says; ``off`` leaves them ``nn.Linear``."""
    if check_cpu_kernels(cpu_kernels) == "off":
        return module
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            fast = OneDnnLinear.__new__(OneDnnLinear)
            fast.__dict__.update(child.__dict__)  # the same parameters, hooks and flags: only the forward changes
            fast.cpu_kernels = cpu_kernels
            setattr(module, name, fast)
        else:
            use_onednn_linears(child, cpu_kernels)
    return module


__all__ = ["OneDnnLinear", "OneDnnLinearFunction", "onednn_linear", "onednn_usable_for", "use_onednn_linears"]
