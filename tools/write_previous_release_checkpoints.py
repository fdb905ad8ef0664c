"""Write tiny Lightning checkpoints with the code of the current checkout, and the outputs they give on a fixed
input, so a later layout can prove it still loads them (``tests/test_previous_release.py``).

Run once at the release being frozen (``python tools/write_previous_release_checkpoints.py tests/data/previous_release``);
it trains each task for one step on the built-in synthetic data through the task's CLI, as a user's run would.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).parents[1]
VIT = "{img_size: 32, depth: 2, embed_dim: 32, num_heads: 2, patch_size: 8}"
RUNS = {
    "classification": ("classification", "configs/vit_small_patch16.yaml", "ClassificationModule", [
        "--model.backbone=vit_tiny_patch16", f"--model.backbone_kwargs={VIT}", "--data.image_size=32",
        "--data.batch_size=8"], (1, 3, 32, 32)),
    "dynamicvit": ("classification", "configs/vit_small_patch16.yaml", "ClassificationModule", [
        "--model.backbone=vit_tiny_patch16", f"--model.backbone_kwargs={VIT}", "--data.image_size=32",
        "--data.batch_size=8", "--model.token_pruning=true", "--model.keep_ratio=0.5",
        "--model.prune_at=[1]"], (1, 3, 32, 32)),
    "segmentation": ("segmentation", "configs/segformer_b0.yaml", "SegmentationModule", [
        "--model.backbone_kwargs={embed_dims: [8, 16, 32, 32], depths: [1, 1, 1, 1], num_heads: [1, 1, 1, 1]}",
        "--model.decoder_dim=16", "--data.batch_size=2"], (1, 3, 64, 64)),
    "medical": ("medical", "configs/unetr.yaml", "MedicalSegmentationModule", [
        "--model.backbone_kwargs={img_size: 32, embed_dim: 32, depth: 4, num_heads: 2, out_indices: [0, 1, 2, 3]}",
        "--model.feature_size=4", "--data.roi_size=[32, 32, 32]", "--data.batch_size=1"], (1, 1, 32, 32, 32)),
    "video": ("video", "configs/timesformer_nano.yaml", "VideoClassificationModule", [
        "--model.backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2, num_frames: 4}", "--data.num_frames=4",
        "--data.batch_size=2"], (1, 3, 4, 32, 32)),
}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    for name, (task, config, cls, args, shape) in RUNS.items():
        root = out / f"_{name}_run"
        command = [sys.executable, "-m", f"tasks.{task}", "fit", f"--config={config}", *args, "--trainer.max_steps=1",
                   "--trainer.limit_val_batches=1", "--trainer.logger=false", f"--trainer.default_root_dir={root}",
                   "--trainer.enable_progress_bar=false"]
        subprocess.run(command, cwd=REPO, env=env, check=True)
        ckpt = sorted(root.rglob("last.ckpt"))[-1]
        target = out / f"{name}.ckpt"
        ckpt.replace(target)
        module_class = getattr(importlib.import_module(f"tasks.{task}"), cls)
        module = module_class.load_from_checkpoint(target, map_location="cpu").eval()
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            y = module(x)
        if name == "medical":  # kept small: the optimizer states dropped (loading for inference never reads them),
            checkpoint = torch.load(target, weights_only=True)  # and the output stored at every second voxel
            checkpoint.pop("optimizer_states")
            torch.save(checkpoint, target)
            torch.save({"input": x, "output": y[..., ::2, ::2, ::2].clone(), "output_stride": 2}, out / f"{name}_output.pt")
        else:
            torch.save({"input": x, "output": y}, out / f"{name}_output.pt")
        subprocess.run(["rm", "-rf", str(root)], check=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
