"""Convolution with its activation as one oneDNN call, for the CPU inference form of convolutional networks.

On a CPU a small convolution followed by GELU is bound by memory traffic: the activation reads and writes the
whole map again, and a depthwise convolution over an NCHW map runs oneDNN's slow planar kernel. oneDNN's
convolution takes the activation as a post-op and runs fastest on channels-last maps, so a fused network keeps
its maps channels-last and calls ``mkldnn::_convolution_pointwise`` (the kernel torch.compile's CPU backend
uses for the same fusion). Outside its domain (autograd, another device or dtype, no oneDNN) the plain
``act(conv(x))`` runs, so results agree to float rounding everywhere (the post-op GELU is the exact erf form).
"""

from __future__ import annotations

import torch
from torch import nn

# activation module -> (oneDNN post-op, its scalars, its algorithm)
_POST_OPS: dict[type[nn.Module], tuple[str, list, str]] = {nn.Identity: ("none", [], ""), nn.ReLU: ("relu", [], "")}


def post_op(act: nn.Module) -> tuple[str, list, str] | None:
    """oneDNN's post-op for ``act``, or None where it has none (GELU only in its exact erf form)."""
    if isinstance(act, nn.GELU):
        return ("gelu", [], "none") if act.approximate == "none" else None
    return _POST_OPS.get(type(act))


def onednn_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the fused oneDNN kernel applies: fp32 CPU tensors, no autograd, oneDNN built and enabled."""
    return (
        x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    )


def conv_act(conv: nn.Conv2d, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(conv(x))``, as one oneDNN convolution with a post-op where it applies."""
    op = post_op(act)
    if op is None or conv.padding_mode != "zeros" or isinstance(conv.padding, str) or not onednn_usable(x, conv.weight):
        return act(conv(x))
    attr, scalars, algorithm = op
    return torch.ops.mkldnn._convolution_pointwise(
        x, conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
        attr, scalars, algorithm,
    )


def to_channels_last(module: nn.Module) -> nn.Module:
    """Keep ``module``'s 4-D convolution weights channels-last (oneDNN's fast layout for them); in place."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    return module


def channels_last_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the channels-last layout when the fused CPU kernels will take it, else as it is."""
    if x.ndim == 4 and onednn_usable(x, x):
        return x.contiguous(memory_format=torch.channels_last)
    return x


__all__ = ["channels_last_input", "conv_act", "onednn_usable", "post_op", "to_channels_last"]
