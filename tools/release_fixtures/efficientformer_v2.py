"""Write tests/data/releases/efficientformer_v2/ with snap-research/EfficientFormer's own code (not run by CI).

    git clone https://github.com/snap-research/EfficientFormer /tmp/src/EfficientFormer
    python tools/release_fixtures/efficientformer_v2.py --repo /tmp/src/EfficientFormer   # the installed torch, timm

A tiny ``models/efficientformer_v2.py`` ``EfficientFormerV2`` (random initialisation after ``torch.manual_seed(0)``,
every parameter and BatchNorm statistic then perturbed) is saved as the release's ``main.py`` saves checkpoints, the
state dict under ``model`` (``eformer_s0_450.pth`` ... hold the same), with its eval-mode logits (the mean of the
classifier and the distillation classifier) for a fixed input; and for the four released networks
(``efficientformerv2_s0/s1/s2/l``) a manifest of every key and shape of the state dict.

The file is loaded by path (``models/__init__.py`` would also import the first EfficientFormer). It imports
``to_2tuple`` from ``timm.models.layers.helpers``, which timm 1.x no longer has: a module of that name holding
``timm.layers.to_2tuple`` stands in; nothing else is changed (timm warns that ``register_model`` overwrites its own
``efficientformerv2_*`` entries).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
from random_weights import randomise  # this folder's (python tools/release_fixtures/<name>.py)

OUT = Path(__file__).resolve().parents[2] / "tests/data/releases/efficientformer_v2"
TINY = {"layers": [1, 1, 2, 2], "embed_dims": [8, 16, 24, 32], "downsamples": [True] * 5, "vit_num": 1,
        "num_classes": 5, "resolution": 64, "e_ratios": {"0": [2], "1": [2], "2": [2, 3], "3": [3, 2]}}
RELEASES = ("efficientformerv2_s0", "efficientformerv2_s1", "efficientformerv2_s2", "efficientformerv2_l")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repo", type=Path, required=True, help="a checkout of snap-research/EfficientFormer")
    args = parser.parse_args()
    import timm.layers

    helpers = types.ModuleType("timm.models.layers.helpers")
    helpers.to_2tuple = timm.layers.to_2tuple
    sys.modules["timm.models.layers.helpers"] = helpers
    spec = importlib.util.spec_from_file_location("efficientformer_v2", args.repo / "models/efficientformer_v2.py")
    release = importlib.util.module_from_spec(spec)
    sys.modules["efficientformer_v2"] = release  # register_model looks the module up
    spec.loader.exec_module(release)

    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = release.EfficientFormerV2(**TINY)
    randomise(model)
    model.eval()
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(image)
    np.save(OUT / "input.npy", image.numpy())
    np.save(OUT / "tiny_logits.npy", logits.numpy())
    torch.save({"model": model.state_dict()}, OUT / "tiny.pth")
    print("tiny.pth", len(model.state_dict()), "tensors", sum(p.numel() for p in model.parameters()), "parameters")
    manifests = {}
    for name in RELEASES:
        full = getattr(release, name)()
        manifests[name] = {"num_classes": 1000, "keys": {k: list(v.shape) for k, v in full.state_dict().items()}}
    (OUT / "manifests.json").write_text(json.dumps(manifests, indent=0) + "\n")


if __name__ == "__main__":
    main()
