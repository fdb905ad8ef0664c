"""Backbones behind one contract (see ``base.py``) and a registry of named presets (``registry.py``)."""

from __future__ import annotations

from .base import Backbone, FeatureInfo
from .registry import build_preset, create_backbone, list_backbones, register

from . import vit  # noqa: E402,F401  (registers the presets)
from .formats import hf, timesformer  # noqa: E402,F401  (transformers' ViT, DeiT and TimeSformer formats)
from .formats import big_vision  # noqa: E402,F401  (big_vision's .npz ViT checkpoint format)
from . import unetr  # noqa: E402,F401  (UNETR encoder preset, MONAI checkpoint format)
from . import mix_transformer  # noqa: E402,F401
from . import vit_resnas  # noqa: E402,F401  (ViT-ResNAS presets, release checkpoint format)
from . import efficientformer_v2  # noqa: E402,F401  (EfficientFormerV2 presets, timm and release formats)
from . import vit_resnas_supernet  # noqa: E402,F401  (ViT-ResNAS super-networks)
from . import efficientformer_v2_supernet  # noqa: E402,F401  (EfficientFormerV2 super-networks)
from . import token_pruning  # noqa: E402,F401  (registers the dynamicvit token reduction)
from .formats import dynamicvit  # noqa: E402,F401  (the DynamicViT release's checkpoint format)
from . import token_merging  # noqa: E402,F401  (registers the tome token reduction)

__all__ = ["Backbone", "FeatureInfo", "build_preset", "create_backbone", "list_backbones", "register"]
