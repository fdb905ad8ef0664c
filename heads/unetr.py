"""UNETR's convolutional decoder (Hatamizadeh et al., 2022), built from MONAI's blocks, over a ViT's feature maps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import nn

from backbones.base import FeatureInfo

from . import unetr_weights  # noqa: F401  (registers the decoder key map of MONAI UNETR files)

NormName = Literal["instance", "batch"]


class UnetrDecoder(nn.Module):
    """UNETR's convolutional decoder (Hatamizadeh et al., 2022), built from MONAI's blocks.

    The backbone returns ``L`` maps at the patch stride ``2**L`` (UNETR-Base: 4 maps at 16). The deepest
    is upsampled ``L`` times back to the input; at level ``j`` (stride ``2**j``) it is joined with the
    ``j``-th shallower map, brought there by ``L - j`` transposed convolutions, and at full resolution with
    a convolution of the input itself. Level ``j`` has ``feature_size * 2**j`` channels.

    Args:
        feature_info: the backbone's outputs, shallow to deep, all with the same isotropic stride ``2**L``
            where ``L`` is their number.
        in_chans: channels of the input volume (read by the full-resolution block).
        num_classes: output channels (logits).
        feature_size: channels at full resolution.
        norm_name: normalisation in the conv blocks (MONAI names; UNETR uses ``instance``).
        res_block: residual conv blocks.
        conv_block: conv blocks after the transposed convolutions of the skip projections.
        spatial_dims: 3 for volumes (2 for image ViTs).
    """

    def __init__(
        self,
        feature_info: Sequence[FeatureInfo],
        *,
        in_chans: int,
        num_classes: int,
        feature_size: int = 16,
        norm_name: NormName = "instance",
        res_block: bool = True,
        conv_block: bool = True,
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        levels = len(feature_info)
        strides = {tuple(f.stride) for f in feature_info}
        if len(strides) != 1 or len(set(next(iter(strides)))) != 1 or next(iter(strides))[0] != 2**levels:
            raise ValueError(
                f"UnetrDecoder needs {levels} feature maps at one isotropic stride 2**{levels} = {2**levels} "
                f"(the patch size), got strides {[f.stride for f in feature_info]}; set the backbone's "
                "out_indices to log2(patch size) blocks"
            )
        width = [feature_size * 2**j for j in range(levels)]  # channels per level, full resolution first
        common = dict(spatial_dims=spatial_dims, kernel_size=3, norm_name=norm_name, res_block=res_block)
        self.input_block = UnetrBasicBlock(in_channels=in_chans, out_channels=width[0], stride=1, **common)
        self.skip_blocks = nn.ModuleList(
            UnetrPrUpBlock(
                in_channels=feature_info[j - 1].channels, out_channels=width[j], num_layer=levels - j - 1,
                stride=1, upsample_kernel_size=2, conv_block=conv_block, **common,
            )
            for j in range(1, levels)
        )
        ins = [feature_info[-1].channels, *width[:0:-1]]  # deepest map, then levels L-1 .. 1
        self.up_blocks = nn.ModuleList(
            UnetrUpBlock(in_channels=c_in, out_channels=c_out, upsample_kernel_size=2, **common)
            for c_in, c_out in zip(ins, width[::-1])
        )
        self.out = UnetOutBlock(spatial_dims=spatial_dims, in_channels=width[0], out_channels=num_classes)

    def forward(self, features: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes, *x.shape[2:]]`` from the backbone's maps and the input ``x``."""
        skips = [self.input_block(x), *(block(f) for block, f in zip(self.skip_blocks, features[:-1]))]
        y = features[-1]
        for block, skip in zip(self.up_blocks, reversed(skips)):  # deepest level first
            y = block(y, skip)
        return self.out(y)

