"""Write tests/data/releases/dynamicvit/ with raoyongming/DynamicViT's own code (not run by CI).

    git clone https://github.com/raoyongming/DynamicViT /tmp/src/DynamicViT
    python -m venv --system-site-packages /tmp/envs/dv && /tmp/envs/dv/bin/pip install timm==0.4.12 --no-deps fvcore
    /tmp/envs/dv/bin/python tools/release_fixtures/dynamicvit.py --repo /tmp/src/DynamicViT

A tiny ``models.dyvit.VisionTransformerDiffPruning`` (random initialisation after ``torch.manual_seed(0)``, every
parameter then perturbed) is saved by the release's ``utils.save_model`` as its ``main.py`` calls it (``model``,
``optimizer``, ``epoch``, ``scaler``, ``args``, ``best``, ``best_ema``, ``model_ema``; ``infer.py`` reads
``checkpoint["model"]``), each entry made by the release's own code (``main.get_args_parser``,
``optim_factory.create_optimizer``, ``utils.NativeScalerWithGradNormCount``, timm's ``ModelEma``), with its eval-mode
logits (the pruned inference: top-k tokens gathered) for a fixed input. Its forward hard-codes ``init_n = 14 * 14`` patches, so the tiny model keeps a 14×14 grid
(56² input, 4² patches). For the release's DeiT models (``main.py``/``infer.py``: ``deit-s``, ``deit-256``,
``deit-b``, pruning before blocks 3, 6, 9) a manifest of every key and shape of the state dict.

The release's ``utils.py`` imports ``torch._six.inf`` and ``tensorboardX.SummaryWriter``, and timm 0.4.12 (the
release's ``main.py`` needs timm 0.4's optimizers) imports ``container_abcs``, ``string_classes`` and ``int_classes``
from ``torch._six``: a ``torch._six`` module with those (``math.inf``, ``collections.abc``, ``(str, bytes)``, ``int``)
and a ``tensorboardX`` module with an empty ``SummaryWriter`` stand in; nothing else is changed.
"""

from __future__ import annotations

import argparse
import collections.abc
import json
import math
import shutil
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parents[2] / "tests/data/releases/dynamicvit"
TINY = {"img_size": 56, "patch_size": 4, "embed_dim": 32, "depth": 4, "num_heads": 2, "mlp_ratio": 4, "qkv_bias": True,
        "num_classes": 5, "pruning_loc": [1, 2, 3], "token_ratio": [0.7, 0.7**2, 0.7**3]}
RHO = 0.7
RELEASES = {  # main.py / infer.py --model: (embed_dim, heads)
    "deit-s": (384, 6), "deit-256": (256, 4), "deit-b": (768, 12),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repo", type=Path, required=True, help="a checkout of raoyongming/DynamicViT")
    args = parser.parse_args()
    six = types.ModuleType("torch._six")
    six.inf, six.container_abcs, six.string_classes, six.int_classes = math.inf, collections.abc, (str, bytes), int
    board = types.ModuleType("tensorboardX")
    board.SummaryWriter = type("SummaryWriter", (), {})
    sys.modules.update({"torch._six": six, "tensorboardX": board})
    sys.path.insert(0, str(args.repo))
    from models.dyvit import VisionTransformerDiffPruning

    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = VisionTransformerDiffPruning(**TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.eval()
    image = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        logits = model(image)
    np.save(OUT / "input.npy", image.numpy())
    np.save(OUT / "deit_tiny_logits.npy", logits.numpy())
    sys.argv = ["main.py"]
    import main as release_main
    import utils as release_utils
    from optim_factory import create_optimizer
    from timm.utils import ModelEma

    with tempfile.TemporaryDirectory() as job:
        run_args = release_main.get_args_parser().parse_args(
            ["--model", "deit-s", "--base_rate", str(RHO), "--output_dir", job, "--epochs", "30"]
        )
        optimizer = create_optimizer(run_args, model, skip_list=None, get_num_layer=None, get_layer_scale=None,
                                     bone_lr_scale=run_args.lr_scale)
        model_ema = ModelEma(model, decay=run_args.model_ema_decay, device="", resume="")
        release_utils.save_model(
            args=run_args, model=model, model_without_ddp=model, optimizer=optimizer,
            loss_scaler=release_utils.NativeScalerWithGradNormCount(), epoch="best", model_ema=model_ema,
            best_acc=79.3, best_acc_ema=79.1,
        )
        shutil.copy(Path(job) / "checkpoint-best.pth", OUT / "deit_tiny.pth")
    print("deit_tiny.pth", len(model.state_dict()), "tensors; logits", logits.shape)
    manifests = {}
    for name, (width, heads) in RELEASES.items():
        full = VisionTransformerDiffPruning(  # as main.py builds --model deit-s / deit-256 / deit-b
            patch_size=16, embed_dim=width, depth=12, num_heads=heads, mlp_ratio=4, qkv_bias=True,
            pruning_loc=[3, 6, 9], token_ratio=[RHO, RHO**2, RHO**3],
        )
        manifests[name] = {"embed_dim": width, "num_heads": heads, "pruning_loc": [3, 6, 9], "num_classes": 1000,
                           "keys": {k: list(v.shape) for k, v in full.state_dict().items()}}
    (OUT / "manifests.json").write_text(json.dumps(manifests, indent=0) + "\n")


if __name__ == "__main__":
    main()
