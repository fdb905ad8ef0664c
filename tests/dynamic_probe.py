"""Test doubles for the dynamic-network hooks, importable by CLI subprocesses (``--trainer.callbacks+=...``):
a ViT whose depth is drawn each step, a ViT that leaves an auxiliary loss, and a callback recording the draws."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import lightning as L
import torch

from backbones import list_backbones

from backbones import register
from backbones.vit import VisionTransformer


class DepthDrawingViT(VisionTransformer):
    """A ViT whose active depth (1..depth) is its dynamic choice."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.active_depth = len(self.blocks)

    def sample_subnet(self, generator: torch.Generator) -> int:
        return int(torch.randint(1, len(self.blocks) + 1, (1,), generator=generator))

    def set_subnet(self, config: int | None) -> None:
        self.active_depth = len(self.blocks) if config is None else int(config)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        x, grid = self.embed(x)
        for i in range(self.active_depth):
            x = self.run_block(i, x, grid)
        return self.norm(x)


class TokenNormViT(VisionTransformer):
    """A ViT that leaves the mean squared token as an auxiliary loss ``token_norm`` (default weight 0.1)."""

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        tokens = super().forward_tokens(x)
        self.add_auxiliary_loss("token_norm", tokens.pow(2).mean(), weight=0.1)
        return tokens


if "probe_depth_drawing_vit" not in list_backbones():

    @register
    def probe_depth_drawing_vit(**kwargs: Any) -> DepthDrawingViT:
        return DepthDrawingViT(**{"patch_size": 16, "embed_dim": 48, "depth": 4, "num_heads": 2, **kwargs})

    @register
    def probe_token_norm_vit(**kwargs: Any) -> TokenNormViT:
        return TokenNormViT(**{"patch_size": 16, "embed_dim": 48, "depth": 1, "num_heads": 2, **kwargs})


class RecordSubnets(L.Callback):
    """Append ``epoch batch choice`` of every training step to ``<path>.rank<r>``: the backbone's ``attribute``
    (an int, or a CRC of its repr for a super-network's list of sub-network configs)."""

    def __init__(self, path: str, attribute: str = "active_depth") -> None:
        self.path, self.attribute = path, attribute

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        value = getattr(pl_module.backbone, self.attribute)
        choice = value if isinstance(value, int) else zlib.crc32(repr(value).encode())
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            f.write(f"{trainer.current_epoch} {batch_idx} {choice}\n")


def read_records(path: Path, rank: int = 0) -> dict[tuple[int, int], int]:
    lines = Path(f"{path}.rank{rank}").read_text().split()
    values = [int(v) for v in lines]
    return {(values[i], values[i + 1]): values[i + 2] for i in range(0, len(values), 3)}
