"""Checkpoints written by the previous release (the flat ``tasks/`` layout, commit 07e6223) still load into today's
modules and give the same outputs; the files and outputs were written by ``tools/write_previous_release_checkpoints.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tasks.classification import ClassificationModule
from tasks.medical import MedicalSegmentationModule
from tasks.segmentation import SegmentationModule
from tasks.video import VideoClassificationModule

from cli_runs import run_task

DATA = Path(__file__).parent / "data" / "previous_release"
MODULES = {
    "classification": ClassificationModule,
    "dynamicvit": ClassificationModule,
    "segmentation": SegmentationModule,
    "medical": MedicalSegmentationModule,
    "video": VideoClassificationModule,
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_previous_release_checkpoint_loads_and_gives_its_outputs(name: str) -> None:
    module = MODULES[name].load_from_checkpoint(DATA / f"{name}.ckpt", map_location="cpu").eval()
    saved = torch.load(DATA / f"{name}_output.pt", weights_only=True)
    with torch.no_grad():
        output = module(saved["input"])
    stride = saved.get("output_stride", 1)
    if stride > 1:
        output = output[..., ::stride, ::stride, ::stride]
    torch.testing.assert_close(output, saved["output"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_previous_release_checkpoint_resumes_through_the_cli(tmp_path: Path, synthetic_cache: str) -> None:
    """``--ckpt_path`` with a file of the previous release: the run state (loops, callbacks, optimizer) is read."""
    args = [
        "fit", "--config=configs/vit_small_patch16.yaml", "--model.backbone=vit_tiny_patch16",
        "--model.backbone_kwargs={img_size: 32, depth: 2, embed_dim: 32, num_heads: 2, patch_size: 8}",
        "--model.token_pruning=true", "--model.keep_ratio=0.5", "--model.prune_at=[1]", "--data.image_size=32",
        "--data.batch_size=8", "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={DATA / 'dynamicvit.ckpt'}",
    ]
    output = run_task("classification", args, cache=synthetic_cache).stdout
    assert "Restored all states" in output or "Restoring states" in output, output[-3000:]


def test_a_yaml_naming_a_class_by_its_previous_module_path_still_runs(tmp_path: Path) -> None:
    """A config (or a run's saved ``config.yaml``) of the previous release names helpers by their old module."""
    from datamodules.classification import ClassificationDataModule
    from engine.cli import run_cli
    from engine.fewshot_callback import FewShotEvaluator

    config = tmp_path / "old.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: tasks.fewshot_callback.FewShotEvaluator\n"
        "      init_args: {every_n_steps: 7}\n"
        "model: {backbone: vit_tiny_patch16, backbone_kwargs: {img_size: 32, depth: 1, embed_dim: 32, num_heads: 2}}\n"
        "data: {image_size: 32}\n"
    )
    cli = run_cli(ClassificationModule, ClassificationDataModule, args=["--config", str(config)], run=False)
    found = [c for c in cli.trainer.callbacks if isinstance(c, FewShotEvaluator)]
    assert len(found) == 1 and found[0].every_n_steps == 7
