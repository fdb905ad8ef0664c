"""What a command tells the user when it ends: where its outputs went. And what it does not: Lightning's tips
advertising its cloud services.

- ``fit``: the run folder, the best and last checkpoints, ``curves.png`` and the ``tensorboard --logdir`` line.
- ``validate`` / ``test``: the metrics file (the CSV logger's ``metrics.csv``).
- ``predict``: the predictions folder and what it holds.
- ``export`` says its file itself (``engine/export.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from .pictures import FinalCurves, run_folder
from .predict import PredictionWriter

TIP_PREFIX = "💡 Tip:"
TIP_LOGGERS = ("lightning_utilities.core.rank_zero", "lightning.pytorch.utilities.rank_zero")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TIP_PREFIX)


def silence_lightning_tips() -> None:
    """Drop Lightning's "💡 Tip: … try installing litlogger / litmodels" lines; its other messages stay."""
    for name in TIP_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())


def fit_outputs(trainer: L.Trainer) -> list[str]:
    """Lines naming the run folder, the checkpoints, the curves and how to open TensorBoard on the run."""
    lines = []
    if trainer.loggers:
        lines.append(f"run folder: {run_folder(trainer)}")
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        if callback.monitor and callback.best_model_path:
            score = callback.best_model_score
            shown = f" ({callback.monitor} {float(score):.4g})" if score is not None else ""
            lines.append(f"best checkpoint{shown}: {callback.best_model_path}")
        if callback.last_model_path:
            lines.append(f"last checkpoint: {callback.last_model_path}")
    if lines and not any(getattr(c, "monitor", None) for c in trainer.checkpoint_callbacks):
        lines.append("best checkpoint: none kept (add a ModelCheckpoint with a monitor to trainer.callbacks)")
    curves = [c for c in trainer.callbacks if isinstance(c, FinalCurves)]
    if curves and trainer.loggers and (run_folder(trainer) / curves[0].filename).is_file():
        lines.append(f"curves: {run_folder(trainer) / curves[0].filename}")
    boards = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
    if boards:
        lines.append(f"TensorBoard: tensorboard --logdir {boards[0].log_dir}")
    return lines


def metrics_outputs(trainer: L.Trainer) -> list[str]:
    """The metrics file of a ``validate`` or ``test`` run, and its TensorBoard events."""
    lines = []
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger) and (Path(logger.log_dir) / "metrics.csv").is_file():
            lines.append(f"metrics: {Path(logger.log_dir) / 'metrics.csv'}")
        if isinstance(logger, TensorBoardLogger):
            lines.append(f"TensorBoard: tensorboard --logdir {logger.log_dir}")
    return lines


def predict_outputs(trainer: L.Trainer) -> list[str]:
    """The predictions folder: ``predictions.csv`` and the per-sample folders or files beside it."""
    lines = []
    for writer in (c for c in trainer.callbacks if isinstance(c, PredictionWriter)):
        folder = writer.output_dir
        if folder.is_dir():
            entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if not p.name.startswith("."))
            shown = ", ".join(entries[:6]) + (f", … ({len(entries)} entries)" if len(entries) > 6 else "")
            lines.append(f"predictions: {folder}/ ({shown})")
    return lines


OUTPUTS = {"fit": fit_outputs, "validate": metrics_outputs, "test": metrics_outputs, "predict": predict_outputs}


def print_outputs(trainer: L.Trainer, subcommand: str) -> None:
    """Print, on rank 0, where ``subcommand``'s outputs went (nothing when it wrote nothing)."""
    if not trainer.is_global_zero or subcommand not in OUTPUTS:
        return
    lines = OUTPUTS[subcommand](trainer)
    if lines:
        print(f"{subcommand} wrote:\n" + "\n".join(f"  {line}" for line in lines), flush=True)
