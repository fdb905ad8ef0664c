"""Hand-written CPU kernels, each behind ``ops.kernels`` (one switch, off by default) and a plain-PyTorch fallback;
the only package that calls private ``torch._C`` or ``torch.ops`` functions."""

from __future__ import annotations

from torch import nn

from .kernels import CPU_KERNELS, CpuKernels, check_cpu_kernels, set_cpu_kernels
from .onednn_linear import use_onednn_linears


def use_cpu_kernels(module: nn.Module, cpu_kernels: CpuKernels) -> nn.Module:
    """Run ``module``'s hand-written CPU kernels as ``cpu_kernels`` says, in place: its linear layers in oneDNN unless
    ``off`` (``use_onednn_linears``), and every module with kernels of its own (``ops.kernels.CpuKernelModule``) set
    to the switch. Parameters and their names do not change."""
    use_onednn_linears(module, check_cpu_kernels(cpu_kernels))
    return set_cpu_kernels(module, cpu_kernels)


__all__ = ["CPU_KERNELS", "CpuKernels", "use_cpu_kernels"]
