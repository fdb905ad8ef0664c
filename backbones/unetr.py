"""UNETR's encoder as a preset of the shared ViT, and MONAI's UNETR/ViT checkpoints mapped onto ours.

UNETR (Hatamizadeh et al., 2022) is a plain ViT over cubic 16³ patches whose blocks 3, 6, 9 and 12
(0-based 3, 6, 9, 11) feed a convolutional decoder; the decoder lives in ``heads/unetr.py``. The
converter here reads ``monai.networks.nets.UNETR`` state dicts (and bare ``monai.networks.nets.ViT``
ones) and renames the encoder into the ``backbone.`` namespace of ``backbones.weights``; the decoder's keys
go on as ``foreign.`` ones, mapped onto ``UnetrDecoder`` by ``heads/unetr_weights.py``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from einops import rearrange

from .registry import build_preset, register
from .vit import VisionTransformer
from .weights import StateDict, register_format

UNETR_OUT_INDICES = (3, 6, 9, 11)


@register
def unetr_vit_base(**kwargs: Any) -> VisionTransformer:
    """UNETR-Base encoder: 3-D ViT-B over 16³ patches of a 96³ ROI, no class token, no qkv bias,
    LayerNorm eps 1e-5 (MONAI's), returning blocks 3, 6, 9 and the final-normed 11 for the decoder."""
    arch = dict(
        img_size=96, patch_size=16, in_chans=1, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
        qkv_bias=False, class_token=False, spatial_dims=3, out_indices=UNETR_OUT_INDICES, norm_eps=1e-5,
    )
    return build_preset(VisionTransformer, arch, kwargs)  # type: ignore[return-value]


# --- MONAI checkpoints ------------------------------------------------------------------------------------

_BLOCK_NAMES = {
    "attn.out_proj": "attn.proj",
    "mlp.linear1": "mlp.fc1",
    "mlp.linear2": "mlp.fc2",
}


def is_monai_unetr(state: Mapping[str, torch.Tensor]) -> bool:
    """MONAI's ``UNETR`` (keys ``vit.*`` and ``encoder1.*``) or a bare MONAI ``ViT`` (``patch_embedding.*``)."""
    return any(k.endswith("patch_embedding.position_embeddings") for k in state) and any(
        k.startswith(("vit.blocks.0.", "blocks.0.")) and ".mlp.linear1." in k for k in state
    )


def convert_monai_unetr(state: StateDict) -> StateDict:
    """Rename a MONAI UNETR/ViT state dict's encoder into ``backbone.`` keys; a UNETR's decoder stays ``foreign.``.

    The perceptron patch embedding (a Linear over patches flattened as ``(p1 p2 p3 c)``) becomes our
    Conv3d kernel; cross-attention norms, which MONAI creates but never uses without cross-attention,
    are dropped.
    """
    vit_prefix = "vit." if any(k.startswith("vit.") for k in state) else ""
    in_chans = state["encoder1.layer.conv1.conv.weight"].shape[1] if "encoder1.layer.conv1.conv.weight" in state else None
    out: StateDict = {}
    for key, value in state.items():
        if vit_prefix and not key.startswith(vit_prefix):
            out["foreign." + key] = value  # the decoder: heads/unetr_weights.py maps it onto UnetrDecoder
            continue
        name = key.removeprefix(vit_prefix)
        if name == "patch_embedding.position_embeddings":
            out["backbone.pos_embed"] = value
        elif name == "patch_embedding.patch_embeddings.weight":  # proj_type="conv": already a Conv3d kernel
            out["backbone.patch_embed.proj.weight"] = value
        elif name == "patch_embedding.patch_embeddings.bias":
            out["backbone.patch_embed.proj.bias"] = value
        elif name == "patch_embedding.patch_embeddings.1.weight":  # proj_type="perceptron"
            out["backbone.patch_embed.proj.weight"] = perceptron_to_conv(value, in_chans)
        elif name == "patch_embedding.patch_embeddings.1.bias":
            out["backbone.patch_embed.proj.bias"] = value
        elif name.startswith("norm."):
            out["backbone." + name] = value
        elif match := re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", name):
            index, module, kind = match.groups()
            if module == "norm_cross_attn":
                continue
            out[f"backbone.blocks.{index}.{_BLOCK_NAMES.get(module, module)}.{kind}"] = value
    return out


def perceptron_to_conv(weight: torch.Tensor, in_chans: int | None = None) -> torch.Tensor:
    """MONAI's perceptron patch embedding ``[C, (p1 p2 p3 c)]`` as a Conv3d kernel ``[C, c, p1, p2, p3]``.

    Without ``in_chans`` (a bare ViT checkpoint), the largest cubic patch that divides the row is taken:
    1 channel for 16³ × 1 = 4096, 4 channels for 16³ × 4 = 16384.
    """
    patch_dim = weight.shape[1]
    if in_chans is None:
        side = max(p for p in range(1, round(patch_dim ** (1 / 3)) + 2) if patch_dim % p**3 == 0)
        in_chans = patch_dim // side**3
    side = round((patch_dim // in_chans) ** (1 / 3))
    if side**3 * in_chans != patch_dim:
        raise ValueError(f"perceptron patch embedding of width {patch_dim} is not a cubic patch × {in_chans} channels")
    return rearrange(weight, "o (p1 p2 p3 c) -> o c p1 p2 p3", p1=side, p2=side, p3=side, c=in_chans).contiguous()


def conv_to_perceptron(weight: torch.Tensor) -> torch.Tensor:
    """The inverse of ``perceptron_to_conv``: our Conv3d kernel as MONAI's perceptron Linear weight."""
    return rearrange(weight, "o c p1 p2 p3 -> o (p1 p2 p3 c)")


register_format("monai-unetr", is_monai_unetr, convert_monai_unetr)

__all__ = ["UNETR_OUT_INDICES", "convert_monai_unetr", "is_monai_unetr", "perceptron_to_conv", "unetr_vit_base"]
