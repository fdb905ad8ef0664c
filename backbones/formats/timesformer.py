"""Hugging Face transformers' TimeSformer checkpoints mapped onto the video ``VisionTransformer`` (TimeSformer).

``TimesformerForVideoClassification`` is the form most TimeSformer weights are published in today
(``facebook/timesformer-base-finetuned-k400`` ...); ``TimesformerModel`` is the same without the ``timesformer.``
prefix and the classifier. Names: ``embeddings.{cls_token,position_embeddings,time_embeddings}``,
``embeddings.patch_embeddings.projection`` (a per-frame 2-D convolution, our ``(1, p, p)`` 3-D one),
``encoder.layer.{i}.`` with ``temporal_layernorm``, ``temporal_attention.attention.qkv``,
``temporal_attention.output.dense`` and ``temporal_dense`` (our ``temporal_norm1``, ``temporal_attn``,
``temporal_fc``), then the ViT block names of ``hf_weights.py``; ``layernorm`` and ``classifier``. All three of its
attention types (``divided_space_time``, ``joint_space_time``, ``space_only``) are ours (``attention: divided``,
``joint``, ``space_only``). The original release's ``.pyth`` files are the ``timesformer-release`` format.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .hf import EMBEDDINGS, rename_block_key
from ..weights import StateDict, register_format

_PREFIXES = ("timesformer.", "")
_TEMPORAL = [  # checked before the ViT block names: ``temporal_attention.output.dense`` is not the MLP's ``output.dense``
    (".temporal_layernorm.", ".temporal_norm1."),
    (".temporal_attention.attention.qkv.", ".temporal_attn.qkv."),
    (".temporal_attention.output.dense.", ".temporal_attn.proj."),
    (".temporal_dense.", ".temporal_fc."),
]
_EMBEDDINGS = {**EMBEDDINGS, "embeddings.time_embeddings": "time_embed"}


def _prefix(state: Mapping[str, torch.Tensor]) -> str | None:
    return next((p for p in _PREFIXES if f"{p}embeddings.time_embeddings" in state), None)


def is_hf_timesformer(state: Mapping[str, torch.Tensor]) -> bool:
    return _prefix(state) is not None and any(k.endswith("patch_embeddings.projection.weight") for k in state)


def _block_key(local: str) -> str | None:
    """``encoder.layer.{i}.<name>`` -> ``blocks.{i}.<ours>``: the temporal branch here, the rest as a ViT block."""
    for theirs, ours in _TEMPORAL:
        head, found, tail = local.partition(theirs)  # "encoder.layer.3", ".temporal_dense.", "weight"
        if found:
            index = head.removeprefix("encoder.layer.")
            return f"blocks.{index}{ours}{tail}" if index.isdigit() else None
    return rename_block_key(local)


def convert_hf_timesformer(state: StateDict) -> StateDict:
    """``TimesformerForVideoClassification`` / ``TimesformerModel`` -> ``backbone.`` and ``head.fc.`` keys."""
    prefix = _prefix(state) or ""
    out: StateDict = {}
    for key, value in state.items():
        local = key.removeprefix(prefix)
        if key.startswith("classifier."):
            out["head.fc." + key.removeprefix("classifier.")] = value
        elif local in _EMBEDDINGS:
            if local == "embeddings.patch_embeddings.projection.weight" and value.ndim == 4:
                value = value.unsqueeze(2)  # per-frame 2-D kernel [C, 3, p, p] -> [C, 3, 1, p, p]
            out["backbone." + _EMBEDDINGS[local]] = value
        elif (name := _block_key(local)) is not None:
            out["backbone." + name] = value
        else:
            out["foreign." + key] = value
    return out


register_format("hf-timesformer", is_hf_timesformer, convert_hf_timesformer)
