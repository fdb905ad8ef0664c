"""What every task shares: the step loop, metrics per stage, parameter groups, schedules, the CLI.

A task subclasses ``TaskModule`` and supplies its head (``build_head``), its loss (``compute_loss``),
its metrics (``build_metrics``) and, where the output is not a per-sample class score, ``predict_step``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from torch import nn
from torchmetrics import MeanMetric, MetricCollection

from backbones import Backbone, create_backbone
from datamodules.sampling import ResumableDataLoader, derive_seed, seed_global_rngs

from .checkpointing import AtomicCheckpointIO, LastCheckpoint, global_metric_states, restore_metric_states
from .distributed import SyncBatchNormWhenDistributed
from .predict import PredictionWriter

Stage = Literal["train", "val", "test"]
OptimizerName = Literal["adamw", "sgd", "adafactor"]
ScheduleName = Literal["cosine", "linear", "poly", "step", "constant"]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; raised before the optimizer step, so no bad weights are saved."""


class TaskModule(L.LightningModule):
    """Backbone + head, one shared step for train/val/test, and the optimisation recipe.

    Args:
        backbone: a registered preset or ``timm:<model name>``.
        backbone_kwargs: overrides of the preset (``drop_path_rate``, ``out_indices``, ``img_size``...).
        num_classes: number of classes (linked from the DataModule by the CLI).
        pretrained: checkpoint file for the backbone, or for backbone and head together.
        optimizer: ``adamw``, ``sgd`` (Nesterov-free, with ``momentum``) or ``adafactor`` (torch's).
        lr: base learning rate of the backbone; the head gets ``lr * head_lr_mult``.
        weight_decay, head_weight_decay: decay of backbone and head weights (``None``: the same);
            norms, biases, position embeddings and class tokens are never decayed.
        momentum, betas: SGD momentum; AdamW betas.
        schedule: after warmup, ``cosine`` or ``linear`` to ``min_lr_ratio``, ``poly`` (power
            ``poly_power``), ``step`` (×``step_gamma`` at each of ``step_milestones`` epochs) or ``constant``.
        warmup_epochs, warmup_steps: linear warmup from ``warmup_start_ratio * lr`` (summed if both set).
        freeze_backbone: train only the head.
    """

    def __init__(
        self,
        *,
        backbone: str,
        backbone_kwargs: dict[str, Any] | None = None,
        num_classes: int,
        pretrained: str | None = None,
        optimizer: OptimizerName = "adamw",
        lr: float = 1e-3,
        head_lr_mult: float = 1.0,
        weight_decay: float = 0.05,
        head_weight_decay: float | None = None,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        schedule: ScheduleName = "cosine",
        warmup_epochs: float = 0.0,
        warmup_steps: int = 0,
        warmup_start_ratio: float = 1e-3,
        min_lr_ratio: float = 0.0,
        poly_power: float = 1.0,
        step_milestones: tuple[float, ...] = (),
        step_gamma: float = 0.1,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.backbone: Backbone = create_backbone(backbone, **(backbone_kwargs or {}))
        self.head: nn.Module = self.build_head()
        if pretrained:
            from backbones.weights import load_pretrained

            self.load_report = load_pretrained(self, pretrained)
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        metrics = self.build_metrics()
        self.metrics = nn.ModuleDict({f"{s}_metrics": metrics.clone(prefix=f"{s}/") for s in ("train", "val", "test")})
        # sample-weighted mean over all processes (a mean of per-process means is wrong when shards differ in size)
        self.losses = nn.ModuleDict({f"{s}_loss": MeanMetric(nan_strategy="disable") for s in ("train", "val", "test")})
        self._resumed_metric_states: dict[str, Any] | None = None
        self.class_names: list[str] | None = None  # from the DataModule, for logs and predictions

    def class_name(self, index: int) -> str:
        return self.class_names[index] if self.class_names else str(index)

    def read_data_info(self, datamodule: Any) -> None:
        """Take from the DataModule what names the outputs (its ``class_names``); called as each stage starts,
        because a model loaded from a checkpoint may meet other data than it was trained on."""
        if getattr(datamodule, "class_names", None):
            self.class_names = list(datamodule.class_names)

    def on_fit_start(self) -> None:
        self.read_data_info(getattr(self.trainer, "datamodule", None))

    def on_validation_start(self) -> None:
        self.read_data_info(getattr(self.trainer, "datamodule", None))

    def on_test_start(self) -> None:
        self.read_data_info(getattr(self.trainer, "datamodule", None))

    def on_predict_start(self) -> None:
        self.read_data_info(getattr(self.trainer, "datamodule", None))

    # --- what a task supplies -------------------------------------------------------------------------

    def build_head(self) -> nn.Module:
        raise NotImplementedError

    def build_metrics(self) -> MetricCollection:
        raise NotImplementedError

    def compute_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    # --- the loop, once ---------------------------------------------------------------------------------

    def shared_step(self, batch: dict[str, Any], stage: Stage) -> torch.Tensor:
        batch = self.prepare_batch(batch, stage)
        output = self.forward_stage(batch["input"], stage).float()
        target = batch["target"]
        with torch.autocast(self.device.type, enabled=False):  # loss and metrics in fp32 under any precision
            loss = self.compute_loss(output, batch.get("loss_target", target))
            metrics = self.metrics[f"{stage}_metrics"]
            metrics.update(*self.metric_inputs(output, target))
        if stage == "train":
            self.check_finite(loss)
        batch_size = target.shape[0]
        # one value per sample (MeanMetric's ``weight`` is ignored under nan_strategy="disable", torchmetrics 1.9)
        per_sample = loss.detach().expand(batch_size)
        mean_loss = self.losses[f"{stage}_loss"]
        if stage == "train":
            mean_loss(per_sample)  # forward: also this batch's value, for the step log
        else:
            mean_loss.update(per_sample)
        self.log(f"{stage}/loss", mean_loss, on_step=stage == "train", on_epoch=True, prog_bar=True)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train", batch_size=batch_size)
        return loss

    def check_finite(self, loss: torch.Tensor) -> None:
        """Stop the run, before the optimizer step, when the loss of any process is NaN or infinite."""
        trainer = self._trainer
        finite = local = bool(torch.isfinite(loss).all())
        if trainer is None:
            return
        if trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(local, all=True)
        if not finite:
            value = "non-finite on another process" if local else str(loss.item())
            kept = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
            raise NonFiniteLossError(
                f"training loss is {value} at global step {trainer.global_step} (epoch {trainer.current_epoch}, "
                f"rank {trainer.global_rank}); stopped before the optimizer step. Last good checkpoint: {kept}"
            )

    def forward_stage(self, x: torch.Tensor, stage: Stage) -> torch.Tensor:
        """The forward pass used in ``stage``; tasks override it for sliding-window or multi-view testing."""
        return self(x)

    def metric_inputs(self, output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the metric collection is updated with; tasks override it to pass probabilities or labels."""
        return output, target

    def prepare_batch(self, batch: dict[str, Any], stage: Stage) -> dict[str, Any]:
        """Hook for batch-level augmentation (mixup) before the forward pass."""
        return batch

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.shared_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.shared_step(batch, "test")

    # --- a run that resumes exactly ---------------------------------------------------------------------

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Seed the global generators (dropout, drop path, mixup) from ``(seed, epoch, batch, rank)``: the random
        state of a step depends on nothing before it, so a run resumed from a checkpoint draws what the
        uninterrupted run drew."""
        seed = os.environ.get("PL_GLOBAL_SEED")
        if seed is not None:
            seed_global_rngs(derive_seed(int(seed), self.current_epoch, batch_idx, self.global_rank), accelerators=True)

    def on_train_start(self) -> None:
        """After a restart mid-epoch, make the training loader skip the batches of the epoch already trained on
        and put back the epoch's training accumulators (loss and metrics) saved with the checkpoint."""
        loop = self.trainer.fit_loop
        done = 0
        if loop.restarted_mid_epoch:  # the batches the epoch loop will count as done (its own arithmetic)
            done = loop.epoch_loop.batch_progress.current.completed + int(loop.epoch_loop.restarted_on_train_batch_end)
        done = done if done < self.trainer.num_training_batches else 0  # a finished epoch is not resumed
        loader = self.trainer.train_dataloader
        if isinstance(loader, ResumableDataLoader):
            loader.resume(self.trainer.current_epoch, done)
        states, self._resumed_metric_states = self._resumed_metric_states, None
        if done and states:
            restore_metric_states(self._train_accumulators(), states, holder=self.global_rank == 0)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = self.trainer
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if trainer.state.fn == "fit" and 0 < done < trainer.num_training_batches:
            checkpoint["train_metric_states"] = global_metric_states(self._train_accumulators())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resumed_metric_states = checkpoint.get("train_metric_states")

    def _train_accumulators(self) -> dict[str, Any]:
        return {"loss": self.losses["train_loss"], **dict(self.metrics["train_metrics"].items(keep_base=True))}

    # --- optimisation -------------------------------------------------------------------------------------

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Backbone and head, each split into decayed weights and undecayed norms/biases/embeddings."""
        hp = self.hparams
        no_decay_names = self.backbone.no_weight_decay()
        head_wd = hp.weight_decay if hp.head_weight_decay is None else hp.head_weight_decay
        groups: list[dict[str, Any]] = []
        for part, module, lr, wd in (
            ("backbone", self.backbone, hp.lr, hp.weight_decay),
            ("head", self.head, hp.lr * hp.head_lr_mult, head_wd),
        ):
            decay, no_decay = [], []
            for name, param in module.named_parameters():
                if not param.requires_grad:
                    continue
                skip = param.ndim <= 1 or name in no_decay_names or name.endswith(("pos_embed", "cls_token"))
                (no_decay if skip else decay).append(param)
            for params, weight_decay, suffix in ((decay, wd, ""), (no_decay, 0.0, "_no_decay")):
                if params:
                    groups.append({"params": params, "lr": lr, "weight_decay": weight_decay, "name": part + suffix})
        if not groups:
            raise ValueError("no trainable parameters (is freeze_backbone set on a model without a head?)")
        return groups

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = self.parameter_groups()
        if hp.optimizer == "adamw":
            opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=hp.betas)
        elif hp.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum)
        else:
            opt = torch.optim.Adafactor(groups, lr=hp.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = total / self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else None
        if per_epoch is None:
            per_epoch = total if not hp.warmup_epochs and not hp.step_milestones else self._steps_per_epoch()
        scheduler = build_schedule(
            opt,
            total_steps=total,
            warmup_steps=min(total - 1, int(hp.warmup_steps + hp.warmup_epochs * per_epoch)),
            schedule=hp.schedule,
            warmup_start_ratio=hp.warmup_start_ratio,
            min_lr_ratio=hp.min_lr_ratio,
            poly_power=hp.poly_power,
            milestones=[int(m * per_epoch) for m in hp.step_milestones],
            gamma=hp.step_gamma,
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _steps_per_epoch(self) -> float:
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches):
            raise ValueError("warmup_epochs/step_milestones need a sized training set; use warmup_steps")
        return batches / self.trainer.accumulate_grad_batches


def build_schedule(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_steps: int,
    schedule: ScheduleName,
    warmup_start_ratio: float = 1e-3,
    min_lr_ratio: float = 0.0,
    poly_power: float = 1.0,
    milestones: list[int] | None = None,
    gamma: float = 0.1,
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup followed by one of torch's schedulers, stepped once per optimizer step."""
    from torch.optim import lr_scheduler as sch

    main_steps = max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        main: sch.LRScheduler = sch.LambdaLR(
            optimizer, lambda s: min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(s, main_steps) / main_steps))
        )
    elif schedule == "linear":
        main = sch.LinearLR(optimizer, start_factor=1.0, end_factor=max(min_lr_ratio, 0.0), total_iters=main_steps)
    elif schedule == "poly":
        main = sch.PolynomialLR(optimizer, total_iters=main_steps, power=poly_power)
    elif schedule == "step":
        main = sch.MultiStepLR(optimizer, milestones=[max(0, m - warmup_steps) for m in milestones or []], gamma=gamma)
    else:
        main = sch.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup_steps <= 0:
        return main
    warmup = sch.LinearLR(optimizer, start_factor=warmup_start_ratio, end_factor=1.0, total_iters=warmup_steps)
    return sch.SequentialLR(optimizer, [warmup, main], milestones=[warmup_steps])


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
    """LightningCLI with ``data.num_classes`` linked into the model, the optimizer owned by the module, and the
    trainer set up for long multi-process runs: ``last.ckpt`` kept up to date (``--checkpoint.*``), written
    atomically, and ``--trainer.sync_batchnorm`` that only applies where several processes can share statistics."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_class_arguments(LastCheckpoint, "checkpoint", fail_untyped=False, sub_configs=True)
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

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
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "default_root_dir": os.environ.get("VISION_SUITE_RUNS", "runs"),
            "callbacks": [MetricsPrinter()],
        },
        args=args,
        run=run,
    )
