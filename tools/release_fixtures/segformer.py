"""Write tests/data/releases/segformer/ with NVlabs/SegFormer's own code (not run by CI).

    git clone https://github.com/NVlabs/SegFormer /tmp/src/SegFormer
    python -m venv --system-site-packages /tmp/envs/sf
    /tmp/envs/sf/bin/pip install "setuptools<70" wheel
    /tmp/envs/sf/bin/pip install --no-build-isolation mmcv==1.2.7 attrs    # the release's mmcv (without its CUDA ops)
    /tmp/envs/sf/bin/python tools/release_fixtures/segformer.py --repo /tmp/src/SegFormer

A tiny SegFormer of the release (``mmseg/models/segmentors/encoder_decoder.py`` ``EncoderDecoder`` over
``mmseg/models/backbones/mix_transformer.py`` ``MixVisionTransformer`` and
``mmseg/models/decode_heads/segformer_head.py`` ``SegFormerHead``; random initialisation after
``torch.manual_seed(0)``, every parameter and BatchNorm statistic then perturbed) is saved by mmcv's
``save_checkpoint`` (``meta`` + ``state_dict``, as the released ``segformer.b*.*.pth`` files), with its logits for a fixed
input (``encode_decode``: the decoder at 1/4, resized to the input as mmseg's whole-image inference does). Its encoder
alone is saved as the released ImageNet MiT files are (``mit_b0.pth``...: a bare state dict), with its four maps.
For the six released encoders (``mit_b0`` ... ``mit_b5``) and the released B0/B1..B5 SegFormers (ADE20K, 150 classes,
decoder width 256 for B0, 768 for the others) a manifest of every key and shape.

The package ``__init__`` files of ``mmseg.models``, ``mmseg.models.backbones`` and ``mmseg.models.decode_heads`` import
every model, some of which need mmcv's compiled CUDA operators (``mmcv._ext``); those three packages are entered
without running their ``__init__`` (a module object whose ``__path__`` is the package directory), and the tiny
backbone class is registered with the release's ``BACKBONES`` registry under its own name; and mmcv 1.2.7's
``build_norm_layer`` calls ``SyncBatchNorm._specify_ddp_gpu_num(1)``, a method PyTorch 1.8 dropped (it only stored the
number), so ``nn.SyncBatchNorm`` gets one that does nothing. Nothing else is changed.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from functools import partial
from pathlib import Path

import numpy as np
import torch
from random_weights import randomise  # this folder's (python tools/release_fixtures/<name>.py)
from torch import nn

OUT = Path(__file__).resolve().parents[2] / "tests/data/releases/segformer"
TINY = {"embed_dims": [8, 16, 24, 32], "num_heads": [1, 2, 3, 4], "mlp_ratios": [4, 4, 4, 4], "qkv_bias": True,
        "depths": [1, 1, 1, 1], "sr_ratios": [8, 4, 2, 1]}
ENCODERS = ("mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5")
WIDTHS = {"mit_b0": [32, 64, 160, 256]}  # the others: 64, 128, 320, 512


def head_cfg(in_channels: list[int], embed_dim: int, num_classes: int, channels: int = 128) -> dict:
    """``decode_head`` of local_configs/segformer/B*/segformer.b*.512x512.ade.160k.py."""
    return {
        "type": "SegFormerHead", "in_channels": in_channels, "in_index": [0, 1, 2, 3], "feature_strides": [4, 8, 16, 32],
        "channels": channels, "dropout_ratio": 0.1, "num_classes": num_classes, "norm_cfg": {"type": "SyncBN", "requires_grad": True},
        "align_corners": False, "decoder_params": {"embed_dim": embed_dim},
        "loss_decode": {"type": "CrossEntropyLoss", "use_sigmoid": False, "loss_weight": 1.0},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repo", type=Path, required=True, help="a checkout of NVlabs/SegFormer")
    args = parser.parse_args()
    sys.path.insert(0, str(args.repo))
    for package in ("mmseg.models", "mmseg.models.backbones", "mmseg.models.decode_heads"):
        module = types.ModuleType(package)  # the package, without its __init__ (which imports every model)
        module.__path__ = [str(args.repo / package.replace(".", "/"))]
        sys.modules[package] = module
    import mmcv
    from mmcv.runner import save_checkpoint
    from mmseg.models.backbones import mix_transformer
    from mmseg.models.builder import BACKBONES
    from mmseg.models.decode_heads import segformer_head  # noqa: F401  (registers SegFormerHead)
    from mmseg.models.segmentors.encoder_decoder import EncoderDecoder

    BACKBONES.register_module(module=mix_transformer.MixVisionTransformer)
    # mmcv 1.2.7's build_norm_layer calls SyncBatchNorm._specify_ddp_gpu_num(1), a method PyTorch 1.8 dropped
    nn.SyncBatchNorm._specify_ddp_gpu_num = lambda self, gpu_size: None
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = EncoderDecoder(
        backbone=dict(type="MixVisionTransformer", **TINY, norm_layer=partial(nn.LayerNorm, eps=1e-6)),
        decode_head=head_cfg(TINY["embed_dims"], embed_dim=16, num_classes=5, channels=16),
        test_cfg={"mode": "whole"},
    )
    randomise(model)
    model.eval()
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = model.backbone(image)
        logits = model.encode_decode(image, [{}] * 2)
    np.save(OUT / "input.npy", image.numpy())
    np.savez(OUT / "mit_tiny_maps.npz", *[m.numpy() for m in maps])
    np.save(OUT / "segformer_tiny_logits.npy", logits.numpy())
    torch.save(model.backbone.state_dict(), OUT / "mit_tiny.pth")
    save_checkpoint(model, str(OUT / "segformer_tiny.pth"), meta={})
    print("segformer_tiny.pth", len(model.state_dict()), "tensors; logits", tuple(logits.shape), "mmcv", mmcv.__version__)
    manifests = {}
    for name in ENCODERS:
        encoder = getattr(mix_transformer, name)()
        manifests[name] = {"keys": {k: list(v.shape) for k, v in encoder.state_dict().items()}}
        widths = WIDTHS.get(name, [64, 128, 320, 512])
        full = EncoderDecoder(backbone={"type": name}, test_cfg={"mode": "whole"},
                              decode_head=head_cfg(widths, embed_dim=256 if name == "mit_b0" else 768, num_classes=150))
        release = f"segformer.b{name[-1]}.512x512.ade.160k"
        manifests[release] = {"encoder": name, "num_classes": 150, "decoder_dim": 256 if name == "mit_b0" else 768,
                              "keys": {k: list(v.shape) for k, v in full.state_dict().items()}}
    (OUT / "manifests.json").write_text(json.dumps(manifests, indent=0) + "\n")


if __name__ == "__main__":
    main()
