"""The command line of every task: LightningCLI with the data linked into the model and the trainer set up for
long multi-process runs."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from .checkpointing import AtomicCheckpointIO, LastCheckpoint
from .distributed import SyncBatchNormWhenDistributed
from .export import TaskTrainer
from .module import TaskModule
from .predict import PredictionWriter


class MetricsPrinter(L.Callback):
    """Print the epoch's validation metrics as one line, so a run without a progress bar still shows them."""

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
        if values:
            shown = "  ".join(f"{k}={v:.4f}" for k, v in sorted(values.items()))
            print(f"epoch {trainer.current_epoch} step {trainer.global_step}: {shown}", flush=True)


class TaskCLI(LightningCLI):
    """LightningCLI with ``data.num_classes`` and ``data.class_names`` linked into the model, the optimizer owned by the module, and the
    trainer set up for long multi-process runs: ``last.ckpt`` kept up to date (``--checkpoint.*``), written
    atomically, ``--trainer.sync_batchnorm`` that only applies where several processes can share statistics, and
    ``--trainer.strategy ddp`` that tolerates the parameters a dynamic backbone's sub-network leaves unused."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's fit/validate/test/predict, and ``export`` (``TaskTrainer.export``: ONNX, TorchScript, safetensors)."""
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_class_arguments(LastCheckpoint, "checkpoint", fail_untyped=False, sub_configs=True)
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = os.path.join(config.trainer.default_root_dir or os.getcwd(), "checkpoints")

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = self._get(self.config_init, "trainer", default={})
        callbacks, plugins = _as_list(trainer.get("callbacks")), _as_list(trainer.get("plugins"))
        if trainer.get("enable_checkpointing") is not False:
            kwargs["callbacks"] = [*callbacks, self._get(self.config_init, "checkpoint")]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        if trainer.get("sync_batchnorm"):
            kwargs["sync_batchnorm"] = False
            plugins.append(SyncBatchNormWhenDistributed())
        kwargs["plugins"] = plugins
        if trainer.get("strategy") == "ddp" and isinstance(self.model, TaskModule) and self.model.backbone.is_dynamic:
            # a sub-network leaves parts of the super-network unused in a step; DDP must not wait for their gradients
            kwargs["strategy"] = "ddp_find_unused_parameters_true"
        return super().instantiate_trainer(**kwargs)


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def run_cli(
    model_class: type[TaskModule], datamodule_class: type[L.LightningDataModule], args: Any = None,
    cli_class: type[TaskCLI] = TaskCLI, run: bool = True,
) -> TaskCLI:
    """Entry point of ``python -m tasks.<name>``: subcommands fit/validate/test/predict, YAML configs.
    ``cli_class`` lets a task link more data attributes into its model (a ``TaskCLI`` subclass)."""
    torch.set_float32_matmul_precision("high")
    return cli_class(
        model_class,
        datamodule_class,
        trainer_class=TaskTrainer,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "default_root_dir": os.environ.get("VISION_SUITE_RUNS", "runs"),
            "callbacks": [MetricsPrinter()],
        },
        args=args,
        run=run,
    )
