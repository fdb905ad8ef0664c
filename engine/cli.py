"""The command line of every task: LightningCLI with the data linked into the model and the trainer set up for
long multi-process runs."""

from __future__ import annotations

import functools
import inspect
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, TypeVar

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from backbones import Backbone
from datamodules.errors import InputError

from .checkpointing import AtomicCheckpointIO, LastCheckpoint, check_trainer_checkpoint, check_weights_file
from .distributed import FullyShardedStrategy, SyncBatchNormWhenDistributed
from .export import TaskTrainer
from .pictures import default_loggers
from .predict import PredictionWriter
from .run_summary import print_outputs, silence_lightning_tips
from .version import __version__


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
    ``--trainer.strategy ddp`` that tolerates the parameters a dynamic backbone's sub-network leaves unused;
    ``--trainer.strategy fsdp`` is FSDP2 (``engine.distributed.FullyShardedStrategy``), on GPUs and CPU processes."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's fit/validate/test/predict, and ``export`` (``TaskTrainer.export``: ONNX, TorchScript, safetensors)."""
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}

    def init_parser(self, **kwargs: Any) -> Any:
        """Lightning's parser with ``--version`` (``engine.__version__``), on the command and on each subcommand."""
        parser = super().init_parser(**kwargs)
        parser.add_argument("--version", action="version", version=f"vision-suite {__version__}")
        return parser

    # LightningCLI calls after_<subcommand> when the subcommand returns: say where its outputs went
    def after_fit(self) -> None:
        print_outputs(self.trainer, "fit")

    def after_validate(self) -> None:
        print_outputs(self.trainer, "validate")

    def after_test(self) -> None:
        print_outputs(self.trainer, "test")

    def after_predict(self) -> None:
        print_outputs(self.trainer, "predict")

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_class_arguments(LastCheckpoint, "checkpoint", fail_untyped=False, sub_configs=True)
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")

    RUN_OPTIONS: tuple[str, ...] = ("token_merging", "save_token_maps")
    """Model options a run sets on a trained model: set on the command line or in a config (to another value than
    the default), they win over the hyperparameters of ``--ckpt_path``, which Lightning otherwise puts over them."""

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        model = self.config[subcommand].get("model") if subcommand else None
        defaults = {}
        for cls in reversed(self._model_class.__mro__):  # a subclass's default wins over its base's
            init = cls.__dict__.get("__init__")
            params = inspect.signature(init).parameters if init is not None else {}
            defaults.update({k: params[k].default for k in self.RUN_OPTIONS if k in params})
        given = {k: model[k] for k in defaults if model is not None and k in model and model[k] != defaults[k]}
        super()._parse_ckpt_path()
        for key, value in given.items():
            self.config[subcommand].model[key] = value

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Lightning's parsing, then every checkpoint file the run reads checked in full (``--ckpt_path``, ``last``
        falling back to the newest readable file, ``--model.pretrained``, ``--model.teacher_pretrained``), before
        Lightning reads ``--ckpt_path``'s hyperparameters or anything is built."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = os.path.join(config.trainer.default_root_dir or os.getcwd(), "checkpoints")
        if subcommand in ("fit", "validate", "test", "predict"):
            config.ckpt_path = check_trainer_checkpoint(config.get("ckpt_path"), config.checkpoint.dirpath)
        for key in ("pretrained", "teacher_pretrained"):
            check_weights_file(config.model.get(key) if config.get("model") else None, f"--model.{key}")

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
        if trainer.get("logger") in (None, True) and self.subcommand in ("fit", "validate", "test"):
            # not set: TensorBoard and CSV in one run folder (predict and export log nothing: Lightning's default stays)
            kwargs["logger"] = default_loggers(trainer.get("default_root_dir") or os.getcwd())
        if trainer.get("strategy") == "ddp" and any(isinstance(m, Backbone) and m.is_dynamic for m in self.model.modules()):
            # a sub-network leaves parts of the super-network unused in a step; DDP must not wait for their gradients
            kwargs["strategy"] = "ddp_find_unused_parameters_true"
        if trainer.get("strategy") == "fsdp":
            kwargs["strategy"] = FullyShardedStrategy()  # FSDP2, on GPUs and CPU processes alike (engine/distributed.py)
        return super().instantiate_trainer(**kwargs)


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


VERBOSE_ENV = "VISION_SUITE_VERBOSE"
F = TypeVar("F", bound=Callable[..., Any])


PREEMPTED_EXIT_CODE = 75
"""The exit status of a run stopped by SIGTERM or SIGUSR1 after saving ``last.ckpt``: ``EX_TEMPFAIL`` of
sysexits.h, "try again later", for a job script or scheduler to requeue on (SLURM, Kubernetes, AWS Batch)."""


@contextmanager
def input_errors_in_one_line() -> Iterator[None]:
    """Print an ``InputError`` (bad data, a checkpoint of the wrong kind) as ``error: <file>: <reason>`` on the
    last line of stderr and exit with status 2; with ``VISION_SUITE_VERBOSE=1`` the traceback comes first.
    A run stopped by a preemption signal exits with ``PREEMPTED_EXIT_CODE``. Other exceptions, bugs, keep their
    traceback."""
    try:
        yield
    except SIGTERMException:  # the loop stopped at a step boundary on SIGTERM/SIGUSR1; LastCheckpoint saved it
        print(f"stopped by a preemption signal; resume with --ckpt_path last (exit status {PREEMPTED_EXIT_CODE}: "
              "requeue)", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)
    except Exception as raised:
        err = raised
        while err is not None and not isinstance(err, InputError):  # wrapped by a library (MONAI's apply_transform)
            err = err.__cause__ or err.__context__
        if err is None:
            raise
        if os.environ.get(VERBOSE_ENV, "0") not in ("", "0"):
            traceback.print_exc()
        else:
            lines = str(err).strip().splitlines()
            if len(lines) > 2 and "Original Traceback" not in str(err):  # a listing of several bad files
                print("\n".join(lines), file=sys.stderr)
            print(f"(the traceback is left out; {VERBOSE_ENV}=1 shows it)", file=sys.stderr)
        print(f"error: {err.one_line()}", file=sys.stderr, flush=True)
        sys.exit(2)


def command_line_errors(entry: F) -> F:
    """Run ``entry`` under ``input_errors_in_one_line`` when it parses the command line (``args`` None); called
    with ``args`` from Python (tests, notebooks) its errors raise as usual."""

    @functools.wraps(entry)
    def run(*args: Any, **kwargs: Any) -> Any:
        from_command_line = inspect.signature(entry).bind(*args, **kwargs).arguments.get("args") is None
        with input_errors_in_one_line() if from_command_line else nullcontext():
            return entry(*args, **kwargs)

    return run  # type: ignore[return-value]


@command_line_errors
def run_cli(
    model_class: type[L.LightningModule], datamodule_class: type[L.LightningDataModule], args: Any = None,
    cli_class: type[TaskCLI] = TaskCLI, run: bool = True,
) -> TaskCLI:
    """Entry point of ``python -m tasks.<name>``: subcommands fit/validate/test/predict, YAML configs.
    ``cli_class`` lets a task link more data attributes into its model (a ``TaskCLI`` subclass). From the command
    line (``args`` None) a user's input errors print as one line, the traceback behind ``VISION_SUITE_VERBOSE=1``."""
    torch.set_float32_matmul_precision("high")
    silence_lightning_tips()
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
