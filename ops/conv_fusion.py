"""Convolution with its activation as one oneDNN call, for the CPU inference form of convolutional networks.

On a CPU a small convolution followed by GELU is bound by memory traffic: the activation reads and writes the
whole map again, and a depthwise convolution over an NCHW map runs oneDNN's slow planar kernel. oneDNN's
convolution takes the activation as a post-op and runs fastest on channels-last maps, so a fused network keeps
its maps channels-last and calls ``mkldnn::_convolution_pointwise`` (the kernel torch.compile's CPU backend
uses for the same fusion), with its weight reordered once into oneDNN's blocked layout. It runs as ``cpu_kernels``
says (``ops.kernels``: off by default); outside its domain (autograd, another device or dtype, autocast, compilers,
no oneDNN) the plain ``act(conv(x))`` runs, so results agree to float rounding everywhere (the post-op GELU is the
exact erf form).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .kernels import CpuKernels, eager_cpu, onednn_enabled, prefer_fast, timed_step

CONV_OPS = (
    "mkldnn::_convolution_pointwise", "mkldnn::_convolution_pointwise.binary", "mkldnn::_convolution_pointwise_.binary",
    "mkldnn::_reorder_convolution_weight",
)
"""The private ops of this module (``ops.kernels.onednn_enabled`` checks them before any runs)."""

# convolution -> (the input shape and weight state it was made for, its weight in oneDNN's layout); see packed_weight
_PACKED: weakref.WeakKeyDictionary[nn.Conv2d, tuple[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()

# activation module -> (oneDNN post-op, its scalars, its algorithm)
_POST_OPS: dict[type[nn.Module], tuple[str, list, str]] = {nn.Identity: ("none", [], ""), nn.ReLU: ("relu", [], "")}


def post_op(act: nn.Module) -> tuple[str, list, str] | None:
    """oneDNN's post-op for ``act``, or None where it has none (GELU only in its exact erf form)."""
    if isinstance(act, nn.GELU):
        return ("gelu", [], "none") if act.approximate == "none" else None
    return _POST_OPS.get(type(act))


def onednn_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the fused oneDNN kernel applies: ``ops.kernels.eager_cpu``, no autograd, oneDNN and its ops here."""
    return (
        eager_cpu(x, weight) and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and onednn_enabled(*CONV_OPS)
    )


def conv_act(
    conv: nn.Conv2d, act: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None, *, inplace: bool = False,
    cpu_kernels: CpuKernels = "on",
) -> torch.Tensor:
    """``act(conv(x))``, or ``conv(x) + residual`` (``act`` then must be the identity), as one oneDNN convolution
    with a post-op where it applies and ``cpu_kernels`` chooses it: the residual is read as the convolution writes
    its output, instead of in a separate pass over three maps. ``inplace`` lets the result be written into
    ``residual`` (which the caller then no longer needs): no new map to allocate."""
    if residual is not None and not isinstance(act, nn.Identity):
        raise ValueError(f"a residual is added after the convolution, not after its activation {act}")
    op = post_op(act)
    usable = (
        cpu_kernels != "off" and op is not None and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
        and onednn_usable(x, conv.weight) and (residual is None or _same_layout(x, residual))
    )
    if not usable or cpu_kernels == "auto" and not prefer_fast(
        cpu_kernels, f"conv_act {op[0]} {conv.stride} {conv.padding} {conv.groups}", (x, residual, conv.weight),
        timed_step(lambda x, r: _plain(conv, act, x, r), (x, residual)),
        timed_step(lambda x, r: _fused(conv, op, x, r, inplace=False), (x, residual)),
    ):
        return _plain(conv, act, x, residual)
    return _fused(conv, op, x, residual, inplace=inplace)


def _plain(conv: nn.Conv2d, act: nn.Module, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    return act(conv(x)) if residual is None else conv(x) + residual


def _fused(conv: nn.Conv2d, op: tuple[str, list, str], x: torch.Tensor, residual: torch.Tensor | None,
           inplace: bool) -> torch.Tensor:
    """``conv_act``'s oneDNN call (its ops checked by ``onednn_usable``)."""
    args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    if residual is not None:
        if inplace:
            return torch.ops.mkldnn._convolution_pointwise_(
                residual, x, packed_weight(conv, x), conv.bias, *args, "add", 1.0, None, [], None
            )
        return torch.ops.mkldnn._convolution_pointwise(
            x, residual, packed_weight(conv, x), conv.bias, *args, "add", 1.0, None, [], None
        )
    return torch.ops.mkldnn._convolution_pointwise(x, packed_weight(conv, x), conv.bias, *args, *op)


def packed_weight(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv``'s weight reordered into oneDNN's blocked layout for channels-last inputs of ``x``'s shape, made on
    the first call and kept (one shape per convolution, renewed when the weight changes or the thread count); the
    plain weight otherwise. oneDNN reorders a plain weight on every call: a pass over all of a network's weights
    per forward, and most of the time of a small convolution. The kept copy doubles the convolutions' weight
    memory."""
    if not x.is_contiguous(memory_format=torch.channels_last):
        return conv.weight
    w = conv.weight
    key = (tuple(x.shape), torch.get_num_threads(), w.data_ptr(), version(w), tuple(w.shape))
    entry = _PACKED.get(conv)
    if entry is None or entry[0] != key:
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            w.detach(), list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, list(x.shape)
        )
        entry = _PACKED[conv] = (key, packed)
    return entry[1]


def forget_packed(module: nn.Module, *args: object) -> None:
    """Drop the packed weights of ``module``'s convolutions (a ``load_state_dict`` post-hook: weights loaded
    inside ``torch.inference_mode`` may leave their version counters as they were)."""
    for m in module.modules():
        _PACKED.pop(m, None)


def version(t: torch.Tensor) -> int | None:
    """``t``'s version counter (bumped by in-place changes); None for an inference tensor, which has none."""
    return None if t.is_inference() else t._version


def _same_layout(x: torch.Tensor, residual: torch.Tensor) -> bool:
    """Whether the residual has the dtype and memory layout of the convolution's output (that of ``x``)."""
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return residual.dtype == x.dtype and residual.is_contiguous(memory_format=fmt) and x.is_contiguous(memory_format=fmt)


def to_channels_last(module: nn.Module) -> nn.Module:
    """Keep ``module``'s 4-D convolution weights channels-last (oneDNN's fast layout for them); in place."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    return module


def channels_last_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the channels-last layout (the fused form's, fastest for CPU convolutions, plain or fused) for an
    fp32 CPU inference in eager mode, else as it is."""
    if x.ndim == 4 and eager_cpu(x) and not (torch.is_grad_enabled() and x.requires_grad):
        return x.contiguous(memory_format=torch.channels_last)
    return x


__all__ = [
    "channels_last_input", "conv_act", "forget_packed", "onednn_usable", "packed_weight", "post_op", "to_channels_last",
    "version",
]
