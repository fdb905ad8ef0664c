"""The DynamicViT release's checkpoints (raoyongming/DynamicViT ``models/dyvit.py``), mapped onto a ViT with token pruning.

``VisionTransformerDiffPruning`` is timm's DeiT under timm's names (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.{i}``, ``norm``, ``head``: ours) plus one ``PredictorLG`` per pruning stage, ``score_predictor.{s}``:
``in_conv`` (LayerNorm, Linear, GELU) and ``out_conv`` (Linear, GELU, Linear, GELU, Linear, LogSoftmax), which are
our ``KeepPredictor``'s ``embed`` and ``score`` with the same indices. The release saves the state dict under
``model`` (``model_ema`` beside it), which ``read_checkpoint`` unwraps. Load it into a backbone made a DynamicViT
(``token_pruning: true`` with the release's ``keep_ratio`` and ``prune_at``: 0.7 and 3, 6, 9 for its DeiT models);
into a plain ViT the predictors are reported as unexpected.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..weights import StateDict, convert_timm_classifier, register_format

_PARTS = {"in_conv": "embed", "out_conv": "score"}


def is_dynamicvit_release(state: Mapping[str, torch.Tensor]) -> bool:
    return "patch_embed.proj.weight" in state and "score_predictor.0.in_conv.0.weight" in state


def convert_dynamicvit_release(state: StateDict) -> StateDict:
    """``score_predictor.{s}.{in_conv,out_conv}.*`` -> ``backbone.predictors.{s}.{embed,score}.*``; the rest as timm's."""
    out = convert_timm_classifier({k: v for k, v in state.items() if not k.startswith("score_predictor.")})
    for key, value in state.items():
        if key.startswith("score_predictor."):
            stage, part, rest = key.removeprefix("score_predictor.").split(".", 2)
            out[f"backbone.predictors.{stage}.{_PARTS[part]}.{rest}"] = value
    return out


register_format("dynamicvit-release", is_dynamicvit_release, convert_dynamicvit_release)
