"""The channels-last form of UNETR's decoder blocks: MONAI's conv blocks with each instance norm and its LeakyReLU
as one exact op, and 1x1x1 convolutions as matrix products.

On a CPU the decoder's full-resolution convolutions (16-32 channels at 96³) bound UNETR's step. In the
channels-last layout oneDNN runs its 3x3x3 and 2x2x2 transposed convolutions 1.6-4x faster than in NCDHW, but
PyTorch's own kernels around them do not follow: ``GroupNorm`` accumulates channels-last statistics inexactly,
``InstanceNorm`` copies to NCDHW and back, and a 1x1x1 convolution takes a slow path (a single-threaded channels-last
one ~5x slower than NCDHW). ``fuse_decoder_blocks`` swaps MONAI's ``UnetResBlock``/``UnetBasicBlock`` (and the
1x1x1 output block) for blocks that run ``ops.norms3d.InstanceNormAct`` and a GEMM over the
``[B, D, H, W, C]`` view, keeping every parameter and its name, so MONAI checkpoints load unchanged. Where PyTorch
would pick its slow native kernel for a batch-1 convolution (``C*D*H <= 20480``), inference calls oneDNN's
directly and training convolves the volume's two depth halves as a batch of two, which takes oneDNN's kernel.
Each fused block runs as its ``cpu_kernels`` says (``ops.kernels``): these kernels, or MONAI's arithmetic in
PyTorch's own ops, which GPUs, autocast, compilers and exporters always get.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetrUpBlock
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock
from torch import nn
from torch.autograd.function import once_differentiable

from .conv_fusion import onednn_usable
from .kernels import CpuKernelModule, CpuKernels, check_cpu_kernels, eager_cpu, onednn_enabled, run_kernel
from .norms3d import InstanceNormAct, spatial_last
from .unetr_res_block import ONEDNN_OPS, fused_res_block


def pointwise(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, with a 1x1x1 (or 1x1) convolution of stride 1 without groups as a matrix product over the
    channels-last view (output channels-last when ``x`` is), and, outside autograd, any other convolution as
    oneDNN's kernel: PyTorch picks a slower native kernel for some batch-1 shapes (``B*C*D*H <= 20480``: the
    1-channel input, 128 channels at 12³)."""
    if (
        not eager_cpu(x)  # first: compilers and exporters get the plain convolution
        or not isinstance(conv, nn.Conv3d | nn.Conv2d) or conv.padding_mode != "zeros" or isinstance(conv.padding, str)
    ):
        return conv(x)
    if (
        all(k == 1 for k in conv.kernel_size) and conv.groups == 1 and all(s == 1 for s in conv.stride)
        and all(p == 0 for p in conv.padding)
    ):
        return F.linear(x.movedim(1, -1), conv.weight.flatten(1), conv.bias).movedim(-1, 1)
    if onednn_usable(x, conv.weight):
        return torch.ops.mkldnn._convolution_pointwise(  # checked by onednn_usable
            x, conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
            "none", [], "",
        )
    if _native_kernel_in_training(conv, x):
        return _conv_as_two_halves(conv, x)
    return conv(x)


def _native_kernel_in_training(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether PyTorch would run ``conv`` (3-D, stride 1, 'same' odd kernel) on ``x`` with its slow native kernel
    (batch 1 and ``C*D*H <= 20480`` on a CPU: 32 channels at 24³, 128 at 12³ in UNETR-Base), which the two-halves
    form avoids."""
    return (
        isinstance(conv, nn.Conv3d) and x.device.type == "cpu" and x.shape[0] == 1 and x.shape[1] > 1
        and x.shape[1] * x.shape[2] * x.shape[3] <= 20480 and x.shape[2] % 2 == 0 and x.shape[2] >= 4
        and conv.groups == 1 and all(s == 1 for s in conv.stride) and all(d == 1 for d in conv.dilation)
        and all(k % 2 == 1 and p == k // 2 for k, p in zip(conv.kernel_size, conv.padding))
        and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    )


def _conv_as_two_halves(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for one volume as a batch of its two depth halves, each with its neighbour's border slices:
    a batch of 2 takes oneDNN's kernel forward and backward (3-12x faster at these shapes); same sums."""
    pad, half = conv.padding[0], x.shape[2] // 2
    padded = F.pad(x, (0, 0, 0, 0, pad, pad))
    halves = torch.cat([padded[:, :, : half + 2 * pad], padded[:, :, half:]])
    y = F.conv3d(halves, conv.weight, conv.bias, padding=(0, *conv.padding[1:]))
    return torch.cat([y[:1], y[1:]], 2)


def _conv(block: nn.Module) -> nn.Module:
    """The convolution inside MONAI's ``Convolution`` wrapper (an ``nn.Sequential`` whose ``conv`` child is it),
    refusing wrappers that also hold a dropout, norm or activation."""
    if set(dict(block.named_children())) != {"conv"}:
        raise ValueError(f"fuse_decoder_blocks: MONAI Convolution with {list(dict(block.named_children()))} "
                         "children; only a bare convolution is supported")
    return block.conv


def _norm_act(norm: nn.Module, act: nn.Module | None, cpu_kernels: CpuKernels = "on") -> InstanceNormAct | None:
    """``InstanceNormAct`` for an instance norm (or one-group-per-channel GroupNorm) followed by ``act`` (a
    LeakyReLU, or None), else None."""
    if act is not None and not isinstance(act, nn.LeakyReLU):
        return None
    instance = isinstance(norm, nn.modules.instancenorm._InstanceNorm) and not norm.track_running_stats
    per_channel = isinstance(norm, nn.GroupNorm) and norm.num_groups == norm.num_channels
    if not (instance or per_channel):
        return None
    return InstanceNormAct.from_norm(norm, negative_slope=1.0 if act is None else act.negative_slope,
                                     cpu_kernels=cpu_kernels)


class FusedResBlock(nn.Module, CpuKernelModule):
    """MONAI's ``UnetResBlock`` (two 3x3x3 conv-norm steps with a residual, projected by a 1x1x1 conv-norm
    where the width or stride changes), each norm fused with its activation, run as ``cpu_kernels`` says (the
    kernels of ``ops.unetr_res_block`` and ``ops.norms3d``, or MONAI's arithmetic in PyTorch's ops); same parameter
    names.

    Args:
        block: the MONAI block, whose convolutions and norm parameters are taken over (shared, not copied).
        cpu_kernels: ``ops.kernels``' switch.
    """

    def __init__(self, block: UnetResBlock, cpu_kernels: CpuKernels = "on") -> None:
        super().__init__()
        self.cpu_kernels = check_cpu_kernels(cpu_kernels)
        self.conv1, self.conv2 = block.conv1, block.conv2
        self.norm1 = _norm_act(block.norm1, block.lrelu, cpu_kernels)
        self.norm2 = _norm_act(block.norm2, None, cpu_kernels)
        if self.norm1 is None or self.norm2 is None:
            raise ValueError("FusedResBlock: the block's norms must be instance norms and its activation a LeakyReLU")
        self.negative_slope = block.lrelu.negative_slope
        if hasattr(block, "conv3"):
            self.conv3, self.norm3 = block.conv3, _norm_act(block.norm3, None, cpu_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_kernel(self, "unetr_res_block", (x,), eager_cpu(x), self.plain, self.fast)

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        """MONAI's ``UnetResBlock.forward`` in PyTorch's kernels."""
        out = self.norm2.plain(self.conv2(self.norm1.plain(self.conv1(x))))
        residual = self.norm3.plain(self.conv3(x)) if hasattr(self, "conv3") else x
        return F.leaky_relu(out + residual, self.negative_slope)

    def fast(self, x: torch.Tensor) -> torch.Tensor:
        """The hand-written kernels: the whole block as one function where ``_fusable``, else layer by layer."""
        if self._fusable(x):
            return fused_res_block(self, x)
        out = self.norm2(pointwise(_conv(self.conv2), self.norm1(pointwise(_conv(self.conv1), x))))
        residual = self.norm3(pointwise(_conv(self.conv3), x)) if hasattr(self, "conv3") else x
        return F.leaky_relu_(out.add_(residual), self.negative_slope)

    def _fusable(self, x: torch.Tensor) -> bool:
        """Whether ``ops.unetr_res_block`` runs the block on ``x``: a channels-last fp32 CPU volume in eager mode,
        'same' 3x3x3-style convolutions and a 1x1x1 projection, oneDNN's ops available, and in training no
        convolution that PyTorch would give its native kernel (whose backward the two-halves form avoids)."""
        convs = [_conv(self.conv1), _conv(self.conv2)]
        if (
            not eager_cpu(x) or x.dim() != 5
            or not (x.is_contiguous(memory_format=torch.channels_last_3d) or x.shape[1] == 1 and x.is_contiguous())
            or not onednn_enabled(*ONEDNN_OPS)
            or not all(_same_conv(c) for c in convs)
        ):
            return False
        if hasattr(self, "conv3"):
            c3 = _conv(self.conv3)
            if not (isinstance(c3, nn.Conv3d) and c3.kernel_size == (1, 1, 1) and c3.stride == (1, 1, 1)
                    and c3.padding == (0, 0, 0) and c3.groups == 1):
                return False
        if not torch.is_grad_enabled():
            return True
        h1 = x.new_zeros(()).expand(x.shape[0], convs[0].out_channels, *x.shape[2:])  # conv2's input, as a shape
        return not (_native_kernel_in_training(convs[0], x) or _native_kernel_in_training(convs[1], h1))


def _same_conv(conv: nn.Module) -> bool:
    """A 3-D convolution of stride 1 without groups or dilation whose zero padding keeps the size."""
    return (
        isinstance(conv, nn.Conv3d) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
        and conv.groups == 1 and conv.stride == (1, 1, 1) and conv.dilation == (1, 1, 1)
        and all(k % 2 == 1 and p == k // 2 for k, p in zip(conv.kernel_size, conv.padding))
    )


class FusedBasicBlock(nn.Module, CpuKernelModule):
    """MONAI's ``UnetBasicBlock`` (two conv-norm-LeakyReLU steps), each norm fused with its activation, run as
    ``cpu_kernels`` says.

    Args:
        block: the MONAI block, whose convolutions and norm parameters are taken over.
        cpu_kernels: ``ops.kernels``' switch.
    """

    def __init__(self, block: UnetBasicBlock, cpu_kernels: CpuKernels = "on") -> None:
        super().__init__()
        self.cpu_kernels = check_cpu_kernels(cpu_kernels)
        self.conv1, self.conv2 = block.conv1, block.conv2
        self.norm1 = _norm_act(block.norm1, block.lrelu, cpu_kernels)
        self.norm2 = _norm_act(block.norm2, block.lrelu, cpu_kernels)
        if self.norm1 is None or self.norm2 is None:
            raise ValueError("FusedBasicBlock: the block's norms must be instance norms and its activation a LeakyReLU")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_kernel(self, "unetr_basic_block", (x,), eager_cpu(x), self.plain, self.fast)

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        """MONAI's ``UnetBasicBlock.forward`` in PyTorch's kernels."""
        return self.norm2.plain(self.conv2(self.norm1.plain(self.conv1(x))))

    def fast(self, x: torch.Tensor) -> torch.Tensor:
        """The exact channels-last norms and ``pointwise``'s convolutions."""
        return self.norm2(pointwise(_conv(self.conv2), self.norm1(pointwise(_conv(self.conv1), x))))


class FusedOutBlock(nn.Module, CpuKernelModule):
    """MONAI's ``UnetOutBlock`` (a 1x1x1 convolution to the logits) as a matrix product whose output is the
    NCDHW logits: ``W @ X`` over the channels-last map read as ``[B, C, N]``, so the loss gets contiguous logits
    without a transposing copy (2.5x faster than the convolution and the copy at 96³), as ``cpu_kernels`` says.

    Args:
        block: the MONAI block, whose convolution is taken over.
        cpu_kernels: ``ops.kernels``' switch.
    """

    def __init__(self, block: UnetOutBlock, cpu_kernels: CpuKernels = "on") -> None:
        super().__init__()
        self.cpu_kernels = check_cpu_kernels(cpu_kernels)
        self.conv = block.conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = _conv(self.conv)
        usable = (
            eager_cpu(x) and isinstance(conv, nn.Conv3d) and conv.kernel_size == (1, 1, 1)
            and conv.stride == (1, 1, 1) and conv.padding == (0, 0, 0) and conv.groups == 1
            and x.is_contiguous(memory_format=torch.channels_last_3d)
        )
        return run_kernel(self, "unetr_out_block", (x,), usable, self.conv, self.fast)

    def fast(self, x: torch.Tensor) -> torch.Tensor:
        """The product, with ``OutConvFunction``'s backward when autograd records."""
        conv = _conv(self.conv)
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in conv.parameters())):
            return OutConvFunction.apply(x, conv.weight, conv.bias)
        return _logits(x, conv.weight, conv.bias)


def _logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``W @ X + b`` per sample over the channels-last ``x`` read as ``[B, C, N]`` (a view): NCDHW logits."""
    y = x.new_empty(x.shape[0], weight.shape[0], *x.shape[2:])
    flat, w, out = x.flatten(2), weight.flatten(1).expand(x.shape[0], -1, -1), y.flatten(2)
    if bias is None:
        torch.bmm(w, flat, out=out)
    else:
        torch.baddbmm(bias.view(1, -1, 1).expand(x.shape[0], -1, 1), w, flat, out=out)
    return y


class OutConvFunction(torch.autograd.Function):
    """``FusedOutBlock``'s matrix product with its backward written out, so that the input's gradient comes back
    channels-last like the input (``G^T @ W`` per sample): autograd's ``bmm`` backward returns it in NCDHW order,
    and the decoder's next backward step then reads two layouts at once (15x slower than one)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _logits(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        g = grad.reshape(grad.shape[0], grad.shape[1], -1)  # [B, K, N]
        w = weight.flatten(1)  # [K, C]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.empty_like(x, memory_format=torch.channels_last_3d)
            torch.bmm(g.transpose(1, 2), w.expand(x.shape[0], -1, -1), out=spatial_last(gx))
        if ctx.needs_input_grad[1]:
            gw = torch.bmm(g, spatial_last(x)).sum(0).view_as(weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum((0, 2))
        return gx, gw, gb


class FusedUpBlock(nn.Module, CpuKernelModule):
    """MONAI's ``UnetrUpBlock`` (transposed convolution, concatenation with the skip, residual block) with the
    concatenation folded into the block's convolutions: each takes the two parts with its weight split along the
    input channels (oneDNN adds the second part's convolution into the first's output), so no map-sized copy is
    made forward and no concatenated gradient backward; as ``cpu_kernels`` says. Same parameter names.

    Args:
        block: the MONAI block, whose ``conv_block`` is already a ``FusedResBlock``.
        cpu_kernels: ``ops.kernels``' switch.
    """

    def __init__(self, block: UnetrUpBlock, cpu_kernels: CpuKernels = "on") -> None:
        super().__init__()
        self.cpu_kernels = check_cpu_kernels(cpu_kernels)
        self.transp_conv, self.conv_block = block.transp_conv, block.conv_block

    def forward(self, inp: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return run_kernel(self, "unetr_up_block", (inp, skip), eager_cpu(inp, skip), self.plain, self.fast)

    def plain(self, inp: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """MONAI's ``UnetrUpBlock.forward`` in PyTorch's kernels."""
        return self.conv_block.plain(torch.cat((self.transp_conv(inp), skip), dim=1))

    def fast(self, inp: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """The residual block's kernels, on the two parts where ``FusedResBlock._fusable``."""
        out = self.transp_conv(inp)
        block = self.conv_block
        if hasattr(block, "conv3") and block._fusable(out) and block._fusable(skip):
            return fused_res_block(block, out, skip)
        return block.fast(torch.cat((out, skip), dim=1))


def _fusable(block: nn.Module) -> bool:
    if isinstance(block, UnetOutBlock):
        return set(dict(block.conv.named_children())) == {"conv"}
    norms = [block.norm1, block.norm2, *([block.norm3] if hasattr(block, "norm3") else [])]
    convs = [block.conv1, block.conv2, *([block.conv3] if hasattr(block, "conv3") else [])]
    return (
        isinstance(block.lrelu, nn.LeakyReLU) and all(_norm_act(n, None) is not None for n in norms)
        and all(set(dict(c.named_children())) == {"conv"} for c in convs)
    )


def fuse_decoder_blocks(module: nn.Module, cpu_kernels: CpuKernels = "on") -> nn.Module:
    """Swap, in place, every MONAI ``UnetResBlock``, ``UnetBasicBlock`` and ``UnetOutBlock`` under ``module``
    whose norms are instance norms for its fused form (same parameters, same names, same function), and each
    ``UnetrUpBlock`` around a fused residual block for ``FusedUpBlock``, run as ``cpu_kernels`` says; blocks with
    other norms (batch norm) or dropout stay as they are, and ``off`` leaves every block MONAI's."""
    if check_cpu_kernels(cpu_kernels) == "off":
        return module
    fused = {UnetResBlock: FusedResBlock, UnetBasicBlock: FusedBasicBlock, UnetOutBlock: FusedOutBlock}
    for name, child in module.named_children():
        if type(child) in fused and _fusable(child):
            setattr(module, name, fused[type(child)](child, cpu_kernels))
        else:
            fuse_decoder_blocks(child, cpu_kernels)
            if isinstance(child, UnetrUpBlock) and isinstance(child.conv_block, FusedResBlock):
                setattr(module, name, FusedUpBlock(child, cpu_kernels))
    return module


__all__ = [
    "FusedBasicBlock", "FusedOutBlock", "FusedResBlock", "FusedUpBlock", "OutConvFunction", "fuse_decoder_blocks",
    "pointwise",
]
