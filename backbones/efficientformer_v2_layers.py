"""The convolutional parts of EfficientFormerV2 (backbones/efficientformer_v2.py): convolution + BatchNorm (+ activation)
with its folding into the inference form, the layer scale, and the feed-forward branch."""

from __future__ import annotations

import torch
from torch import nn

from ops.conv_fusion import conv_act, forget_packed
from ops.kernels import CpuKernelModule


class ConvNorm(nn.Module, CpuKernelModule):
    """Convolution (``kernel_size // 2`` padding), BatchNorm and an optional activation; folded (``fuse``), a oneDNN
    convolution with its activation as ``cpu_kernels`` says (``ops.conv_fusion``)."""

    def __init__(
        self, in_chans: int, out_chans: int, kernel_size: int = 1, *, stride: int = 1, groups: int = 1,
        act_layer: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups)
        self.bn: nn.Module = nn.BatchNorm2d(out_chans)
        self.act = act_layer() if act_layer is not None else nn.Identity()
        self.register_load_state_dict_post_hook(forget_packed)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, *, inplace: bool = False) -> torch.Tensor:
        """``act(bn(conv(x)))``, plus ``residual`` when given, which the folded form adds inside the convolution,
        writing the result into ``residual`` itself when ``inplace`` allows it."""
        if isinstance(self.bn, nn.Identity):  # folded: conv with its activation or residual as one oneDNN call
            return conv_act(self.conv, self.act, x, residual, inplace=inplace, cpu_kernels=self.cpu_kernels)
        out = self.act(self.bn(self.conv(x)))
        return out if residual is None else out + residual

    @torch.no_grad()
    def fuse(self, out_scale: torch.Tensor | None = None) -> None:
        """Fold the BatchNorm into the convolution, then a per-channel ``out_scale`` (a layer scale)."""
        if isinstance(self.bn, nn.BatchNorm2d):
            factor = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
            self.conv.weight.mul_(factor.view(-1, 1, 1, 1))
            self.conv.bias.copy_((self.conv.bias - self.bn.running_mean) * factor + self.bn.bias)
            self.bn = nn.Identity()
        if out_scale is not None:
            if not isinstance(self.act, nn.Identity):
                raise ValueError("an output scale cannot be folded through an activation")
            self.conv.weight.mul_(out_scale.view(-1, 1, 1, 1))
            self.conv.bias.mul_(out_scale)


class LayerScale2d(nn.Module):
    """Per-channel scale of a residual branch ``[B, C, H, W]``."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, -1, 1, 1)


class ConvMlp(nn.Module):
    """The feed-forward branch: 1x1 conv, depthwise 3x3 conv (both BN + GELU), 1x1 conv + BN."""

    def __init__(self, dim: int, hidden_dim: int, *, drop: float = 0.0, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = ConvNorm(dim, hidden_dim, act_layer=act_layer)
        self.mid = ConvNorm(hidden_dim, hidden_dim, 3, groups=hidden_dim, act_layer=act_layer)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = ConvNorm(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, *, inplace: bool = False) -> torch.Tensor:
        """The branch, plus ``residual`` when given (the inference form's: no dropout after it; see ConvNorm)."""
        if residual is not None:
            return self.fc2(self.mid(self.fc1(x)), residual, inplace=inplace)
        return self.drop2(self.fc2(self.drop1(self.mid(self.fc1(x)))))

    def fuse(self, out_scale: torch.Tensor | None = None) -> None:
        self.fc1.fuse()
        self.mid.fuse()
        self.fc2.fuse(out_scale)
