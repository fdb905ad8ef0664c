"""Hugging Face transformers' ViT and DeiT checkpoints mapped onto ``VisionTransformer`` and its classification head.

Two key layouts are in circulation for the same models, and both load:

- the files on the Hub (``save_pretrained`` writes them still): ``{vit,deit}.embeddings.cls_token``,
  ``.position_embeddings``, ``.patch_embeddings.projection``, ``encoder.layer.{i}.attention.attention.{query,key,value}``,
  ``attention.output.dense``, ``intermediate.dense``, ``output.dense``, ``layernorm_before``/``_after``, ``layernorm``;
- transformers 5's ``state_dict()``: ``layers.{i}.attention.{q,k,v,o}_proj`` and ``mlp.fc1``/``fc2``.

``ViTModel`` / ``DeiTModel`` files have no prefix and add a ``pooler`` (reported, not loaded: our heads have none).
Classifiers: ``classifier`` (``ViTForImageClassification``, ``DeiTForImageClassification``) becomes the head's
``fc``; ``DeiTForImageClassificationWithTeacher``'s ``cls_classifier`` and ``distillation_classifier`` become
``fc`` and ``fc_dist`` of a distilled head, which averages the two at inference as transformers does
(``DeiTForImageClassification`` classifies the class token alone: its ``fc_dist`` is reported missing). Separate
query, key and value projections are concatenated into our ``qkv``. transformers' ViT and DeiT normalise with
``layer_norm_eps=1e-12`` where ours default to 1e-6 (a relative difference of about 1e-6 in the outputs); set
``backbone_kwargs: {norm_eps: 1e-12}`` to match to the last digit. The video counterpart is
``timesformer_weights.py``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..weights import StateDict, register_format

_PREFIXES = ("vit.", "deit.", "")
# per block, after ``encoder.layer.{i}.`` / ``layers.{i}.`` became ``blocks.{i}.``; first match wins
BLOCK_RULES = [
    (r"\.attention\.attention\.(query|key|value)\.", lambda m: f".attn.{m[1][0]}."),  # Hub: separate projections
    (r"\.attention\.(q|k|v)_proj\.", lambda m: f".attn.{m[1]}."),  # transformers 5
    (r"\.attention\.attention\.qkv\.", ".attn.qkv."),  # fused (TimeSformer)
    (r"\.attention\.(output\.dense|o_proj)\.", ".attn.proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
    (r"\.mlp\.(fc1|fc2)\.", r".mlp.\1."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
]
EMBEDDINGS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_CLASSIFIERS = {"classifier.": "head.fc.", "cls_classifier.": "head.fc.", "distillation_classifier.": "head.fc_dist."}
_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.")


def rename_block_key(key: str) -> str | None:
    """``encoder.layer.{i}.<HF name>`` or ``layers.{i}.<HF name>`` -> ``blocks.{i}.<ours>``; ``None`` for others."""
    m = _LAYER.match(key)
    if m is None:
        return None
    rest = "." + key[m.end():]
    for pattern, repl in BLOCK_RULES:
        new, hits = re.subn(pattern, repl, rest, count=1)
        if hits:
            return f"blocks.{m[1]}{new}"
    return None


def fuse_qkv(state: StateDict) -> StateDict:
    """Concatenate separate ``attn.q``/``attn.k``/``attn.v`` projections into ``attn.qkv`` (in that order)."""
    for key in [k for k in state if ".attn.q." in k]:
        parts = [state.pop(key.replace(".attn.q.", f".attn.{p}.")) for p in "qkv"]
        state[key.replace(".attn.q.", ".attn.qkv.")] = torch.cat(parts)
    return state


def _prefix(state: Mapping[str, torch.Tensor]) -> str | None:
    return next((p for p in _PREFIXES if f"{p}embeddings.patch_embeddings.projection.weight" in state), None)


def is_hf_vit(state: Mapping[str, torch.Tensor]) -> bool:
    prefix = _prefix(state)
    return prefix is not None and f"{prefix}embeddings.time_embeddings" not in state  # that one is TimeSformer


def convert_hf_vit(state: StateDict) -> StateDict:
    """``ViTModel``, ``ViTForImageClassification``, ``DeiTModel``, ``DeiTForImageClassification(WithTeacher)``."""
    prefix = _prefix(state) or ""
    out: StateDict = {}
    for key, value in state.items():
        head = next((c for c in _CLASSIFIERS if key.startswith(c)), None)
        local = key.removeprefix(prefix)
        if head is not None:
            out[_CLASSIFIERS[head] + key.removeprefix(head)] = value
        elif local in EMBEDDINGS:
            out["backbone." + EMBEDDINGS[local]] = value
        elif (name := rename_block_key(local)) is not None:
            out["backbone." + name] = value
        else:  # the pooler of ViTModel/DeiTModel, a masked-image-modeling decoder
            out["foreign." + key] = value
    return fuse_qkv(out)


register_format("hf-vit", is_hf_vit, convert_hf_vit)
