"""Any timm model as a Backbone, named ``timm:<model name>``.

The whole timm model is kept (classifier removed), so ``forward_pooled`` gives exactly the pooled
features of the architecture (XCiT's class-attention layers, MViTv2's pooling, ...), while ``forward``
returns feature maps through timm's ``forward_intermediates``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import timm
import torch

from .base import Backbone, FeatureInfo


class TimmBackbone(Backbone):
    """Wrap ``timm.create_model(model_name, num_classes=0, ...)`` behind our contract.

    Args:
        model_name: any name ``timm.list_models()`` knows.
        out_indices: indices into the model's ``feature_info`` (blocks or stages) that ``forward``
            returns; by default the deepest entry of every distinct stride.
        in_chans: input channels.
        **model_kwargs: passed on to the timm constructor (``drop_path_rate``, ``img_size``, ...).
    """

    def __init__(
        self, model_name: str, *, out_indices: Sequence[int] | None = None, in_chans: int = 3, **model_kwargs: Any
    ) -> None:
        super().__init__()
        if model_name not in timm.list_models():
            raise ValueError(f"timm has no model {model_name!r} (see timm.list_models('{model_name[:6]}*'))")
        self.model = timm.create_model(model_name, pretrained=False, num_classes=0, in_chans=in_chans, **model_kwargs)
        if not hasattr(self.model, "forward_intermediates"):
            raise ValueError(f"timm model {model_name!r} has no forward_intermediates, so no feature maps")
        self.model_name = model_name
        self.checkpoint_prefix = "model."  # timm's own state dicts load into self.model
        self.in_chans = in_chans
        self.num_features = getattr(self.model, "head_hidden_size", self.model.num_features)
        self.default_pool = "native"
        info = self.model.feature_info
        if out_indices is None:
            last_of_stride: dict[int, int] = {}
            for i, entry in enumerate(info):
                last_of_stride[entry["reduction"]] = i
            out_indices = sorted(last_of_stride.values())
        self.out_indices = [i % len(info) for i in out_indices]
        self.feature_info = [
            FeatureInfo(channels=info[i]["num_chs"], stride=(info[i]["reduction"],) * 2) for i in self.out_indices
        ]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.check_input(x)
        return self.model.forward_intermediates(x, indices=self.out_indices, intermediates_only=True, stop_early=True)

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The model's own pooled features ``[B, num_features]``, what its classifier would see."""
        self.check_input(x)
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def no_weight_decay(self) -> set[str]:
        names = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else set()  # timm's own duck-typing
        return {f"model.{n}" for n in names}
