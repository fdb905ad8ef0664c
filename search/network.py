"""The super-network a search runs over and its sub-networks as classifiers.

The super-network comes from a Lightning checkpoint of a classification run (``python -m tasks.classification fit``
over a super-network preset), read without the task that wrote it: its ``hyper_parameters`` name the backbone
(``backbone``, ``backbone_kwargs``) and the head (``pool``, ``num_classes``), its ``state_dict`` holds their
weights (``backbone.*``, ``head.*``), loaded into a ``heads.classification.Classifier``. The file is read with
``torch.load(weights_only=True)``: no code in it runs.

A sub-network's classifier is the extracted backbone under a head built for it by the backbone's own facts
(``num_prefix_tokens``, the head's pooling), its classifier sliced to the sub-network's width: the super-network
zeroes the channels a sub-network does not use, so both give the same logits.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backbones import create_backbone
from backbones.base import Supernet
from heads.classification import Classifier, classification_head


@dataclass
class SupernetCheckpoint:
    """A super-network with its classifier (``network``, in eval mode), the hyperparameters of the run that trained
    it (``hparams``, its recipe) and of its data (``data_hparams``)."""

    path: Path
    network: Classifier
    hparams: dict[str, Any]
    data_hparams: dict[str, Any]

    @property
    def supernet(self) -> Supernet:
        return self.network.backbone  # type: ignore[return-value]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint's content, read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {path}: no such file")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"--ckpt_path {path} holds pickled objects beyond tensors and plain types, which a search does "
                         f"not load: give the checkpoint of a classification run ({err})") from err
    if not isinstance(content, dict) or not isinstance(content.get("state_dict"), dict) or "hyper_parameters" not in content:
        raise ValueError(f"--ckpt_path {path} is not a Lightning checkpoint of a classification run (no state_dict and "
                         "hyper_parameters)")
    return content


def load_supernet(ckpt_path: str | Path, expected: str) -> SupernetCheckpoint:
    """The checkpoint's super-network and classifier; refused unless its backbone is the super-network preset
    ``expected`` under a head whose classifier can be sliced (pool ``cls``, ``avg`` or ``native``, no distillation
    classifier)."""
    content = read_checkpoint(ckpt_path)
    hparams = {k: v for k, v in content["hyper_parameters"].items() if not k.startswith("_")}
    name = hparams.get("backbone")
    if name != expected:
        raise ValueError(f"checkpoint {ckpt_path} holds backbone {name!r}, but this search is over the super-network "
                         f"{expected!r}: search it with a config for {name!r}, or give a {expected!r} checkpoint")
    if hparams.get("token_pruning") or hparams.get("token_reduction"):
        raise ValueError(f"checkpoint {ckpt_path}: a token-reducing network is not a super-network to search")
    backbone = create_backbone(name, **(hparams.get("backbone_kwargs") or {}))
    if not isinstance(backbone, Supernet):
        raise ValueError(f"checkpoint {ckpt_path}: backbone {name!r} is a {type(backbone).__name__}, not a super-network "
                         "(backbones.base.Supernet) to search")
    head = classification_head(backbone, hparams["num_classes"], hparams.get("pool"), hparams.get("head_drop_rate", 0.0))
    if head.pool == "map" or head.fc_dist is not None:
        raise ValueError("a sub-network's classifier is sliced from the super-network's: pool cls, avg or native "
                         f"without distillation head, got pool {head.pool!r}"
                         + (" with a distillation head" if head.fc_dist is not None else ""))
    network = Classifier(backbone, head)
    state = {k: v for k, v in content["state_dict"].items() if k.startswith(("backbone.", "head."))}
    network.load_state_dict(state, strict=True)
    data_hparams = {k: v for k, v in content.get("datamodule_hyper_parameters", {}).items() if not k.startswith("_")}
    return SupernetCheckpoint(Path(ckpt_path), network.eval(), hparams, data_hparams)


def subnet_classifier(network: Classifier, config: Any) -> Classifier:
    """The sub-network ``config`` of ``network``'s super-network with its classifier, weights sliced (copies)."""
    supernet: Supernet = network.backbone  # type: ignore[assignment]
    backbone = supernet.extract(config).eval()
    head = classification_head(backbone, network.head.fc.out_features, network.head.pool)
    width = backbone.num_features
    with torch.no_grad():
        head.fc.weight.copy_(network.head.fc.weight[:, :width])
        head.fc.bias.copy_(network.head.fc.bias)
    return Classifier(backbone, head).eval()


@torch.no_grad()
def top1(network: nn.Module, batches: Any) -> float:
    correct = total = 0
    for batch in batches:
        x, y = (batch["input"], batch["target"]) if isinstance(batch, dict) else batch
        correct += int((network(x).argmax(-1) == y).sum())
        total += len(y)
    return correct / total


@torch.no_grad()
def recalibrate_batchnorm(network: nn.Module, batches: Any) -> None:
    """Re-estimate every BatchNorm's running statistics (a cumulative average) on ``batches`` in training mode (where
    the network normalises as it trained); leaves eval mode."""
    norms = [m for m in network.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    network.train()
    for x, _ in batches:
        network(x)
    for m in norms:
        m.momentum = 0.1
    network.eval()


class Fitness:
    """A sub-network's hold-out top-1: extracted, its BatchNorm statistics re-estimated on ``calibration`` (when
    given), scored on ``batches``; each architecture scored once."""

    def __init__(self, network: Classifier, batches: Any, calibration: Any = ()) -> None:
        self.network, self.batches, self.calibration = network, batches, calibration
        self.scores: dict[str, float] = {}

    @property
    def supernet(self) -> Supernet:
        return self.network.backbone  # type: ignore[return-value]

    def classifier(self, config: Any) -> Classifier:
        """The sub-network as it is scored (and written as the found network)."""
        network = subnet_classifier(self.network, config)
        if self.calibration:
            recalibrate_batchnorm(network, self.calibration)
        return network

    def __call__(self, config: Any) -> float:
        key = json.dumps(self.supernet.describe(config), sort_keys=True)
        if key not in self.scores:
            self.scores[key] = top1(self.classifier(config), self.batches)
        return self.scores[key]
