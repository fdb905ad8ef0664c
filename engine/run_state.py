"""Run-state: what makes a run repeatable across processes and restarts, kept out of the LightningModule.

Three callbacks, which every ``TaskModule`` hands to its trainer (``configure_callbacks``), so the CLI and a
hand-built ``Trainer`` get them alike:

- ``StepSeeding``: the global generators (dropout, drop path, mixup) are seeded before each training step from
  ``(seed, epoch, batch, rank)``, so a step's random state depends on nothing before it;
- ``DynamicChoices``: a dynamic backbone's choices (a super-network's sub-network) are drawn before each
  training step from a generator seeded by ``(seed, epoch, batch)`` and never the rank, so every DDP process
  runs the same sub-network and a resumed run draws what the uninterrupted run drew;
- ``MidEpochResume``: the epoch's training accumulators (loss and metrics) go into each mid-epoch checkpoint,
  and a fit resumed from one makes the training loader skip the batches already trained on and puts the
  accumulators back;
- ``Preemption``: SIGTERM and SIGUSR1 acted on where a checkpoint holds whole steps and validations.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torchmetrics import Metric

from datamodules.sampling import ResumableDataLoader, derive_seed, seed_global_rngs


def run_seed() -> int | None:
    """The run's seed (``seed_everything``, LightningCLI's ``--seed_everything``), ``None`` when unset."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return None if seed is None else int(seed)


class StepSeeding(L.Callback):
    """Seed python's, numpy's and torch's global generators before each training step from
    ``(seed, epoch, batch, rank)``; nothing happens without a run seed."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        seed = run_seed()
        if seed is not None:
            seed_global_rngs(derive_seed(seed, trainer.current_epoch, batch_idx, trainer.global_rank), accelerators=True)


class DynamicChoices(L.Callback):
    """Before each training step, tell the backbone the epoch (``set_epoch``) and draw its dynamic choices
    (``Backbone.sample_subnet``) from a
    generator seeded by ``(seed, epoch, batch)`` (0 when the run has no seed) and make them active
    (``set_subnet``); validation, testing and prediction run the full network (``set_subnet(None)``).
    Does nothing for a fixed backbone."""

    salt = 0x5EB  # keeps these draws apart from StepSeeding's stream for the same step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        backbone = pl_module.backbone
        if not backbone.is_dynamic:
            return
        epoch = trainer.current_epoch
        generator = torch.Generator().manual_seed(derive_seed(run_seed() or 0, self.salt, epoch, batch_idx))
        backbone.set_epoch(epoch)
        backbone.set_subnet(backbone.sample_subnet(generator))

    def _full(self, pl_module: L.LightningModule) -> None:
        if pl_module.backbone.is_dynamic:
            pl_module.backbone.set_subnet(None)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._full(pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._full(pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._full(pl_module)


class MidEpochResume(L.Callback):
    """Save the epoch's training accumulators with a mid-epoch checkpoint; on a fit resumed from one, skip the
    batches of the epoch already trained on and restore the accumulators (summed over all processes, held by
    rank 0, so the next reduction counts every sample once)."""

    def __init__(self) -> None:
        self._states: dict[str, Any] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loop = trainer.fit_loop
        done = 0
        if loop.restarted_mid_epoch:  # the batches the epoch loop will count as done (its own arithmetic)
            done = loop.epoch_loop.batch_progress.current.completed + int(loop.epoch_loop.restarted_on_train_batch_end)
        done = done if done < trainer.num_training_batches else 0  # a finished epoch is not resumed
        loader = trainer.train_dataloader
        if isinstance(loader, ResumableDataLoader):
            loader.resume(trainer.current_epoch, done)
        states, self._states = self._states, None
        if done and states:
            restore_metric_states(pl_module.train_accumulators(), states, holder=trainer.global_rank == 0)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if trainer.state.fn == "fit" and 0 < done < trainer.num_training_batches:
            checkpoint["train_metric_states"] = global_metric_states(pl_module.train_accumulators())

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._states = checkpoint.get("train_metric_states")


class Preemption(L.Callback):
    """Act on SIGTERM (a scheduler preempting the job) and SIGUSR1 (SLURM's warning ahead of a time limit,
    ``#SBATCH --signal=USR1@120``) at the next boundary where a checkpoint holds whole work: the end of a training
    step, or, when the step is followed by a validation, the end of that validation, or at the epoch's last step the
    end of the epoch (so no validation or epoch-end metric is lost). There the handler Lightning installed runs:

    - SIGTERM: Lightning's, whose loop then stops (``SIGTERMException``); ``LastCheckpoint`` saves ``last.ckpt``
      and the CLI exits with a requeue status (``engine.cli.PREEMPTED_EXIT_CODE``);
    - SIGUSR1: Lightning's SLURM auto-requeue when it installed one (saves ``hpc_ckpt_<n>.ckpt``, requeues the job,
      and the run goes on until SLURM stops it), else it is taken as SIGTERM.

    Under DDP Lightning stops every rank when rank 0 got the signal (it broadcasts rank 0's decision each step)."""

    def __init__(self) -> None:
        self._pending: int | None = None
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning registered its handlers (Trainer._run); it puts back the ones from before when the run ends
        if threading.current_thread() is not threading.main_thread():
            return
        for name in ("SIGTERM", "SIGUSR1"):
            signum = getattr(signal, name, None)
            if signum is not None:
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._defer)

    def _defer(self, signum: int, frame: Any) -> None:
        if self._pending != signal.SIGTERM:  # a SIGTERM is not downgraded by a later SIGUSR1
            self._pending = signum

    def _deliver(self) -> None:
        signum, self._pending = self._pending, None
        if signum is None:
            return
        handler = self._previous.get(signum)
        if signum != signal.SIGTERM and not callable(handler):  # SIGUSR1 with no scheduler handler: stop
            signum, handler = signal.SIGTERM, self._previous.get(signal.SIGTERM)
        if callable(handler):
            handler(signum, None)
        elif signum == signal.SIGTERM:
            raise SIGTERMException  # no Lightning handler to stop the loop: stop it here

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        last = batch_idx + 1 >= trainer.num_training_batches
        every = trainer.val_check_batch
        validates = isinstance(every, int) and every > 0 and (batch_idx + 1) % every == 0
        if not (last or validates):
            self._deliver()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._deliver()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._deliver()  # Lightning stops after the epoch-end hooks, LastCheckpoint's save included

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._deliver()  # too late to stop anything; a SLURM handler still requeues


def run_state_callbacks() -> list[L.Callback]:
    return [StepSeeding(), DynamicChoices(), MidEpochResume(), Preemption()]


def global_metric_states(metrics: dict[str, Metric]) -> dict[str, dict[str, Any]]:
    """Each metric's accumulated states reduced over all processes (a collective: every rank must call it)."""
    states: dict[str, dict[str, Any]] = {}
    for name, metric in metrics.items():
        with metric.sync_context(should_unsync=True):
            states[name] = {k: _detached(v) for k, v in metric.metric_state.items()}
    return states


def restore_metric_states(metrics: dict[str, Metric], states: dict[str, dict[str, Any]], *, holder: bool) -> None:
    """Put states saved by ``global_metric_states`` back: the ``holder`` process gets the global accumulations,
    the others start empty, so the next reduction over processes counts every sample once."""
    for name, metric in metrics.items():
        metric.reset()
        if not holder or name not in states:
            continue
        defaults = metric.metric_state
        for key, value in states[name].items():
            value = _detached(value, metric.device)
            if isinstance(defaults[key], list) and isinstance(value, torch.Tensor):
                value = [value]  # a concatenated ("cat") state is a list of tensors
            setattr(metric, key, value)


def _detached(value: Any, device: torch.device | str = "cpu") -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, copy=True)
    return [_detached(v, device) for v in value] if isinstance(value, list) else value
