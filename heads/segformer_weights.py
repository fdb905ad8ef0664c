"""The decoders of full SegFormer checkpoints mapped onto ``SegFormerHead``'s names, one key map per format.

``backbones/segformer_weights.py`` reads each file's encoder and hands the rest on as ``foreign.<its own key>``;
``load_pretrained`` passes those keys (without the prefix) to the map registered here for the file's format and
loads what it returns under ``head.``. Keys a map leaves out (mmseg's unused ``conv_seg``) are not loaded.

- NVlabs/SegFormer (mmseg 0.x): ``decode_head.linear_c{1..4}.proj``, ``decode_head.linear_fuse.conv``/``.bn``,
  ``decode_head.linear_pred``.
- segmentation-models-pytorch: ``decoder.mlp_stage.{i}.linear`` (deepest map first), ``decoder.fuse_stage.0``
  (convolution) and ``.1`` (BatchNorm), ``segmentation_head.0``.
- Hugging Face transformers: ``decode_head.linear_c.{i}.proj`` (``linear_projections`` in transformers 5),
  ``decode_head.linear_fuse``, ``decode_head.batch_norm``, ``decode_head.classifier``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from backbones.weights import StateDict, register_head_map

Rules = list[tuple[str, str | Callable[[re.Match[str]], str]]]

_NVLABS = [
    (r"^decode_head\.linear_c(\d)\.proj\.", lambda m: f"linear.{int(m[1]) - 1}."),
    (r"^decode_head\.linear_fuse\.conv\.", "fuse."),
    (r"^decode_head\.linear_fuse\.bn\.", "norm."),
    (r"^decode_head\.linear_pred\.", "classifier."),
]
_HF = [
    (r"^decode_head\.(linear_c|linear_projections)\.(\d)\.proj\.", r"linear.\2."),
    (r"^decode_head\.linear_fuse\.", "fuse."),
    (r"^decode_head\.batch_norm\.", "norm."),
    (r"^decode_head\.classifier\.", "classifier."),
]
_SMP = [
    (r"^decoder\.fuse_stage\.0\.", "fuse."),
    (r"^decoder\.fuse_stage\.1\.", "norm."),
    (r"^segmentation_head\.0\.", "classifier."),
]


def rename_by_rules(state: StateDict, rules: Rules) -> StateDict:
    """Each key renamed by the first rule that matches it; keys no rule matches are left out."""
    out: StateDict = {}
    for key, value in state.items():
        for pattern, repl in rules:
            name, hits = re.subn(pattern, repl, key, count=1)
            if hits:
                out[name] = value
                break
    return out


def nvlabs_head(state: StateDict) -> StateDict:
    return rename_by_rules(state, _NVLABS)


def hf_head(state: StateDict) -> StateDict:
    return rename_by_rules(state, _HF)


def smp_head(state: StateDict) -> StateDict:
    """smp lists the decoder's per-map projections deepest first; ``SegFormerHead`` shallow to deep."""
    stages = {int(m[1]) for k in state if (m := re.match(r"decoder\.mlp_stage\.(\d+)\.", k))}
    linear: Rules = [(r"^decoder\.mlp_stage\.(\d+)\.linear\.", lambda m: f"linear.{len(stages) - 1 - int(m[1])}.")]
    return rename_by_rules(state, linear + _SMP)


register_head_map("segformer-nvlabs", nvlabs_head)
register_head_map("segformer-hf", hf_head)
register_head_map("segformer-smp", smp_head)
