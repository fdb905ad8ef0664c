"""Write tests/data/releases/timesformer/ with facebookresearch/TimeSformer's own code (not run by CI).

    git clone https://github.com/facebookresearch/TimeSformer /tmp/src/TimeSformer
    python -m venv --system-site-packages /tmp/envs/ts && /tmp/envs/ts/bin/pip install fvcore simplejson
    /tmp/envs/ts/bin/python tools/release_fixtures/timesformer.py --repo /tmp/src/TimeSformer

Tiny ``timesformer.models.vit.VisionTransformer`` networks (one per attention type; random initialisation, fixed seed,
every parameter perturbed) are held as ``model`` of a module, as the registered ``vit_base_patch16_224`` holds its
network, and written by the release's ``timesformer.utils.checkpoint.save_checkpoint`` (``epoch``, ``model_state``,
``optimizer_state``, ``cfg``): a ``.pyth`` file like the released ones. Their logits for a fixed clip are saved
beside them, and for the released configurations a manifest of every key and shape of ``vit_base_patch16_224``'s
state dict.

Three stand-ins, nothing else changed: ``torch._six`` (gone from PyTorch; ``vit_utils.py`` imports
``container_abcs`` from it) is a module whose ``container_abcs`` is ``collections.abc``;
``torch.nn.modules.linear._LinearWithBias`` (gone too; ``resnet_helper.py``, imported by the package, imports it) is
``nn.Linear``; and for the manifests ``timesformer.models.vit.load_pretrained`` (downloads ImageNet weights into the
network) does nothing.
"""

from __future__ import annotations

import argparse
import collections.abc
import json
import shutil
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

OUT = Path(__file__).resolve().parents[2] / "tests/data/releases/timesformer"
TINY = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 4, "qkv_bias": True,
        "num_frames": 4, "num_classes": 5, "drop_path_rate": 0.0}
ATTENTIONS = ("divided_space_time", "joint_space_time", "space_only")
# released configurations (configs/Kinetics/TimeSformer_*.yaml): name -> (frames, crop, attention)
RELEASES = {
    "TimeSformer_divST_8x32_224_K400": (8, 224, "divided_space_time"),
    "TimeSformer_divST_16x16_448_K400": (16, 448, "divided_space_time"),
    "TimeSformer_divST_96x4_224_K400": (96, 224, "divided_space_time"),
    "TimeSformer_jointST_8x32_224_K400": (8, 224, "joint_space_time"),
    "TimeSformer_spaceOnly_8x32_224_K400": (8, 224, "space_only"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repo", type=Path, required=True, help="a checkout of facebookresearch/TimeSformer")
    args = parser.parse_args()
    six = types.ModuleType("torch._six")
    six.container_abcs = collections.abc
    sys.modules["torch._six"] = six
    from torch.nn.modules import linear

    linear._LinearWithBias = nn.Linear  # gone from PyTorch; resnet_helper.py imports it
    sys.path.insert(0, str(args.repo))
    from functools import partial

    import timesformer.models.vit as release
    from timesformer.config.defaults import get_cfg
    from timesformer.utils.checkpoint import save_checkpoint

    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    clip = torch.randn(2, 3, TINY["num_frames"], 16, 16)
    np.save(OUT / "input.npy", clip.numpy())
    for attention in ATTENTIONS:
        holder = nn.Module()  # what vit_base_patch16_224 is: the network under ``model``
        holder.model = release.VisionTransformer(
            **TINY, attention_type=attention, norm_layer=partial(nn.LayerNorm, eps=1e-6)
        )
        with torch.no_grad():
            for p in holder.parameters():
                p.add_(torch.randn_like(p) * 0.2)
        holder.eval()
        with torch.no_grad():
            logits = holder.model(clip)
        cfg = get_cfg()
        cfg.NUM_GPUS, cfg.MODEL.NUM_CLASSES, cfg.DATA.NUM_FRAMES = 0, TINY["num_classes"], TINY["num_frames"]
        cfg.DATA.TRAIN_CROP_SIZE, cfg.TIMESFORMER.ATTENTION_TYPE = TINY["img_size"], attention
        optimizer = torch.optim.SGD(holder.parameters(), lr=0.005, momentum=0.9)
        with tempfile.TemporaryDirectory() as job:
            written = save_checkpoint(job, holder, optimizer, 14, cfg)
            shutil.copy(written, OUT / f"{attention}.pyth")
        np.save(OUT / f"{attention}_logits.npy", logits.numpy())
        print(attention, Path(written).name, len(holder.state_dict()), "tensors")
    release.load_pretrained = lambda *a, **k: None  # the manifests need no ImageNet weights
    manifests = {}
    for name, (frames, crop, attention) in RELEASES.items():
        cfg = get_cfg()
        cfg.NUM_GPUS, cfg.MODEL.NUM_CLASSES, cfg.DATA.NUM_FRAMES = 0, 400, frames
        cfg.DATA.TRAIN_CROP_SIZE, cfg.TIMESFORMER.ATTENTION_TYPE = crop, attention
        model = release.vit_base_patch16_224(cfg)  # on the CPU (0.5 GB): its init calls .item(), which meta refuses
        manifests[name] = {"num_frames": frames, "img_size": crop, "attention_type": attention, "num_classes": 400,
                           "keys": {k: list(v.shape) for k, v in model.state_dict().items()}}
    (OUT / "manifests.json").write_text(json.dumps(manifests, indent=0) + "\n")


if __name__ == "__main__":
    main()
