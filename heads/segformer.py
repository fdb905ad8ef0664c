"""The SegFormer all-MLP decoder (Xie et al., 2021) over any backbone's feature maps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from backbones.mix_transformer import map_to_tokens, tokens_to_map
from ops.kernels import CpuKernelModule
from ops.onednn_linear import onednn_linear

from . import segformer_weights  # noqa: F401  (registers the decoder key maps of SegFormer files)


class SegFormerHead(nn.Module, CpuKernelModule):
    """All-MLP decoder (Xie et al., 2021): each map is projected to ``embed_dim`` and upsampled to the
    finest map, the maps are fused by a 1x1 convolution with BatchNorm and ReLU, then classified.

    The projection and the fuse convolution are linear and bilinear upsampling commutes with a
    per-pixel linear map (its weights sum to one, so biases pass through), so by default each map is
    multiplied by the product ``fuse_i @ linear_i`` *before* upsampling: the same function with the same
    parameters, without the ``[B, n * embed_dim, H/4, W/4]`` concatenation and its convolution. The
    channel dropout before the classifier is likewise applied to the classifier's weights per sample. The folded
    products run in oneDNN as ``cpu_kernels`` says (``ops.onednn_linear``; set by the task, off by default).

    Args:
        in_channels: channels of the backbone maps, shallow to deep (``[f.channels for f in feature_info]``).
        num_classes: output channels.
        embed_dim: decoder width (256 for MiT-B0/B1, 768 for B2-B5).
        dropout: channel dropout before the classifier.
        fold_projections: fold projection and fusion as described; ``False`` runs them one after the other.
    """

    def __init__(
        self, in_channels: Sequence[int], num_classes: int, *, embed_dim: int = 256, dropout: float = 0.1,
        fold_projections: bool = True,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.fold_projections = fold_projections
        self.linear = nn.ModuleList(nn.Linear(c, embed_dim) for c in in_channels)
        self.fuse = nn.Conv2d(len(in_channels) * embed_dim, embed_dim, 1, bias=False)  # inputs deepest map first
        self.norm = nn.BatchNorm2d(embed_dim)
        self.act = nn.ReLU(inplace=True)
        self.dropout = dropout
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[B, C_i, h_i, w_i]`` maps -> logits ``[B, num_classes, h, w]`` at the finest map's size."""
        if len(features) != len(self.linear):
            raise ValueError(f"SegFormerHead was built for {len(self.linear)} feature maps, got {len(features)}")
        size = max((tuple(f.shape[2:]) for f in features), key=lambda s: s[0] * s[1])
        if not self.fold_projections:
            maps = [
                self._resize(tokens_to_map(lin(map_to_tokens(f)), f.shape[2:]), size) for f, lin in zip(features, self.linear)
            ]
            x = self.act(self.norm(self.fuse(torch.cat(maps[::-1], dim=1))))
            return self.classifier(F.dropout2d(x, self.dropout, self.training))
        fuse = self.fuse.weight.flatten(1).split(self.embed_dim, dim=1)[::-1]  # per map, shallow to deep: [E, E]
        x = None
        for f, linear, w in zip(features, self.linear, fuse):
            y = onednn_linear(map_to_tokens(f), w @ linear.weight, w @ linear.bias, self.cpu_kernels)  # [B, h*w, E]
            y = self._resize(tokens_to_map(y, f.shape[2:]), size)
            x = y if x is None else x.add_(y)  # in place: large CPU buffers are costly to allocate
        tokens = map_to_tokens(self.act(self.norm(x)))  # [B, h*w, E]
        weight, bias = self.classifier.weight.flatten(1), self.classifier.bias  # [K, E], [K]
        if self.training and self.dropout > 0:
            # channel dropout (Dropout2d) as a per-sample mask on the classifier weights, not on the map
            keep = tokens.new_empty(tokens.shape[0], 1, tokens.shape[2]).bernoulli_(1 - self.dropout) / (1 - self.dropout)
            logits = torch.bmm(tokens, (weight * keep).transpose(1, 2)) + bias  # [B, h*w, K]
        else:
            logits = onednn_linear(tokens, weight, bias, self.cpu_kernels)
        return tokens_to_map(logits, size).contiguous()  # [B, K, h, w]

    @staticmethod
    def _resize(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        return x if tuple(x.shape[2:]) == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
