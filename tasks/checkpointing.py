"""Checkpoints a crash cannot spoil: ``last.ckpt`` rewritten on an interval, each write atomic.

``fit --ckpt_path last`` then resumes where the file left off; together with the seeded, resumable training
loader (``datamodules/sampling.py``) and the run-state callbacks (``run_state.py``), a resumed run ends with
the same weights as an uninterrupted one.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from datamodules.io import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file in its own folder, flush it to disk and rename it over the old
    one, so a kill or power loss at any moment leaves the previous file or the new one, both complete.

    Lightning's own writer stages the bytes in the system temp folder and then *moves* them: when that folder is
    on another file system (tmpfs, a local disk under network storage) the move is a copy into the final name,
    and a process killed during it leaves a truncated ``last.ckpt``. Remote (fsspec) paths keep Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())

        folder = os.path.dirname(os.path.abspath(path))
        atomic_write(path, write)
        fd = os.open(folder, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class LastCheckpoint(ModelCheckpoint):
    """Keep ``<dirpath>/last.ckpt`` up to date: every ``every_n_train_steps`` optimizer steps (or every
    ``every_n_minutes``), at the end of every epoch (after its validation) and at the end of training.
    Only that file is kept; add a ``ModelCheckpoint(monitor=...)`` to ``trainer.callbacks`` for best-k files.

    Args:
        dirpath: folder of ``last.ckpt``; the CLI defaults it to ``<trainer.default_root_dir>/checkpoints`` so
            that ``--ckpt_path last`` finds it again whatever the logger's version folder.
        every_n_train_steps: step interval of the mid-epoch saves; ``0`` saves at epoch ends only.
        every_n_minutes: a wall-clock interval instead of steps (takes precedence when set).
    """

    def __init__(
        self, dirpath: str | None = None, *, every_n_train_steps: int = 500, every_n_minutes: float | None = None
    ) -> None:
        if every_n_train_steps < 0 or (every_n_minutes is not None and every_n_minutes <= 0):
            raise ValueError(f"checkpoint intervals must be positive, got {every_n_train_steps=}, {every_n_minutes=}")
        timed = every_n_minutes is not None
        super().__init__(
            dirpath=dirpath,
            save_last=True,
            save_top_k=0,
            every_n_train_steps=None if timed else every_n_train_steps,
            train_time_interval=timedelta(minutes=every_n_minutes) if timed else None,
            enable_version_counter=False,
        )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # unconditionally: a step save at the epoch's last batch came before the epoch's validation
        if not (trainer.fast_dev_run or trainer.sanity_checking):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
