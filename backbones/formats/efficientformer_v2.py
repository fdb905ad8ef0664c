"""Checkpoint formats of EfficientFormerV2: timm's and the snap-research release's, mapped onto ours.

timm (``efficientformerv2_*.snap_dist_in1k``): our backbone uses its names; the classifier ``head`` maps onto our
head's ``fc`` and the distillation classifier ``head_dist`` onto ``fc_dist``. A bare state dict of our backbone
has the same names and loads through the same converter.

The release (snap-research/EfficientFormer ``models/efficientformer_v2.py``; ``eformer_s0_450.pth``... hold it under
``model``, which ``read_checkpoint`` unwraps) keeps the stem as ``patch_embed.{0,1,3,4}`` (conv, BN, -, conv, BN),
the stages and the downsamplings between them in one list ``network.{2i}`` / ``network.{2i+1}``, every conv + BN
pair as a ``Sequential`` (``q.0``/``q.1``; ``proj.1``/``proj.2`` after the activation), the feed-forward norms apart
(``fc1``/``norm1``, ``mid``/``mid_norm``, ``fc2``/``norm2``), layer scales ``[C, 1, 1]`` and the distillation
classifier as ``dist_head``. Its ``attention_bias_idxs`` buffers are index tables, rebuilt from the grid here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..weights import StateDict, convert_timm_classifier, register_format

_RELEASE_STEM = {"0": "conv1.conv", "1": "conv1.bn", "3": "conv2.conv", "4": "conv2.bn"}
_RELEASE_MLP = {
    "fc1": "fc1.conv", "norm1": "fc1.bn", "mid": "mid.conv", "mid_norm": "mid.bn", "fc2": "fc2.conv", "norm2": "fc2.bn",
}
# inside an attention module: ``Sequential`` indices -> our ConvNorm names (longest prefixes first)
_RELEASE_ATTN = (
    ("q.local.0.", "q.local."), ("q.proj.0.", "q.proj.conv."), ("q.proj.1.", "q.proj.bn."),
    ("proj.1.", "proj.conv."), ("proj.2.", "proj.bn."),
    *((f"{m}.{i}.", f"{m}.{n}.") for m in ("q", "k", "v", "v_local", "stride_conv") for i, n in (("0", "conv"), ("1", "bn"))),
)
_RELEASE_KEY = re.compile(r"network\.(\d+)\.(.+)")


def is_timm_efficientformerv2(state: Mapping[str, torch.Tensor]) -> bool:
    return "stem.conv1.conv.weight" in state and any(".token_mixer.talking_head1." in k for k in state)


def is_efficientformerv2_release(state: Mapping[str, torch.Tensor]) -> bool:
    return "patch_embed.0.weight" in state and "network.0.0.mlp.fc1.weight" in state


def _attention_name(rest: str) -> str:
    for old, new in _RELEASE_ATTN:
        if rest.startswith(old):
            return new + rest.removeprefix(old)
    return rest  # talking_head{1,2}.*, attention_biases, q.local.* of an unwrapped conv


def _release_block_name(rest: str) -> str:
    """``{j}.<name>`` inside ``network.{2i}`` -> our name inside ``stages.{i}.blocks``."""
    block, name = rest.split(".", 1)
    if name.startswith("mlp."):
        part, tail = name.removeprefix("mlp.").split(".", 1)
        name = f"mlp.{_RELEASE_MLP[part]}.{tail}"
    elif name.startswith("token_mixer."):
        name = "token_mixer." + _attention_name(name.removeprefix("token_mixer."))
    elif name in ("layer_scale_1", "layer_scale_2"):
        name = f"ls{name[-1]}.gamma"
    return f"{block}.{name}"


def _release_downsample_name(rest: str) -> str:
    """``<name>`` inside ``network.{2i+1}`` (``Embedding``) -> our name inside ``stages.{i+1}.downsample``."""
    head, _, tail = rest.partition(".")
    if head in ("proj", "conv"):
        return f"conv.conv.{tail}"
    if head in ("norm", "bn"):
        return f"conv.bn.{tail}"
    return "attn." + _attention_name(tail)


def convert_efficientformerv2_release(state: StateDict) -> StateDict:
    """Release names -> ``backbone.``/``head.`` names (see ``backbones.weights``)."""
    out: StateDict = {}
    for key, value in state.items():
        if key.endswith("attention_bias_idxs"):
            continue
        if key.startswith("patch_embed."):
            index, tail = key.removeprefix("patch_embed.").split(".", 1)
            out[f"backbone.stem.{_RELEASE_STEM[index]}.{tail}"] = value
        elif m := _RELEASE_KEY.fullmatch(key):
            i, rest = int(m[1]), m[2]
            if i % 2 == 0:
                name = f"stages.{i // 2}.blocks.{_release_block_name(rest)}"
            else:
                name = f"stages.{i // 2 + 1}.downsample.{_release_downsample_name(rest)}"
            if name.endswith(".gamma"):
                value = value.flatten()  # [C, 1, 1] -> [C]
            out["backbone." + name] = value
        elif key.startswith("head."):
            out["head.fc." + key.removeprefix("head.")] = value
        elif key.startswith("dist_head."):
            out["head.fc_dist." + key.removeprefix("dist_head.")] = value
        else:  # norm.*
            out["backbone." + key] = value
    return out


register_format("timm-efficientformerv2", is_timm_efficientformerv2, convert_timm_classifier)
register_format("efficientformerv2-release", is_efficientformerv2_release, convert_efficientformerv2_release)
