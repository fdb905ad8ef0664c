"""MONAI's ``UnetResBlock`` with instance norms, on channels-last maps, as one autograd function.

UNETR's step on a CPU is bound by its full-resolution blocks (16-32 channels at 96³), and at those sizes every
map-sized buffer costs a pass over memory and, freshly allocated, its page faults. Taken as one function, the
block ``leaky(norm2(conv2(leaky(norm1(conv1(x))))) + norm3(conv3(x)))`` needs fewer of them than its layers do
one by one: each norm writes its output in one multiply-add (statistics first, in cached chunks), both branch norms
and the residual sum go into one buffer, and the backward takes the activation's gradient once for both branches,
runs the norms' backward in place, and adds the 1x1x1 projection's input gradient into the 3x3x3 convolution's
(one GEMM, no separate sum). The saved tensors are the layers' own (input, the convolutions' outputs, the block's
output) and the parameters, all through ``ctx.save_for_backward``, so an in-place change of a weight between forward
and backward is an error, as in autograd's own functions; the arithmetic is that of ``ops.norms3d`` (exact in fp32).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .norms3d import (
    InstanceNormAct, channels_first, mean_rstd, norm_backward, normalize_into, scale_shift, spatial_last,
)

ONEDNN_OPS = ("mkldnn::_convolution_pointwise_.binary",)
"""The private ops the fused block calls (``ops.kernels.onednn_enabled`` checks them before it runs)."""

Params = list[torch.Tensor | None]
"""A block's parameters in ``ResBlockFunction``'s order: the three convolutions' weights and biases, then the three
norms' (``None`` where absent)."""


def channels_last_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` restrided as channels-last where it has one channel (a no-op in memory), so that oneDNN writes its
    convolution's output channels-last too; other tensors unchanged."""
    if x.shape[1] == 1 and x.is_contiguous():
        _, _, d, h, w = x.shape
        return x.as_strided(x.shape, (d * h * w, 1, h * w, w, 1))
    return x


def _weight_parts(weight: torch.Tensor, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """A convolution's weight split along its input channels as ``xs`` (the parts of a concatenated input)."""
    return [weight] if len(xs) == 1 else list(weight.split([x.shape[1] for x in xs], 1))


def _empty(x: torch.Tensor, channels: int, spatial: list[int] | torch.Size | None = None) -> torch.Tensor:
    """An uninitialised channels-last map of ``x``'s batch and dtype, ``channels`` wide, ``x``'s size or ``spatial``."""
    shape = (x.shape[0], channels, *(x.shape[2:] if spatial is None else spatial))
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)


def conv_forward(conv: nn.Conv3d, xs: list[torch.Tensor], weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """``conv(torch.cat(xs, 1))`` with ``weight`` and ``bias`` (``conv``'s geometry), without autograd and without the
    concatenation, into a channels-last map: a 1x1x1 convolution as GEMMs over the ``[B, N, C]`` views, any other as
    oneDNN's kernel adding each part's convolution into the zeroed map (PyTorch would pick its slower native kernel
    for a 1-channel batch-1 input)."""
    ws = _weight_parts(weight, xs)
    if conv.kernel_size == (1, 1, 1):
        out = _empty(xs[0], conv.out_channels)
        ov = spatial_last(out).flatten(0, 1)  # [B*N, C_out], a view
        for i, (x, w) in enumerate(zip(xs, ws)):
            xv, wt = spatial_last(x).flatten(0, 1), w.flatten(1).T
            if i:
                ov.addmm_(xv, wt)
            elif bias is None:
                torch.mm(xv, wt, out=ov)
            else:
                torch.addmm(bias, xv, wt, out=ov)
        return out
    args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    out = _empty(xs[0], conv.out_channels, _conv_out_size(conv, xs[0])).zero_()
    for i, (x, w) in enumerate(zip(xs, ws)):
        torch.ops.mkldnn._convolution_pointwise_.binary(  # in ONEDNN_OPS
            out, channels_last_view(x), w.contiguous(), bias if i == 0 else None, *args, "add", None, None, [], None)
    return out


def _conv_out_size(conv: nn.Conv3d, x: torch.Tensor) -> list[int]:
    """The spatial size of ``conv(x)``."""
    return [
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, p, s, d in zip(x.shape[2:], conv.kernel_size, conv.padding, conv.stride, conv.dilation)
    ]


def conv_backward(conv: nn.Conv3d, weight: torch.Tensor, has_bias: bool, grad: torch.Tensor, xs: list[torch.Tensor],
                  input_grad: bool, accumulate: list[torch.Tensor | None] | None = None,
                  ) -> tuple[list[torch.Tensor | None], ...]:
    """Gradients of ``conv(torch.cat(xs, 1))`` with ``weight`` (``conv``'s geometry): for each part of the input (when
    ``input_grad``; added into ``accumulate``'s tensors where given), for the weight and for the bias."""
    ws, accumulate = _weight_parts(weight, xs), accumulate or [None] * len(xs)
    gxs: list[torch.Tensor | None] = []
    if conv.kernel_size == (1, 1, 1):
        g = spatial_last(grad).flatten(0, 1)  # [B*N, C_out]
        gw = torch.cat([torch.mm(g.T, spatial_last(x).flatten(0, 1)) for x in xs], 1).view_as(weight)
        gb = g.sum(0) if has_bias else None
        for x, w, acc in zip(xs, ws, accumulate):
            if not input_grad:
                gxs.append(None)
            elif acc is not None and spatial_last(acc).is_contiguous():
                spatial_last(acc).view(-1, x.shape[1]).addmm_(g, w.flatten(1))  # into it: no separate sum
                gxs.append(acc)
            else:
                gx = channels_first(torch.mm(g, w.flatten(1)).view(x.shape[0], -1, x.shape[1]), x)
                gxs.append(gx if acc is None else acc.add_(gx))
        return gxs, gw, gb
    if len(xs) == 1 and xs[0].shape[1] == 1 and not input_grad:
        gb = grad.sum((0, 2, 3, 4)) if has_bias else None
        return [None], single_channel_weight_grad(grad, xs[0], conv), gb
    gws, gb = [], None
    args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    flipped = input_grad and _same_size(conv)
    for i, (x, w, acc) in enumerate(zip(xs, ws, accumulate)):
        bias = i == 0 and has_bias
        gx = None
        if flipped:  # the input gradient as the convolution of ``grad`` with the flipped, transposed kernel (oneDNN's
            # backward-data arithmetic), added into ``acc`` or into a zeroed map
            into = acc if acc is not None and acc.is_contiguous(memory_format=torch.channels_last_3d) else None
            gx = _empty(x, x.shape[1]).zero_() if into is None else into
            torch.ops.mkldnn._convolution_pointwise_.binary(  # in ONEDNN_OPS
                gx, grad, w.flip(2, 3, 4).transpose(0, 1).contiguous(), None, *args, "add", None, None, [], None)
            gx = acc.add_(gx) if acc is not None and into is None else gx
        gx_aten, gw, gb_i = torch.ops.aten.convolution_backward(
            grad, channels_last_view(x), w.contiguous(), [conv.out_channels] if bias else None,
            list(conv.stride), list(conv.padding), list(conv.dilation), False, [0, 0, 0], conv.groups,
            [input_grad and not flipped, True, bias],
        )
        if gx_aten is not None:
            gx = acc.add_(gx_aten) if acc is not None else gx_aten
        gxs.append(gx)
        gws.append(gw)
        gb = gb_i if bias else gb
    return gxs, torch.cat(gws, 1) if len(gws) > 1 else gws[0], gb


def _same_size(conv: nn.Conv3d) -> bool:
    """A convolution of stride 1 without groups or dilation whose zero padding keeps the size (odd kernel)."""
    return (
        conv.stride == (1, 1, 1) and conv.dilation == (1, 1, 1) and conv.groups == 1
        and all(k % 2 == 1 and p == k // 2 for k, p in zip(conv.kernel_size, conv.padding))
    )


def single_channel_weight_grad(grad: torch.Tensor, x: torch.Tensor, conv: nn.Conv3d, depth: int = 8) -> torch.Tensor:
    """The weight gradient of a 'same' convolution of a 1-channel volume (UNETR's first layer) as GEMMs of the
    channels-last gradient with the input's patches, built a few depth slices at a time (cache-sized, no
    volume-sized im2col buffer: 2x faster than PyTorch's native batch-1 kernel at 96³). The patches are laid out
    one kernel offset per row, each row one copy of a shifted block of the volume (contiguous runs; the
    patch-per-row layout of ``unfold`` made it a gather 2.7x slower)."""
    k, p = conv.kernel_size, conv.padding
    taps, (d, h, w) = k[0] * k[1] * k[2], x.shape[2:]
    out = grad.new_zeros(conv.out_channels, taps)
    patches = x.new_empty(taps, min(depth, d), h, w)  # [kd kh kw, d, H, W]
    offsets = [(a, b, c) for a in range(k[0]) for b in range(k[1]) for c in range(k[2])]
    for g, v in zip(grad, x[:, 0]):
        gv = g.movedim(0, -1)  # [D, H, W, C_out], contiguous for a channels-last gradient
        padded = F.pad(v, (p[2], p[2], p[1], p[1], p[0], p[0]))
        for d0 in range(0, d, depth):
            d1 = min(d, d0 + depth)
            block = patches[:, : d1 - d0]
            for row, (a, b, c) in zip(block, offsets):
                row.copy_(padded[d0 + a : d1 + a, b : b + h, c : c + w])
            out.addmm_(gv[d0:d1].reshape(-1, conv.out_channels).T, block.reshape(taps, -1).T)
    return out.view_as(conv.weight)


def _norm_act(norm: InstanceNormAct, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
              inplace: bool) -> tuple[torch.Tensor, ...]:
    """The norm (with ``weight`` and ``bias``) and its activation of the channels-last map ``x`` (in place, or into a
    new map); returns the output and the statistics."""
    xv = spatial_last(x)
    mean, rstd = mean_rstd(xv, norm.eps)
    out = x if inplace else torch.empty_like(x)
    normalize_into(xv if inplace else spatial_last(out), xv, mean, rstd, weight, bias)
    if norm.negative_slope != 1.0:
        F.leaky_relu_(out, norm.negative_slope)
    return out, mean, rstd


def res_block_forward(block: nn.Module, xs: list[torch.Tensor], params: Params,
                      keep: bool) -> tuple[torch.Tensor, tuple[Any, ...]]:
    """The output of ``block`` (a ``FusedResBlock``, its geometry) with ``params`` (``_params(block)``'s order) on
    the channel concatenation of ``xs`` and, with ``keep``, what its backward needs; without, the convolutions'
    outputs are normalised in place (inference)."""
    w1, b1, w2, b2, w3, b3, g1, beta1, g2, beta2, g3, beta3 = params
    h1 = conv_forward(block.conv1.conv, xs, w1, b1)
    a1, mean1, rstd1 = _norm_act(block.norm1, h1, g1, beta1, inplace=not keep)
    h2 = conv_forward(block.conv2.conv, [a1], w2, b2)
    h2v = spatial_last(h2)
    mean2, rstd2 = mean_rstd(h2v, block.norm2.eps)
    scale2, shift2 = scale_shift(mean2, rstd2, g2, beta2)
    h3 = mean3 = rstd3 = None
    if hasattr(block, "conv3"):  # the projected residual's norm, added in the same multiply-add form
        h3 = conv_forward(block.conv3.conv, xs, w3, b3)
        h3v = spatial_last(h3)
        mean3, rstd3 = mean_rstd(h3v, block.norm3.eps)
        scale3, shift3 = scale_shift(mean3, rstd3, g3, beta3)
        shift2 = shift2 + shift3
    elif len(xs) > 1:
        raise ValueError("res_block_forward: an identity residual takes one input")
    out = torch.empty_like(h2) if keep else h2
    outv = spatial_last(out)
    torch.addcmul(shift2, h2v, scale2, out=outv)
    if h3 is None:
        outv.add_(spatial_last(xs[0]))
    else:
        outv.addcmul_(h3v, scale3)
    F.leaky_relu_(out, block.negative_slope)
    return out, (h1, a1, mean1, rstd1, h2, mean2, rstd2, h3, mean3, rstd3)


def _params(block: nn.Module) -> Params:
    """The tensors autograd routes gradients to, in ``ResBlockFunction``'s order."""
    convs = [block.conv1.conv, block.conv2.conv, *([block.conv3.conv] if hasattr(block, "conv3") else [None])]
    norms = [block.norm1, block.norm2, getattr(block, "norm3", None)]
    return [t for m in convs + norms for t in ((m.weight, m.bias) if m is not None else (None, None))]


class ResBlockFunction(torch.autograd.Function):
    """``FusedResBlock``'s forward on ``x`` (or on ``cat(x, skip)``) with ``params`` and a hand-written backward (see
    the module docstring); the block gives only its geometry (kernel sizes, eps, slopes)."""

    @staticmethod
    def forward(ctx: Any, block: nn.Module, x: torch.Tensor, skip: torch.Tensor | None,
                *params: torch.Tensor | None) -> torch.Tensor:
        out, saved = res_block_forward(block, [x] if skip is None else [x, skip], list(params), keep=True)
        ctx.block = block
        ctx.save_for_backward(x, skip, out, *saved, *params)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        block, need = ctx.block, ctx.needs_input_grad
        x, skip, out, h1, a1, mean1, rstd1, h2, mean2, rstd2, h3, mean3, rstd3, *params = ctx.saved_tensors
        w1, b1, w2, b2, w3, b3, g1, beta1, g2, beta2, g3, beta3 = params
        xs, input_grad = [x] if skip is None else [x, skip], need[1] or need[2]
        gz = torch.empty_like(out)  # both branches' gradient, channels-last whatever the layout of grad
        torch.ops.aten.leaky_relu_backward.grad_input(grad, out, block.negative_slope, True, grad_input=gz)
        gzv = spatial_last(gz)
        if h3 is not None:  # the projection's norm first: the main branch's then overwrites gz
            gh3, sxh3, sg3 = norm_backward(gzv, spatial_last(h3), mean3, rstd3, g3, inplace=False,
                                           out=spatial_last(torch.empty_like(h3)))
        gh2, sxh2, sg2 = norm_backward(gzv, spatial_last(h2), mean2, rstd2, g2, inplace=h3 is not None)
        (ga1,), gw2, gb2 = conv_backward(block.conv2.conv, w2, b2 is not None, channels_first(gh2, h2), [a1], True)
        if block.norm1.negative_slope != 1.0:
            torch.ops.aten.leaky_relu_backward.grad_input(ga1, a1, block.norm1.negative_slope, True, grad_input=ga1)
        gh1, sxh1, sg1 = norm_backward(spatial_last(ga1), spatial_last(h1), mean1, rstd1, g1, inplace=True)
        gxs, gw1, gb1 = conv_backward(block.conv1.conv, w1, b1 is not None, channels_first(gh1, h1), xs, input_grad)
        gw3 = gb3 = None
        if h3 is not None:
            gxs, gw3, gb3 = conv_backward(block.conv3.conv, w3, b3 is not None, channels_first(gh3, h3), xs, input_grad,
                                          accumulate=gxs)
        elif input_grad:
            gxs[0].add_(gz)
        norm_grads = []
        for weight, bias, sxh, sg in ((g1, beta1, sxh1, sg1), (g2, beta2, sxh2, sg2),
                                      (g3, beta3, *((sxh3, sg3) if h3 is not None else (None, None)))):
            norm_grads += [sxh.sum(0).view(-1) if weight is not None else None,
                           sg.sum(0).view(-1) if bias is not None else None]
        conv_grads = [gw1, gb1, gw2, gb2, gw3, gb3]
        grads = [g if n else None for g, n in zip(conv_grads + norm_grads, need[3:])]
        gx, gskip = (gxs + [None])[:2] if input_grad else (None, None)
        return None, gx if need[1] else None, gskip if need[2] else None, *grads


def fused_res_block(block: nn.Module, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
    """``block(x)``, or ``block(torch.cat((x, skip), 1))`` without the concatenation, through
    ``ResBlockFunction`` when autograd records, else the in-place forward."""
    params = _params(block)
    inputs = [x] if skip is None else [x, skip]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs + params):
        return ResBlockFunction.apply(block, x, skip, *params)
    return res_block_forward(block, inputs, params, keep=False)[0]


__all__ = [
    "ONEDNN_OPS", "ResBlockFunction", "conv_backward", "conv_forward", "fused_res_block", "res_block_forward",
    "single_channel_weight_grad",
]
