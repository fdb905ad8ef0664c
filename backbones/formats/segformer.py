"""Checkpoint formats of MiT encoders and SegFormer models, mapped onto ``mit_*`` and ``SegFormerHead``.

Three families of files are in circulation, each for a bare encoder (ImageNet MiT) and a full model:

- NVlabs/SegFormer (mmseg 0.x): ``patch_embed1.proj``, ``block1.0.attn.q``/``attn.kv``/``attn.sr``,
  ``mlp.dwconv.dwconv``, ``norm1``..``norm4``; full models prefix ``backbone.`` and add
  ``decode_head.linear_c{1..4}.proj``, ``decode_head.linear_fuse.conv``/``.bn``, ``decode_head.linear_pred``.
- segmentation-models-pytorch: the NVlabs encoder names under ``encoder.``, then
  ``decoder.mlp_stage.{i}.linear`` (deepest first), ``decoder.fuse_stage.{0,1}``, ``segmentation_head.0``.
- Hugging Face transformers: ``segformer.encoder.block.{i}.{j}.attention.self.query`` ... as on the Hub, and
  the ``segformer.stages.{i}.blocks.{j}.attention.q_proj`` names of transformers 5's ``state_dict()``;
  separate key and value projections are concatenated into our ``kv``.

Every converter returns ``backbone.stages.{i}...`` keys for the encoder, ``head.fc`` for an ImageNet classifier
and ``foreign.<the file's own key>`` for a full model's decoder, the namespace of ``backbones.weights.load_pretrained``;
the decoder's names are mapped onto ``SegFormerHead`` next to it, in ``heads/segformer_weights.py``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..weights import StateDict, register_format

# NVlabs encoder names (also smp's, under ``encoder.``) -> ours, applied to the key after its prefix.
_NVLABS_ENCODER = [
    (r"^patch_embed(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.patch_embed."),
    (r"^block(\d)\.(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}."),
    (r"^norm(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.norm."),
]
# Hugging Face names (Hub files and transformers 5) -> ours, applied after ``segformer.`` is removed.
_HF_ENCODER = [
    (r"^encoder\.patch_embeddings\.(\d)\.layer_norm\.", r"stages.\1.patch_embed.norm."),
    (r"^encoder\.patch_embeddings\.(\d)\.", r"stages.\1.patch_embed."),
    (r"^stages\.(\d)\.patch_embeddings\.layer_norm\.", r"stages.\1.patch_embed.norm."),
    (r"^stages\.(\d)\.patch_embeddings\.", r"stages.\1.patch_embed."),
    (r"^encoder\.block\.(\d)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"^encoder\.layer_norm\.(\d)\.", r"stages.\1.norm."),
    (r"^(stages\.\d)\.layer_norm\.", r"\1.norm."),
    (r"\.(layer_norm_1|layernorm_before)\.", ".norm1."),
    (r"\.(layer_norm_2|layernorm_after)\.", ".norm2."),
    (r"\.attention\.(self\.query|q_proj)\.", ".attn.q."),
    (r"\.attention\.(self\.key|k_proj)\.", ".attn.k."),
    (r"\.attention\.(self\.value|v_proj)\.", ".attn.v."),
    (r"\.attention\.(self\.sr|sequence_reduction\.sequence_reduction)\.", ".attn.sr."),
    (r"\.attention\.(self\.layer_norm|sequence_reduction\.layer_norm)\.", ".attn.norm."),
    (r"\.attention\.(output\.dense|o_proj)\.", ".attn.proj."),
    (r"\.mlp\.dense1\.", ".mlp.fc1."),
    (r"\.mlp\.dense2\.", ".mlp.fc2."),
]
_HF_CLASSIFIER = "classifier."  # SegformerForImageClassification


def _rename(key: str, rules: list) -> str | None:
    """Apply every matching rule in order; ``None`` when none matched."""
    out = key
    for pattern, repl in rules:
        out = re.sub(pattern, repl, out)
    return out if out != key else None


def _mit_encoder(state: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """NVlabs encoder keys under ``prefix`` -> ``backbone.stages...``; ``mlp.dwconv.dwconv`` loses a level."""
    out: StateDict = {}
    for key, value in state.items():
        if key.startswith(prefix) and (name := _rename(key.removeprefix(prefix), _NVLABS_ENCODER)):
            out["backbone." + name.replace("mlp.dwconv.dwconv.", "mlp.dwconv.")] = value
    return out


def _merge_kv(state: StateDict) -> StateDict:
    """Concatenate separate ``attn.k``/``attn.v`` projections into our ``attn.kv`` (keys first)."""
    for key in [k for k in state if ".attn.k." in k]:
        value = state.pop(key.replace(".attn.k.", ".attn.v."))
        state[key.replace(".attn.k.", ".attn.kv.")] = torch.cat([state.pop(key), value])
    return state


# --- NVlabs / mmseg 0.x ----------------------------------------------------------------------------------


def _is_nvlabs(state: Mapping[str, torch.Tensor]) -> bool:
    return "patch_embed1.proj.weight" in state or "backbone.patch_embed1.proj.weight" in state


def _convert_nvlabs(state: StateDict) -> StateDict:
    """A SegFormer from NVlabs/mmseg (``backbone.`` + ``decode_head.``) or a bare ImageNet MiT."""
    full = "backbone.patch_embed1.proj.weight" in state
    out = _mit_encoder(state, "backbone." if full else "")
    for key, value in state.items():
        if full and not key.startswith("backbone."):  # decode_head.*, auxiliary heads
            out["foreign." + key] = value
        elif not full and key.startswith("head."):  # the ImageNet classifier
            out["head.fc." + key.removeprefix("head.")] = value
    return out


# --- segmentation-models-pytorch -------------------------------------------------------------------------


def _is_smp(state: Mapping[str, torch.Tensor]) -> bool:
    return "encoder.patch_embed1.proj.weight" in state


def _convert_smp(state: StateDict) -> StateDict:
    """``smp.Segformer(encoder_name="mit_b*")``; its decoder lists the stages deepest first."""
    out = _mit_encoder(state, "encoder.")
    out.update({"foreign." + k: v for k, v in state.items() if not k.startswith("encoder.")})
    return out


# --- Hugging Face transformers ----------------------------------------------------------------------------


_HF_MODEL_KEYS = ("encoder.patch_embeddings.0.proj.weight", "stages.0.patch_embeddings.proj.weight")  # SegformerModel


def _is_hf(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("segformer.encoder.patch_embeddings.", "segformer.stages.")) for k in state) or any(
        k in state for k in _HF_MODEL_KEYS
    )


def _convert_hf(state: StateDict) -> StateDict:
    """``SegformerForSemanticSegmentation`` / ``SegformerForImageClassification`` / ``SegformerModel`` (the encoder
    alone, its names without the ``segformer.`` prefix)."""
    if any(k in state for k in _HF_MODEL_KEYS):
        state = {f"segformer.{k}": v for k, v in state.items()}
    out: StateDict = {}
    for key, value in state.items():
        local = key.removeprefix("segformer.")
        if key.startswith("segformer.") and (name := _rename(local, _HF_ENCODER) or local).startswith("stages."):
            out["backbone." + name.replace("mlp.dwconv.dwconv.", "mlp.dwconv.")] = value
        elif key.startswith(_HF_CLASSIFIER):
            out["head.fc." + key.removeprefix(_HF_CLASSIFIER)] = value
        elif not key.startswith("segformer."):  # decode_head.*
            out["foreign." + key] = value
    return _merge_kv(out)


# the final upsampling: mmseg and transformers' post-processing resize with align_corners=False, smp's head with True
register_format("segformer-nvlabs", _is_nvlabs, _convert_nvlabs, align_corners=False)
register_format("segformer-smp", _is_smp, _convert_smp, align_corners=True)
register_format("segformer-hf", _is_hf, _convert_hf, align_corners=False)
