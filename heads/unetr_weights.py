"""MONAI's ``UNETR`` decoder mapped onto ``UnetrDecoder``'s names.

``backbones/unetr.py`` reads the ViT of a MONAI UNETR file and hands the decoder on as ``foreign.<its own key>``;
``load_pretrained`` passes those keys (without the prefix) to the map registered here and loads what it returns
under ``head.``. Only the module name changes; the rest of each key (MONAI's own blocks) is the same.
"""

from __future__ import annotations

from backbones.weights import StateDict, register_head_map

# MONAI's UNETR module -> ours: encoder1 reads the input, encoder2..4 bring the shallower maps up, decoder5..2
# climb from the deepest map
_MODULES = {
    "encoder1": "input_block",
    "encoder2": "skip_blocks.0",
    "encoder3": "skip_blocks.1",
    "encoder4": "skip_blocks.2",
    "decoder5": "up_blocks.0",
    "decoder4": "up_blocks.1",
    "decoder3": "up_blocks.2",
    "decoder2": "up_blocks.3",
    "out": "out",
}


def monai_unetr_head(state: StateDict) -> StateDict:
    out: StateDict = {}
    for key, value in state.items():
        module, _, rest = key.partition(".")
        if module in _MODULES:
            out[f"{_MODULES[module]}.{rest}"] = value
    return out


register_head_map("monai-unetr", monai_unetr_head)
