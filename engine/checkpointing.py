"""Checkpoints a crash cannot spoil: ``last.ckpt`` rewritten on an interval, each write atomic.

``fit --ckpt_path last`` then resumes where the file left off; together with the seeded, resumable training
loader (``datamodules/sampling.py``) and the run-state callbacks (``run_state.py``), a resumed run ends with
the same weights as an uninterrupted one.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from datamodules.errors import CheckpointError
from datamodules.io import atomic_write

LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")  # --ckpt_path values Lightning resolves itself


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
        remove_stale_temporaries(path)
        atomic_write(path, write, size_hint=tensor_bytes(checkpoint))  # out of space: a DiskFullError, no partial file
        fd = os.open(folder, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors in ``obj`` (nested dicts, lists, tuples): about the size torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporary files ``atomic_write`` left beside ``path`` when a process was killed while writing
    it (``.last.ckpt.<8 random characters>.ckpt``), and return them. Called as each write starts: one process
    writes a given checkpoint at a time, so any such file is the remains of a write that never finished."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[A-Za-z0-9_]{{8}}{re.escape(path.suffix)}")
    stale = [p for p in path.parent.glob(f".{path.name}.*") if pattern.fullmatch(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


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

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """On SIGTERM (or SIGUSR1, ``run_state.Preemption``) Lightning's loop stops at the end of a training step
        with ``SIGTERMException``: save ``last.ckpt`` there, so ``--ckpt_path last`` resumes the run exactly. Other
        exceptions (a NaN loss, a crash) save nothing: the last checkpoint written stays the newest."""
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            rank_zero_info(f"preempted at global step {trainer.global_step}: saved {self.last_model_path}")


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since 1.6, and numpy's .npz


def checkpoint_damage(path: str | Path) -> str | None:
    """Why the file at ``path`` is damaged (``None`` when it is sound), checked in full without unpickling
    anything: a zip (torch's format, ``.npz``) must have its central directory and every record must match its
    CRC (``zipfile.ZipFile.testzip``, which reads the whole file: torch.load itself checks no CRC and loads
    flipped bits silently); a safetensors header must cover the file. Torch's legacy format has no checksum:
    ``None`` for it, torch.load is the test."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt"):
                return None
        except Exception as err:  # noqa: BLE001  SafetensorError, OSError: the reason is what matters
            return f"damaged safetensors file: {err}"
    with open(path, "rb") as f:
        if f.read(4) != ZIP_MAGIC:
            return None
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"truncated: its zip directory is missing or damaged ({err}); was it written or copied in full?"
    return None if bad is None else f"corrupt: the record {bad!r} fails its CRC check"


def check_weights_file(value: str | None, option: str) -> None:
    """Raise a ``CheckpointError`` naming ``option``'s file (``--model.pretrained``, ``--model.teacher_pretrained``)
    when it is missing or damaged (``checkpoint_damage``); Hub names (``hf-hub:``, ``timm:``) are left to the hub."""
    if not value or ":" in str(value).split("/")[0]:
        return
    path = Path(value)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found ({option})")
    damage = checkpoint_damage(path)
    if damage:
        raise CheckpointError(f"{path}: unreadable weights file ({option}), {damage}")


def resolve_last(last_dir: str | Path) -> Path | None:
    """The checkpoint ``--ckpt_path last`` resumes from: ``<last_dir>/last.ckpt`` when it is sound, else the newest
    sound ``*.ckpt`` beside it, with a warning naming both (``None`` when the folder holds no checkpoint).
    Raises a ``CheckpointError`` when ``last.ckpt`` is damaged and nothing else there is sound."""
    last = Path(last_dir) / "last.ckpt"
    if not last.is_file():
        return None
    damage = checkpoint_damage(last)
    if damage is None:
        return last
    others = sorted((p for p in Path(last_dir).glob("*.ckpt") if p != last), key=lambda p: p.stat().st_mtime, reverse=True)
    for other in others:
        if checkpoint_damage(other) is None:
            rank_zero_warn(f"{last} is unreadable ({damage}); resuming from {other}, the newest readable checkpoint there")
            return other
    raise CheckpointError(f"{last}: unreadable checkpoint, {damage}; no other readable *.ckpt in {last_dir}")


def check_trainer_checkpoint(ckpt_path: str | Path | None, last_dir: str | Path | None = None) -> str | None:
    """Raise a ``CheckpointError`` naming ``--ckpt_path``'s file and what it is when the trainer could not start
    from it: missing, damaged (``checkpoint_damage``: truncated, a CRC that does not match) or not a Lightning
    checkpoint (a plain state dict, a safetensors file, which ``--model.pretrained`` takes); return the path to
    start from. ``last`` becomes the file ``resolve_last`` finds in ``last_dir`` (stays ``last`` when there is
    none). The file is read with ``weights_only=True`` and memory-mapped, so no code in it runs and its tensors
    are not loaded; one that holds more than plain types is left to Lightning."""
    if ckpt_path is None:
        return None
    path = Path(ckpt_path)
    if str(ckpt_path) == "last" and last_dir is not None and Path(last_dir).is_dir():
        found = resolve_last(last_dir)
        if found is None:
            return str(ckpt_path)
        path = found
    elif str(ckpt_path).split(":")[0] in LIGHTNING_CKPT_NAMES or "://" in str(ckpt_path):
        return str(ckpt_path)
    hint = f"--ckpt_path takes a checkpoint a run wrote (runs/.../last.ckpt); load plain weights with --model.pretrained {path}"
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found (--ckpt_path)")
    if path.suffix == ".safetensors":
        raise CheckpointError(f"{path}: a safetensors weights file, not a Lightning checkpoint; {hint}")
    damage = checkpoint_damage(path)
    if damage:
        raise CheckpointError(f"{path}: unreadable checkpoint, {damage}")
    try:
        try:
            content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            content = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            return str(path)  # it holds objects beyond plain types (hyperparameters of a class): Lightning reads it
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({err}); {hint}") from err
    except Exception as err:  # torch raises several types for truncated or corrupt files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: unreadable checkpoint (truncated or corrupt?): {reason}") from err
    if isinstance(content, dict) and "pytorch-lightning_version" in content and "state_dict" in content:
        return str(path)
    if isinstance(content, dict) and content and all(isinstance(v, torch.Tensor) for v in content.values()):
        what = f"a plain state dict of {len(content)} tensors"
    elif isinstance(content, dict):
        what = f"a dict with keys {sorted(map(str, content))[:6]}"
    else:
        what = f"a {type(content).__name__}"
    raise CheckpointError(f"{path}: {what}, not a Lightning checkpoint (no 'pytorch-lightning_version'); {hint}")
