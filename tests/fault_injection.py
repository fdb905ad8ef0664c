"""Callbacks that break a run on purpose, for the fault-tolerance tests (loaded by the CLI in a subprocess)."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILL this process right after optimizer step ``step`` (before any checkpoint of that step)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class NanInputAtStep(L.Callback):
    """Fill the input batch with NaN at optimizer step ``step`` (on process ``rank`` only, if given), as a
    corrupt sample would."""

    def __init__(self, step: int, rank: int | None = None) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            batch["input"].fill_(float("nan"))


class SignalAtStep(L.Callback):
    """Send this process ``signum`` (a name: ``SIGTERM``, ``SIGUSR1``) right after optimizer step ``step`` (or, with
    ``in_validation``, after the first batch of the validation that follows it), as a scheduler preempting the job
    would."""

    def __init__(self, step: int, signum: str = "SIGTERM", in_validation: bool = False) -> None:
        self.step, self.signum, self.in_validation = step, getattr(signal, signum), in_validation

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step and not self.in_validation:
            os.kill(os.getpid(), self.signum)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.global_step == self.step and self.in_validation and not trainer.sanity_checking and batch_idx == 0:
            os.kill(os.getpid(), self.signum)
