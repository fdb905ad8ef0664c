"""``TaskModule``: a backbone, a head, the one train/val/test step of every task, and the optimisation recipe.

A task subclasses it and supplies its head (``build_head``), its loss (``compute_loss``), its metrics
(``build_metrics(stage)``) and, where the output is not a per-sample class score, ``predict_step``. The state of
a run (per-step seeding, dynamic choices, mid-epoch resume) lives in ``run_state.py`` callbacks, which the
module hands to its trainer.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric, MetricCollection

from backbones import Backbone, create_backbone
from backbones.base import AuxiliaryLoss, AuxiliaryLossSource
from backbones.token_merging import merge_options
from backbones.token_reduction import reduce_tokens
from datamodules.common import TaskDataModule
from engine.distributed import shard_task_module
from engine.optimization import (
    OptimizerName, ScheduleName, build_optimizer, build_schedule, drop_frozen_gradients, parameter_groups,
)
from engine.pictures import PictureMaker, logging_callbacks
from engine.run_state import run_state_callbacks
from ops import CpuKernels, use_cpu_kernels
from search.sandwich import sandwich_step

Stage = Literal["train", "val", "test"]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; raised before the optimizer step, so no bad weights are saved."""


class TaskModule(L.LightningModule):
    """Backbone + head, one shared step for train/val/test, and the optimisation recipe.

    Args:
        backbone: a registered preset or ``timm:<model name>``.
        backbone_kwargs: overrides of the preset (``drop_path_rate``, ``out_indices``, ``img_size``...).
        num_classes: number of classes (linked from the DataModule by the CLI).
        class_names: names of the classes for logs and predictions (linked from the DataModule by the CLI).
        pretrained: checkpoint file for the backbone, or for backbone and head together, or a Hub name
            (``hf-hub:<org>/<repo>[/<file>]``, ``timm:<model>.<tag>``) read through huggingface_hub's cache.
        loss_weights: weights of auxiliary losses by name (``keep_ratio``, ``distill``...), overriding the
            defaults of the module that produces them; each is logged as ``train/loss_<name>``.
        nonfinite_loss: what a NaN or infinite training loss does, found before the optimizer step: ``stop`` the
            run (``NonFiniteLossError`` naming the step, the batch's files and the loss terms that went non-finite;
            the last checkpoint written stays the newest), or ``skip`` the step with a warning saying the same and
            count it (``train/nonfinite_steps``, per epoch).
        optimizer: ``adamw``, ``sgd`` (Nesterov-free, with ``momentum``), ``adafactor`` (torch's) or ``adafactor_bv``
            (big_vision's, Zhai et al. 2022: factored, momentum ``momentum`` in bfloat16, decay decoupled and
            relative to the scheduled lr, so ``weight_decay: 0.03`` is big_vision's ``wd = 0.03 * lr``).
        lr: base learning rate of the backbone; the head gets ``lr * head_lr_mult``.
        weight_decay, head_weight_decay: decay of backbone and head weights (``None``: the same);
            norms, biases, position embeddings and class tokens are never decayed.
        momentum, betas: SGD momentum; AdamW betas.
        schedule: after warmup, ``cosine`` or ``linear`` to ``min_lr_ratio``, ``poly`` (power
            ``poly_power``), ``step`` (×``step_gamma`` at each of ``step_milestones`` epochs), ``constant`` or
            ``rsqrt`` (big_vision's: ``1 / sqrt(1 + (step - warmup) / rsqrt_timescale)``, then a linear cooldown to
            zero over the last ``cooldown_steps``).
        warmup_epochs, warmup_steps: linear warmup from ``warmup_start_ratio * lr`` (summed if both set).
        freeze_backbone: train only the head; the backbone also stays in eval mode (no dropout, drop path or
            BatchNorm statistics updates), so a linear probe is a real linear probe.
        compile: ``torch.compile`` the module's ``forward`` (backbone and head; not the loss or the metrics, which
            the step computes outside it), in place (``nn.Module.compile``), so parameter names and checkpoints are
            those of the eager model. Off by default: the first steps pay the compilation, and on a CPU it gains
            little (benchmarks/RESULTS.md).
        compile_options: keyword arguments of ``torch.compile`` (``mode``, ``backend``, ``dynamic``, ``fullgraph``).
        cpu_kernels: the hand-written CPU kernels of ``ops/`` (oneDNN linear layers, UNETR's fused decoder blocks,
            packed convolutions of fused inference forms): ``off`` plain PyTorch, ``on`` the kernels wherever they apply,
            ``auto`` the faster of the two per layer and shape, timed once per process (``ops/kernels.py``). GPUs,
            autocast, compilers and exporters always get plain PyTorch; parameters and checkpoints are the same.
        activation_checkpointing: recompute each transformer block in the backward pass instead of keeping its
            activations (``Backbone.set_activation_checkpointing``): exact, about a third more compute; a backbone
            without it is an error.
        token_reduction: run fewer tokens through the backbone's later blocks: ``method`` (a registered token
            reduction, ``dynamicvit``) and its options (``backbones.token_reduction.reduce_tokens``), e.g.
            ``{method: dynamicvit, keep_ratio: 0.7}``; the wrapper is built before any weights load. ``None``:
            every token runs through every block.
        token_merging: merge tokens in every block (ToMe, ``backbones.token_merging``; any ViT, DeiT, TimeSformer or
            UNETR encoder, no training needed): ``r`` tokens per block, a list of them (one per block), or
            ``{r: .., schedule: constant|decreasing}``;
            the same as ``token_reduction: {method: tome, r: ..}``. Dense outputs are unmerged to the full grid.
            Settable when evaluating a checkpoint trained without it (``validate --ckpt_path .. --model.token_merging
            8``: the command line's value wins over the checkpoint's).
    """

    predict_output_dir: Path = Path("predictions")
    """Where ``predict`` writes per-input files beside ``predictions.csv`` (set by the ``PredictionWriter``)."""
    main_metric: str = "loss"
    """The task's headline metric (``top1``, ``miou``, ``dice``), logged as ``train/<name>`` and ``val/<name>``; drawn
    beside the loss in the run's ``curves.png``."""

    def __init__(
        self,
        *,
        backbone: str,
        backbone_kwargs: dict[str, Any] | None = None,
        num_classes: int,
        class_names: list[str] | None = None,
        pretrained: str | None = None,
        loss_weights: dict[str, float] | None = None,
        nonfinite_loss: Literal["stop", "skip"] = "stop",
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
        rsqrt_timescale: int = 10_000,
        cooldown_steps: int = 0,
        freeze_backbone: bool = False,
        compile: bool = False,
        compile_options: dict[str, Any] | None = None,
        cpu_kernels: CpuKernels = "off",
        activation_checkpointing: bool = False,
        token_reduction: dict[str, Any] | None = None,
        token_merging: int | list[int] | dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # the subclass's arguments too (``build_head`` and ``build_metrics`` read them); the class names are kept in
        # checkpoints apart from the hyperparameters, which Lightning must not merge with the data's (a file there)
        self.save_hyperparameters(ignore=["class_names"])
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.class_names: list[str] | None = list(class_names) if class_names else None
        self.backbone: Backbone = create_backbone(backbone, **(backbone_kwargs or {}))
        self._reduce_backbone_tokens(freeze_backbone)  # before the head reads it and before its weights load
        self.head: nn.Module = self.build_head()
        use_cpu_kernels(self.backbone, cpu_kernels)  # plain PyTorch unless cpu_kernels asks for ops/' kernels
        use_cpu_kernels(self.head, cpu_kernels)
        self.backbone.set_activation_checkpointing(activation_checkpointing)
        if pretrained:
            from backbones.weights import load_pretrained

            self.load_report = load_pretrained(self, pretrained)
            self.load_report.take_conventions(self.hparams)  # e.g. align_corners of an smp file, unless the config sets it
            rank_zero_info(self.load_report.summary())
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        self.metrics = nn.ModuleDict({f"{s}_metrics": self.build_metrics(s).clone(prefix=f"{s}/") for s in ("train", "val", "test")})
        # sample-weighted mean over all processes (a mean of per-process means is wrong when shards differ in size)
        self.losses = nn.ModuleDict({f"{s}_loss": MeanMetric(nan_strategy="disable") for s in ("train", "val", "test")})
        if compile:  # the module's forward (backbone and head); the step, loss and metrics run outside it
            self.compile(**(compile_options or {}))

    def _reduce_backbone_tokens(self, freeze_backbone: bool) -> None:
        """Wrap the backbone as ``token_reduction_options`` asks and fix the parameters it declares frozen."""
        options = self.token_reduction_options()
        if options is not None:
            self.backbone = reduce_tokens(self.backbone, **options)
        added = self.backbone.fine_tuning().added
        if freeze_backbone and added:
            raise ValueError(
                f"freeze_backbone would freeze the modules {self.backbone.token_reduction} adds ({', '.join(added)}) "
                "too; use pretrained_frozen_epochs"
            )
        for param in self.backbone.frozen_parameters():
            param.requires_grad_(False)

    def class_name(self, index: int) -> str:
        return self.class_names[index] if self.class_names and index < len(self.class_names) else str(index)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["class_names"] = self.class_names

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the checkpoint's class names (they replace the data's numbers ``0, 1, ..`` where it names none); data
        with other classes, or the same in another order, would score and name every prediction against the wrong
        class, so it stops here."""
        saved = checkpoint.get("class_names")
        numbered = self.class_names == [str(i) for i in range(len(self.class_names or []))]  # data without names
        if saved and numbered and len(saved) == len(self.class_names):
            self.class_names = list(saved)
        if self.class_names and saved and list(saved) != list(self.class_names):
            order = (
                " (the same names in another order: an image folder's classes are its sub-folders sorted by name, "
                "the built-in data sets keep their own order)"
                if sorted(saved) == sorted(self.class_names)
                else ""
            )
            raise ValueError(
                f"the checkpoint's classes are {list(saved)}, the data's are {list(self.class_names)}{order}; "
                "evaluate on data with the checkpoint's classes, or fine-tune from it with --model.pretrained"
            )
        self.class_names = self.class_names or saved

    def train(self, mode: bool = True) -> TaskModule:
        """As ``nn.Module.train``, but a frozen backbone stays in eval mode through Lightning's ``train()`` calls."""
        super().train(mode)
        if self.hparams.freeze_backbone:
            self.backbone.eval()
        return self

    def configure_model(self) -> None:
        """Under ``--trainer.strategy fsdp`` (``engine.distributed.FullyShardedStrategy``), shard the backbone's blocks
        and the rest of the model over the processes; other strategies leave the model as it is."""
        if self.device_mesh is not None:
            shard_task_module(self, self.backbone.sharding_units(), self.device_mesh["data_parallel"])

    def configure_callbacks(self) -> list[L.Callback]:
        """The run-state callbacks (``run_state.py``): per-step seeding, dynamic choices, mid-epoch resume; and the
        pictures at each validation and the curves at the end of fit (``pictures.py``)."""
        return [*run_state_callbacks(), *logging_callbacks()]

    @property
    def example_input_array(self) -> torch.Tensor | None:
        """An example set by hand, else ``example_input()``: the model summary runs it to count the FLOPs."""
        return self._example_input_array if self._example_input_array is not None else self.example_input()

    @example_input_array.setter
    def example_input_array(self, example: torch.Tensor | None) -> None:
        self._example_input_array = example

    # --- what a task supplies -------------------------------------------------------------------------

    def token_reduction_options(self) -> dict[str, Any] | None:
        """How the backbone runs fewer tokens through its later blocks, from the task's hyper-parameters: the
        ``method`` and options of ``backbones.token_reduction.reduce_tokens``; ``None``: it does not. Default: the
        ``token_reduction`` argument; a task maps its own options (``token_pruning``) here."""
        hp = self.hparams
        options = None if hp.token_reduction is None else dict(hp.token_reduction)
        if hp.token_merging is not None:
            if options is not None:
                raise ValueError(f"token_merging={hp.token_merging} and token_reduction={options} both reduce tokens; set one")
            options = merge_options(hp.token_merging)
        return options

    def build_head(self) -> nn.Module:
        raise NotImplementedError

    def build_metrics(self, stage: Stage) -> MetricCollection:
        """The metrics of ``stage`` (called once per stage; the base adds the ``<stage>/`` prefix)."""
        raise NotImplementedError

    def compute_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def auxiliary_losses(self, batch: dict[str, Any], output: torch.Tensor, stage: Stage) -> dict[str, AuxiliaryLoss]:
        """The losses besides the task loss of this forward pass: those the backbone and head left
        (``AuxiliaryLossSource``); tasks add their own (distillation). Called once per step, right after the
        forward pass, in every stage (so nothing stale is left); only training adds them to the loss."""
        losses: dict[str, AuxiliaryLoss] = {}
        for part in (self.backbone, self.head):
            if isinstance(part, AuxiliaryLossSource):
                losses.update(part.pop_auxiliary_losses())
        if stage == "train":  # what the backbone reports of this pass (a pruned ViT's kept fraction per stage)
            for name, value in self.backbone.training_logs().items():
                self.log(f"train/{name}", value, on_step=True, on_epoch=True, batch_size=batch["target"].shape[0])
        return losses

    def task_loss_weight(self, stage: Stage) -> float:
        """Weight of the task loss in the training objective (below 1 where distillation takes a share)."""
        return 1.0

    def picture_maker(self) -> PictureMaker | None:
        """What the task draws at each validation for the loggers that take images (``picture_makers.py``)."""
        return None

    def example_input(self) -> torch.Tensor | None:
        """One zero sample at the size this run feeds the model (the DataModule's declared ``input_size``), for the
        model summary's FLOPs; ``None`` where the size is not known."""
        data = self._trainer.datamodule if self._trainer is not None else None
        size = data.input_size() if isinstance(data, TaskDataModule) else None
        return None if size is None else torch.zeros(1, self.backbone.in_chans, *size)

    # --- the loop, once ---------------------------------------------------------------------------------

    def shared_step(self, batch: dict[str, Any], stage: Stage) -> torch.Tensor | None:
        outputs = self.step_outputs(batch, stage)
        return None if outputs is None else outputs["loss"]

    def step_outputs(self, batch: dict[str, Any], stage: Stage) -> dict[str, Any] | None:
        """The step of every stage; returns the loss, the prepared batch and the (detached) output, which validation
        hands to callbacks (``pictures.ValidationPictures``), or ``None`` for a skipped batch."""
        if self.skip_batch(batch, stage):
            return None
        batch = self.prepare_batch(batch, stage)
        output = self.forward_stage(batch["input"], stage)
        output = output.float() if output.is_floating_point() else output  # labels (whole-volume evaluation) stay
        auxiliary = self.auxiliary_losses(batch, output, stage)
        target = batch["target"]
        with torch.autocast(self.device.type, enabled=False):  # loss and metrics in fp32 under any precision
            loss = self.compute_loss(output, batch.get("loss_target", target))
            terms = {"task": loss, **{name: term.value for name, term in auxiliary.items()}}
            if stage == "train" and not self.check_finite(terms, batch):
                return None  # skipped (nonfinite_loss: skip): no metric, no optimizer step
            metrics = self.metrics[f"{stage}_metrics"]
            metrics.update(*self.metric_inputs(output, target))
            if stage == "train" and auxiliary:
                loss = self.add_auxiliary_losses(loss, auxiliary, batch_size=target.shape[0])
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
        return {"loss": loss, "batch": batch, "output": output.detach()}

    def add_auxiliary_losses(self, loss: torch.Tensor, auxiliary: dict[str, AuxiliaryLoss], batch_size: int) -> torch.Tensor:
        """The training objective: the task loss times ``task_loss_weight`` plus each auxiliary loss times its
        weight (``loss_weights`` overrides the default); the unweighted terms are logged as ``train/loss_<name>``."""
        overrides = self.hparams.loss_weights or {}
        unknown = sorted(set(overrides) - set(auxiliary))
        if unknown:
            raise ValueError(f"loss_weights names {unknown}, but this model's auxiliary losses are {sorted(auxiliary)}")
        self.log("train/loss_task", loss.detach(), on_step=True, on_epoch=True, batch_size=batch_size)
        total = loss * self.task_loss_weight("train")
        for name, term in auxiliary.items():
            value = term.value.float()
            self.log(f"train/loss_{name}", value.detach(), on_step=True, on_epoch=True, batch_size=batch_size)
            total = total + overrides.get(name, term.weight) * value
        return total

    def check_finite(self, terms: dict[str, torch.Tensor], batch: dict[str, Any]) -> bool:
        """Whether every loss term (``task`` and the auxiliary ones) is finite on every process, checked before the
        optimizer step; when one is not, stop the run (``NonFiniteLossError``) or, with ``nonfinite_loss: skip``,
        warn, count the step and return ``False``. Either way the step, the batch's files and the terms are named."""
        trainer = self._trainer
        bad = {name: value for name, value in terms.items() if not bool(torch.isfinite(value.detach()).all())}
        if trainer is None:
            return not bad
        finite = not bad
        if trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return True
        which = ", ".join(f"{name}={value.detach().float().mean().item()}" for name, value in bad.items())
        files = [str(p) for p in batch.get("path", [])]
        shown = ", ".join(files[:8]) + (f", ... ({len(files)} in all)" if len(files) > 8 else "")
        callback = trainer.checkpoint_callback
        kept = (callback.last_model_path if callback is not None else "") or "none written yet"
        where = (
            f"at global step {trainer.global_step} (epoch {trainer.current_epoch}, rank {trainer.global_rank}): "
            f"{which or 'finite here, non-finite on another process'}; batch files: {shown or 'not listed'}"
        )
        if self.hparams.get("nonfinite_loss", "stop") != "skip":
            raise NonFiniteLossError(
                f"training loss went non-finite {where}; stopped before the optimizer step. Last good checkpoint: "
                f"{kept} (nonfinite_loss: skip skips such steps)"
            )
        rank_zero_warn(f"skipping a step whose training loss went non-finite {where}")
        self.log("train/nonfinite_steps", 1.0, on_step=False, on_epoch=True, reduce_fx="sum", batch_size=1)
        return False

    def forward_stage(self, x: torch.Tensor, stage: Stage) -> torch.Tensor:
        """The forward pass used in ``stage``; tasks override it for sliding-window or multi-view testing."""
        return self(x)

    def metric_inputs(self, output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What the metric collection is updated with; tasks override it to pass probabilities or labels."""
        return output, target

    def skip_batch(self, batch: dict[str, Any], stage: Stage) -> bool:
        """Whether the step has nothing to learn from (a video batch whose every clip failed to decode); the
        task counts and reports what it skips. A skipped training step makes no optimizer step."""
        return False

    def prepare_batch(self, batch: dict[str, Any], stage: Stage) -> dict[str, Any]:
        """Hook for batch-level augmentation (mixup) before the forward pass."""
        return batch

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        passes = self.backbone.training_passes()
        if passes is not None:  # a super-network's sandwich of sub-networks
            return sandwich_step(self, batch, passes)
        return self.shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any] | None:
        return self.step_outputs(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.shared_step(batch, "test")

    def train_accumulators(self) -> dict[str, Any]:
        """The epoch's training loss and metric states (saved with mid-epoch checkpoints by ``MidEpochResume``)."""
        return {"loss": self.losses["train_loss"], **dict(self.metrics["train_metrics"].items(keep_base=True))}

    # --- optimisation -------------------------------------------------------------------------------------

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Backbone and head, each split into decayed weights and undecayed norms/biases/embeddings. The modules a
        wrapper added to a pretrained backbone (``Backbone.fine_tuning``: a pruned ViT's predictors) get groups of
        their own at ``lr``; the pretrained network, head included, takes ``lr * pretrained_lr_mult`` and stays
        fixed for the first ``pretrained_frozen_epochs``."""
        hp = self.hparams
        head_wd = hp.weight_decay if hp.head_weight_decay is None else hp.head_weight_decay
        tuning = self.backbone.fine_tuning()
        lr = hp.lr * tuning.pretrained_lr_mult
        added = {id(p) for module in tuning.added.values() for p in module.parameters()}
        pretrained = [(n, p) for n, p in self.backbone.named_parameters() if id(p) not in added]
        parts = [("backbone", pretrained, lr, hp.weight_decay), ("head", self.head, lr * hp.head_lr_mult, head_wd)]
        parts += [(name, module, hp.lr, hp.weight_decay) for name, module in tuning.added.items()]
        groups = parameter_groups(parts, self.backbone.no_weight_decay())
        for group in groups:
            if tuning.pretrained_frozen_epochs and group["name"].removesuffix("_no_decay") in ("backbone", "head"):
                group["frozen_epochs"] = tuning.pretrained_frozen_epochs
        return groups

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        drop_frozen_gradients(optimizer, self.current_epoch)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        opt = build_optimizer(hp.optimizer, self.parameter_groups(), lr=hp.lr, momentum=hp.momentum, betas=hp.betas)
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
            timescale=hp.rsqrt_timescale,
            cooldown_steps=hp.cooldown_steps,
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _steps_per_epoch(self) -> float:
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches):
            raise ValueError("warmup_epochs/step_milestones need a sized training set; use warmup_steps")
        return batches / self.trainer.accumulate_grad_batches
