"""Every YAML in configs/ parses with its task's CLI and instantiates model, data and trainer."""

from __future__ import annotations

import importlib
from pathlib import Path

import lightning as L
import pytest
import torch

from engine.cli import run_cli
from tasks.module import TaskModule

CONFIGS = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))
TASK_OF_PREFIX = {
    "segformer_": "segmentation",
    "timesformer_": "video",
    "unetr": "medical",
}


def task_of(config: Path) -> str:
    return next((task for prefix, task in TASK_OF_PREFIX.items() if config.name.startswith(prefix)), "classification")


def classes_of(task: str) -> tuple[type[TaskModule], type[L.LightningDataModule]]:
    module = importlib.import_module(f"tasks.{task}")
    data = importlib.import_module(f"datamodules.{task}")
    (model_cls,) = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, TaskModule)
                    and c.__module__ == module.__name__ and c is not TaskModule]
    (data_cls,) = [c for c in vars(data).values() if isinstance(c, type) and issubclass(c, L.LightningDataModule)
                   and c.__module__ == data.__name__]
    return model_cls, data_cls


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_parses_and_instantiates(config: Path, tmp_path: Path) -> None:
    model_cls, data_cls = classes_of(task_of(config))
    args = [
        f"--config={config}",
        "--data.root=null",  # recipes for real data sets point at folders this machine lacks
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.strategy=auto",
        "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
    ]
    if "teacher_pretrained:" in config.read_text():
        args.append("--model.teacher_pretrained=null")  # a teacher's weights file this machine lacks
    with torch.device("meta"):  # recipes are full-size models; only their construction is checked here
        cli = run_cli(model_cls, data_cls, args=args, run=False)
    assert isinstance(cli.model, model_cls) and cli.model.num_classes == cli.datamodule.num_classes


def test_unknown_config_key_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path("configs/vit_small_patch16.yaml").read_text().replace("\n  lr: ", "\n  learning_rate: "))
    model_cls, data_cls = classes_of("classification")
    with pytest.raises(SystemExit):
        run_cli(model_cls, data_cls, args=[f"--config={bad}"], run=False)
    assert "learning_rate" in capsys.readouterr().err
