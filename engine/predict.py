"""Writing predictions: one CSV per run, per-sample files written atomically, each output written once."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from datamodules.io import atomic_write


class PredictionWriter(BasePredictionWriter):
    """Collect the rows that the module's ``predict_step`` returns and write ``<output_dir>/predictions.csv``.

    Tasks that produce an array per input (masks, volumes) return it in the row; the DataModule's
    ``write_prediction`` writes it in the data's own format under ``output_dir`` and gives back the row with
    the file's path. Under several processes each rank writes its own part, and rank 0 merges them in input
    order, so every prediction is written exactly once.

    Args:
        output_dir: folder for ``predictions.csv`` and per-sample outputs.
    """

    def __init__(self, output_dir: str = "predictions") -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.rows: list[dict[str, Any]] = []

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows = []
        pl_module.predict_output_dir = self.output_dir

    def write_on_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any, batch_indices: Sequence[int] | None,
        batch: Any, batch_idx: int, dataloader_idx: int,
    ) -> None:
        from datamodules.common import TaskDataModule

        datamodule = trainer.datamodule
        if isinstance(datamodule, TaskDataModule):
            prediction = [datamodule.write_prediction(row, self.output_dir) for row in prediction]
        self.rows.extend(prediction)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank, world = trainer.global_rank, trainer.world_size
        if world == 1:
            self._write_csv(self.output_dir / "predictions.csv", sorted(self.rows, key=lambda r: r["index"]))
            return
        part = self.output_dir / f".predictions.rank{rank}.pt"
        atomic_write(part, lambda tmp: torch.save(self.rows, tmp))
        trainer.strategy.barrier()
        if rank == 0:
            merged: dict[int, dict[str, Any]] = {}
            for r in range(world):
                shard = self.output_dir / f".predictions.rank{r}.pt"
                for row in torch.load(shard, weights_only=True):
                    merged.setdefault(row["index"], row)  # the distributed sampler pads with repeats
                shard.unlink()
            self._write_csv(self.output_dir / "predictions.csv", [merged[i] for i in sorted(merged)])
        trainer.strategy.barrier()

    @staticmethod
    def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
        columns = [c for c in (rows[0] if rows else {"index": 0}) if c != "index"]

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(path, write)
