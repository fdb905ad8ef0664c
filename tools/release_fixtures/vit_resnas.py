"""Write tests/data/releases/vit_resnas/ with yilunliao/vit-search's own code (not run by CI).

    git clone https://github.com/yilunliao/vit-search /tmp/src/vit-search
    python tools/release_fixtures/vit_resnas.py --repo /tmp/src/vit-search     # the installed torch and timm

A tiny ``nets/vit_sr_supernet.py`` ``FlexibleDistillVisionTransformerSR`` (as ``flexible_vit_sr_patch14_224_patch_output``
builds it: no distillation token, the token-labelling ``patch_head``; random initialisation after
``torch.manual_seed(0)``, every parameter and BatchNorm statistic then perturbed) is saved as the release's
``main.py`` saves checkpoints (``model``, ``optimizer``, ``lr_scheduler``, ``epoch``, ``args``: its parsed
``argparse.Namespace``, ``model_ema``), with its eval-mode logits for a fixed input; for the
searched networks of ``scripts/vit-sr-nas/searched_net/`` (tiny, small, medium: their ``--network-def``, read from the
scripts) a manifest of every key and shape of the state dict at 224².

``SpatialReductionPatchEmbedding.__init__`` calls ``.cuda()`` on a zero tensor (a plain attribute, not saved): while
the networks are built ``torch.Tensor.cuda`` returns the tensor itself, so they build on a machine without a GPU.
Nothing else is changed.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
from random_weights import randomise  # this folder's (python tools/release_fixtures/<name>.py)

OUT = Path(__file__).resolve().parents[2] / "tests/data/releases/vit_resnas"
# (4, C): the conv stem; (1, (C, heads, head_dim), (C, mlp_hidden), 1): a block; (3, C_in, C_out): a spatial
# reduction; (2, C, classes): the classifier
TINY_DEF = (
    "((4, 16), (1, (16, 2, 8), (16, 32), 1), (3, 16, 24), (1, (24, 3, 8), (24, 40), 1), (3, 24, 32), "
    "(1, (32, 2, 16), (32, 48), 1), (2, 32, 5))"
)
SEARCHED = {  # our preset -> the release's script
    "vit_resnas_tiny": "tiny.sh", "vit_resnas_small": "small_mac@2.9G.sh", "vit_resnas_medium": "medium_mac@4.6G.sh",
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repo", type=Path, required=True, help="a checkout of yilunliao/vit-search")
    args = parser.parse_args()
    sys.path.insert(0, str(args.repo))
    from nets.vit_sr_supernet import flexible_vit_sr_patch14_224_patch_output

    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # SpatialReductionPatchEmbedding's zero pad, on the CPU
    try:
        OUT.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        model = flexible_vit_sr_patch14_224_patch_output(
            img_size=112, num_classes=5, network_def=ast.literal_eval(TINY_DEF)
        )
        randomise(model)
        model.eval()
        image = torch.randn(2, 3, 112, 112)
        with torch.no_grad():
            logits = model(image)
        np.save(OUT / "input.npy", image.numpy())
        np.save(OUT / "tiny_logits.npy", logits.numpy())
        # what main.py saves every epoch (its lines 506-516), built by the release's own functions: its argument
        # parser, timm's create_optimizer/create_scheduler and ModelEmaV2 as main.py calls them
        sys.argv = ["main.py"]
        import main as release_main
        from timm.optim import create_optimizer
        from timm.scheduler import create_scheduler
        from timm.utils import get_state_dict

        run_args = release_main.get_args_parser().parse_args(
            ["--model", "flexible_vit_sr_patch14_224_patch_output", "--network-def", TINY_DEF, "--epochs", "300"]
        )
        optimizer = create_optimizer(run_args, model)
        lr_scheduler, _ = create_scheduler(run_args, optimizer)
        model_ema = release_main.ModelEma(model, decay=run_args.model_ema_decay, device=None)
        checkpoint = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "epoch": 299,
            "args": run_args,
        }
        checkpoint["model_ema"] = get_state_dict(model_ema)
        torch.save(checkpoint, OUT / "tiny_checkpoint.pth.tar")
        print("tiny_checkpoint.pth.tar", len(model.state_dict()), "tensors")
        manifests = {}
        for ours, script in SEARCHED.items():
            text = (args.repo / "scripts/vit-sr-nas/searched_net" / script).read_text()
            network_def = re.search(r"--network-def '([^']+)'", text)[1]
            full = flexible_vit_sr_patch14_224_patch_output(network_def=ast.literal_eval(network_def))
            manifests[ours] = {"script": f"scripts/vit-sr-nas/searched_net/{script}", "img_size": 224,
                               "num_classes": 1000, "keys": {k: list(v.shape) for k, v in full.state_dict().items()}}
        (OUT / "manifests.json").write_text(json.dumps(manifests, indent=0) + "\n")
    finally:
        torch.Tensor.cuda = cuda


if __name__ == "__main__":
    main()
