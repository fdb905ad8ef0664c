"""``FewShotEvaluator``: big_vision's few-shot linear evaluation as a training callback, so a run tracks its
representation while it trains, as the scaling paper does (``--trainer.callbacks+=FewShotEvaluator``).

Every ``every_n_steps`` optimizer steps the frozen pre-logits of the evaluation data are extracted (eval mode, no
gradient, each module's mode restored, the global random generators untouched) and ``engine.fewshot``'s closed-form
ridge gives top-1 per number of shots; ``fewshot/<shots>shot`` (mean over seeds) goes to the trainer's loggers.

Several processes share the work: each extracts the features of its contiguous slice of the images (the last
slice padded, so every rank runs the same number of forward passes and DDP/FSDP collectives pair up), the slices
are gathered, and every rank solves the same small regression; rank 0 logs.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from datamodules.classification import ClassificationDataModule

from .fewshot import check_shots, extract_features, fewshot_datasets, fewshot_table

_COPIED = ("image_size", "crop_pct", "interpolation", "mean", "std", "batch_size", "num_workers")


class FewShotEvaluator(L.Callback):
    """Few-shot linear evaluation (big_vision's ``fewshot_lsr``) every ``every_n_steps`` training steps.

    Args:
        every_n_steps: optimizer steps between evaluations (at steps N, 2N, ...).
        shots: training images per class drawn for each regression.
        seeds: draws per number of shots; the logged value is their mean.
        l2_reg: ridge regularisation λ (big_vision: 1024).
        data_root: an ImageFolder with ``train/`` and ``val/``, read with the task data's image size and
            normalisation; ``None``: the task's own data (its training images without augmentation, and its
            validation split).
        batch_size, num_workers: of the feature extraction; ``None``: the task data's.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        shots: Sequence[int] = (1, 5, 10, 25),
        seeds: int = 3,
        l2_reg: float = 1024.0,
        data_root: str | None = None,
        batch_size: int | None = None,
        num_workers: int | None = None,
    ) -> None:
        if every_n_steps < 1 or seeds < 1 or not shots or min(shots) < 1:
            raise ValueError(f"FewShotEvaluator needs every_n_steps >= 1, seeds >= 1 and shots >= 1, got "
                             f"{every_n_steps}, {seeds}, {list(shots)}")
        self.every_n_steps, self.shots, self.seeds, self.l2_reg = every_n_steps, tuple(shots), seeds, l2_reg
        self.data_root, self.batch_size, self.num_workers = data_root, batch_size, num_workers
        self.results: dict[int, list[float]] = {}
        self.history: list[tuple[int, dict[str, float]]] = []
        self._loaders: list[DataLoader] = []
        self._sizes: list[int] = []
        self._class_names: list[str] = []
        self._last_step = -1

    def _data(self, trainer: L.Trainer) -> ClassificationDataModule:
        task_data = trainer.datamodule
        if self.data_root is None:
            if not isinstance(task_data, ClassificationDataModule):
                raise ValueError(f"FewShotEvaluator without data_root reads the task's ImageFolder data; this run's data "
                                 f"is {type(task_data).__name__}: set data_root")
            return task_data
        copied = {k: task_data.hparams[k] for k in _COPIED} if isinstance(task_data, ClassificationDataModule) else {}
        data = ClassificationDataModule(self.data_root, **copied)
        data.prepare_data()
        return data

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        data = self._data(trainer)
        train_set, val_set = fewshot_datasets(data)
        check_shots(train_set, self.shots, data.class_names)  # before training, not at step N
        self._class_names = list(data.class_names)
        batch_size = self.batch_size or data.hparams.batch_size
        workers = data.num_workers if self.num_workers is None else self.num_workers
        rank, world = trainer.global_rank, trainer.world_size
        self._sizes = [len(train_set), len(val_set)]
        self._loaders = [
            DataLoader(
                rank_slice(ds, rank, world), batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0,
                pin_memory=trainer.strategy.root_device.type == "cuda", generator=torch.Generator(),  # never the global generator
            )
            for ds in (train_set, val_set)
        ]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self._last_step:  # (several batches share a step
            return  # under gradient accumulation)
        self._last_step = step
        self.results = self.evaluate(trainer, pl_module)
        metrics = {f"fewshot/{n}shot": float(np.mean(accs)) for n, accs in self.results.items()}
        self.history.append((step, metrics))
        for logger in trainer.loggers:  # rank 0 only (the loggers' own rule)
            logger.log_metrics(metrics, step=step)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[int, list[float]]:
        """Top-1 per number of shots, one value per seed, on every rank."""
        wrapper = trainer.strategy.model  # a DDP/FSDP wrapper (FSDP gathers its shards in forward), or pl_module
        network = wrapper if wrapper is not None else pl_module
        with global_rngs_kept(pl_module.device), trainer.precision_plugin.forward_context():
            features = [extract_features(pl_module, loader, forward=network) for loader in self._loaders]
        gathered = [tuple(_gather(trainer, t, n).cpu() for t in pair) for pair, n in zip(features, self._sizes)]
        return fewshot_table(gathered[0], gathered[1], self._class_names, self.shots, range(self.seeds), self.l2_reg)


def rank_slice(dataset: Dataset, rank: int, world: int) -> Dataset:
    """Rank ``rank``'s contiguous ``ceil(N / world)`` samples, the last rank's padded with the final sample, so the
    slices of all ranks concatenated in rank order start with the whole data set, in order."""
    if world == 1:
        return dataset
    n = len(dataset)
    size = -(-n // world)
    return Subset(dataset, [min(i, n - 1) for i in range(rank * size, (rank + 1) * size)])


def _gather(trainer: L.Trainer, tensor: torch.Tensor, n: int) -> torch.Tensor:
    """The ranks' slices ``[ceil(N / world), ...]`` gathered and trimmed to the data set's ``[N, ...]``."""
    if trainer.world_size == 1:
        return tensor
    return trainer.strategy.all_gather(tensor).flatten(0, 1)[:n]  # [world, size, ...] -> [N, ...]


@contextmanager
def global_rngs_kept(device: torch.device) -> Iterator[None]:
    """Python's, numpy's and torch's (CPU and ``device``'s) global random states put back on exit: evaluating
    leaves the training's random stream where it was."""
    states = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
