"""The checkpoint format of the ViT-ResNAS release (yilunliao/vit-search), mapped onto ``ViTResNAS``.

The release keeps its modules in one flat list: ``blocks.{i}`` is either a transformer block (``norm1``,
``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``, our names too) or a spatial reduction
(``norm``, ``patch_reduce``, ``token_transform``, ``pos_embed``) that opens the next stage. The class token
is ``tokens``, the stem ``patch_embed.conv{1,2,3}.{conv,bn}`` and ``patch_embed.conv_proj``; the classifier
``cls_head`` maps onto our head's ``fc``, and the token-labelling ``patch_head`` (or a distillation
``dst_head``) has no counterpart and is reported. Training checkpoints wrap this under ``model`` (and
``model_ema``), which ``read_checkpoint`` unwraps.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..weights import StateDict, register_format

_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_REDUCTION_RENAMES = {"patch_reduce.": "conv.", "token_transform.": "token_proj."}


def is_vit_resnas_release(state: Mapping[str, torch.Tensor]) -> bool:
    return "tokens" in state and any(k.startswith("blocks.") and k.endswith(".patch_reduce.weight") for k in state)


def _stage_paths(state: Mapping[str, torch.Tensor]) -> dict[int, str]:
    """Our module path of each release ``blocks.{i}``: a reduction opens a new stage, blocks count within it."""
    indices = sorted({int(m[1]) for k in state if (m := _BLOCK.fullmatch(k))})
    paths, stage, block = {}, 0, 0
    for i in indices:
        if f"blocks.{i}.patch_reduce.weight" in state:
            stage, block = stage + 1, 0
            paths[i] = f"stages.{stage}.reduce"
        else:
            paths[i] = f"stages.{stage}.blocks.{block}"
            block += 1
    return paths


def convert_vit_resnas_release(state: StateDict) -> StateDict:
    """Release names -> ``backbone.``/``head.``/``foreign.`` names (see ``backbones.weights``)."""
    if state["tokens"].shape[1] != 1:
        raise ValueError(
            f"this ViT-ResNAS checkpoint has {state['tokens'].shape[1]} prefix tokens (a distillation model); "
            "ViTResNAS has the class token only"
        )
    paths = _stage_paths(state)
    out: StateDict = {}
    for key, value in state.items():
        if key == "tokens":
            out["backbone.cls_token"] = value
        elif key.startswith("patch_embed.conv_proj."):
            out["backbone.patch_embed.proj." + key.removeprefix("patch_embed.conv_proj.")] = value
        elif m := _BLOCK.fullmatch(key):
            rest = m[2]
            for old, new in _REDUCTION_RENAMES.items():
                if rest.startswith(old):
                    rest = new + rest.removeprefix(old)
            out[f"backbone.{paths[int(m[1])]}.{rest}"] = value
        elif key.startswith("cls_head."):
            out["head.fc." + key.removeprefix("cls_head.")] = value
        elif key.startswith(("patch_head.", "dst_head.")):
            out["foreign." + key] = value
        else:  # patch_embed.conv{1,2,3}.*, pos_embed, norm.*: our names
            out["backbone." + key] = value
    return out


register_format("vit-resnas-release", is_vit_resnas_release, convert_vit_resnas_release)
