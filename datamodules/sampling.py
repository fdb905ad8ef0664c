"""Loading that scales out and survives restarts: a training order that is a function of ``(seed, epoch)`` shared
by any number of processes, augmentation seeded per sample from ``(seed, epoch, index)``, a training loader that
can start an epoch after the batches a killed run already trained on, and evaluation shards that never repeat a
sample.

torch's ``RandomSampler`` draws its order from the global RNG, and albumentations/MONAI pipelines draw from their
own generators (albumentations seeds them from OS entropy), so neither is reproducible across a restart. Here an
uninterrupted run and a run resumed from ``last.ckpt`` see the same batches with the same augmentations, and a
run on ``N`` processes with batch ``B / N`` sees the same global batches as one process with batch ``B``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sized
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler, get_worker_info

from .workers import WatchedDataLoader

SampleKey = tuple[int, int]  # (epoch, dataset index)


def derive_seed(*keys: int) -> int:
    """A 32-bit seed hashed from non-negative integer keys, e.g. ``(seed, epoch, index)``."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def process_group() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def seed_global_rngs(seed: int, *, accelerators: bool = False) -> None:
    """Seed python's, numpy's and torch's global generators; torch's accelerator generators too if asked."""
    random.seed(seed)
    np.random.seed(seed)
    if accelerators:
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


@contextmanager
def isolated_global_rngs(seed: int) -> Iterator[None]:
    """Run the block with the global generators seeded from ``seed``, then put their previous states back, so
    seeding a sample in the training process leaves the model's random stream (dropout, drop path) untouched."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    seed_global_rngs(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class EpochShuffleSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled by ``seed + epoch``, padded to a multiple of the process count) that
    yields ``(epoch, index)`` keys for ``SeededSamples`` and can start an epoch part-way, after the samples a
    checkpointed run already trained on. ``num_replicas=1`` is the order of a one-process run.

    Args:
        dataset: the training set (only its length is used).
        seed: base of the shuffle; the same for every process.
        num_replicas, rank: process count and this process's rank.
    """

    def __init__(self, dataset: Sized, *, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)  # type: ignore[arg-type]
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, samples: int) -> None:
        """Make the next iteration of ``epoch`` skip this rank's first ``samples`` samples."""
        self._resume = (epoch, samples)

    def __iter__(self) -> Iterator[SampleKey]:  # type: ignore[override]
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start, self._resume = self._resume[1], None
        epoch = self.epoch
        for position, index in enumerate(super().__iter__()):
            if position >= start:
                yield epoch, index


class SeededSamples(Dataset):
    """A training set whose sample ``index`` in epoch ``e`` is drawn with every generator seeded from
    ``(seed, e, index)``: the dataset's own ``transform`` (albumentations, MONAI) and python's, numpy's and
    torch's global ones (put back afterwards in the training process itself, where the model draws from them).
    Keys are ``(epoch, index)`` pairs from ``EpochShuffleSampler``; a plain index counts as epoch 0. Other
    attributes are the dataset's.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "seed"):  # not set yet (unpickling in a loader worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key: SampleKey | int) -> Any:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        seed = derive_seed(self.seed, epoch, index)
        transform = getattr(self.dataset, "transform", None)
        if hasattr(transform, "set_random_seed"):  # albumentations: one generator pair shared by its transforms
            transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        elif hasattr(transform, "set_random_state"):  # MONAI
            transform.set_random_state(seed=seed)
        if get_worker_info() is not None:  # a loader worker: nothing else draws from its generators
            seed_global_rngs(seed)
            return self.dataset[index]
        with isolated_global_rngs(seed):
            return self.dataset[index]


class _DeferredIterator:
    """Creates the real iterator on the first ``next``: the trainer builds its iterator before it restores a
    checkpoint and sets the sampler's epoch, and with loader workers the indices would already be on their way."""

    def __init__(self, start: Callable[[], Iterator[Any]]) -> None:
        self._start, self._iterator = start, None

    def __iter__(self) -> _DeferredIterator:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._start()
        return next(self._iterator)


class ResumableDataLoader(WatchedDataLoader):
    """The training loader: iteration starts on the first batch requested, and ``resume`` makes an epoch begin
    after the batches already trained on (``TaskModule.on_train_start`` calls it when a fit resumes mid-epoch)."""

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return _DeferredIterator(super().__iter__)

    def resume(self, epoch: int, batches: int) -> None:
        """Start the next iteration of ``epoch`` after its first ``batches`` batches."""
        if batches == 0:
            return
        if not isinstance(self.sampler, EpochShuffleSampler):
            raise TypeError(f"resuming mid-epoch needs an EpochShuffleSampler, this loader has {type(self.sampler).__name__}")
        self.sampler.resume_at(epoch, batches * (self.batch_size or 1))

    # The resume point comes from the trainer's own progress (see ``resume``); these two tell Lightning that this
    # loader can resume mid-epoch, so it does not warn that it cannot.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass
