"""A loader worker that dies (killed by the kernel's out-of-memory killer, a segfault in a decoder) said in one line:
which worker, what it was loading and the files of its batch.

PyTorch already notices a dead worker (its SIGCHLD handler and queue timeouts) and raises ``DataLoader worker (pid
N) exited unexpectedly`` or ``... is killed by signal: Segmentation fault``, but by then nothing says which sample
did it. ``WatchedSamples`` has each worker write, in memory shared with the training process, its process id, the
batch it was given and the sample it is reading; ``WatchedDataLoader`` turns PyTorch's error into a
``WorkerDiedError`` built from that record.
"""

from __future__ import annotations

import multiprocessing
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch.utils.data import DataLoader, Dataset, get_worker_info

from .errors import DataError

SampleFiles = Callable[[int], Sequence[str]]  # a dataset index -> the files that sample is read from


class WorkerDiedError(DataError):
    """A loader worker process died while it was loading a batch."""


class WatchedSamples(Dataset):
    """``dataset`` with each loader worker recording, in shared memory, its process id, the dataset indices of the
    batch it is loading and the one it is reading now. Keys may be plain indices or ``(epoch, index)`` pairs
    (``sampling.SeededSamples``); other attributes are the dataset's.

    Args:
        dataset: the samples.
        num_workers: the loader's worker processes.
        batch_size: the most samples a worker is given at once.
    """

    def __init__(self, dataset: Dataset, num_workers: int, batch_size: int) -> None:
        self.dataset, self.batch_size = dataset, batch_size
        self.pids = multiprocessing.RawArray("q", num_workers)
        self.batches = multiprocessing.RawArray("q", [-1] * (num_workers * batch_size))
        self.current = multiprocessing.RawArray("q", [-1] * num_workers)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "batch_size", "pids", "batches", "current"):  # not set yet (unpickling in a worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitems__(self, keys: Sequence[Any]) -> list[Any]:
        worker = get_worker_info()
        if worker is not None:
            self.pids[worker.id] = os.getpid()
            start = worker.id * self.batch_size
            for slot in range(self.batch_size):
                self.batches[start + slot] = dataset_index(keys[slot]) if slot < len(keys) else -1
        return [self[key] for key in keys]

    def __getitem__(self, key: Any) -> Any:
        worker = get_worker_info()
        if worker is not None:
            self.current[worker.id] = dataset_index(key)
        return self.dataset[key]

    def last_seen(self, pid: int) -> tuple[int, int, list[int]] | None:
        """``(worker id, the index it was reading, its batch's indices)`` of the worker with process id ``pid``."""
        for worker, seen in enumerate(self.pids):
            if seen == pid:
                start = worker * self.batch_size
                batch = [i for i in self.batches[start : start + self.batch_size] if i >= 0]
                return worker, self.current[worker], batch
        return None


def dataset_index(key: Any) -> int:
    return int(key[1] if isinstance(key, tuple) else key)


class WatchedDataLoader(DataLoader):
    """A ``DataLoader`` whose dead workers are named with what they held (``WorkerDiedError``, one line); without
    workers it is a plain ``DataLoader``.

    Args:
        dataset: the samples (wrapped in ``WatchedSamples`` when there are workers).
        files: the files of a sample, by dataset index, for the message.
        **options: ``DataLoader``'s.
    """

    def __init__(self, dataset: Dataset, *, files: SampleFiles | None = None, **options: Any) -> None:
        workers, batch_size = options.get("num_workers", 0), options.get("batch_size") or 1
        if workers > 0 and not isinstance(dataset, WatchedSamples):
            dataset = WatchedSamples(dataset, workers, batch_size)
        super().__init__(dataset, **options)
        self.files = files

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        iterator = super().__iter__()
        if not isinstance(self.dataset, WatchedSamples):
            return iterator
        return _NamingDeadWorkers(iterator, self)

    def worker_died(self, err: RuntimeError) -> WorkerDiedError | None:
        """The ``WorkerDiedError`` for PyTorch's dead-worker error ``err`` (``None`` for other errors)."""
        found = _dead_worker_message(err)
        if found is None or not isinstance(self.dataset, WatchedSamples):
            return None
        pids, how = [int(p) for p in found.group(1).split(",") if p.strip()], found.group(2).rstrip(".")
        signalled = _dead_worker_message(err.__context__) if err.__context__ is not None else None
        if signalled is not None and "signal" in signalled.group(2):  # PyTorch's SIGCHLD handler said how it died
            how = signalled.group(2).rstrip(".")
        parts = []
        for pid in pids:
            seen = self.dataset.last_seen(pid)
            if seen is None:
                parts.append(f"loader worker (pid {pid}) {how} before loading anything")
                continue
            worker, current, batch = seen
            reading = ", ".join(self._files(current)) if current >= 0 else "nothing yet"
            held = ", ".join(f for i in batch for f in self._files(i))
            parts.append(f"loader worker {worker} (pid {pid}) {how} while reading {reading}; its batch: {held}")
        hint = "out of memory (the kernel's OOM killer) or a crash in a decoder; --data.num_workers=0 reads in this process"
        return WorkerDiedError(f"{'; '.join(parts)} ({hint})")

    def _files(self, index: int) -> list[str]:
        files = list(self.files(index)) if self.files is not None else []
        return files or [f"sample {index}"]


def _dead_worker_message(err: BaseException) -> re.Match[str] | None:
    """PyTorch's ``DataLoader worker (pid N) is killed by signal: ...`` / ``(pid(s) N, M) exited unexpectedly``."""
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return re.match(r"DataLoader worker \(pids?(?:\(s\))? ([\d, ]+)\) (.*)", message)


class _NamingDeadWorkers:
    """The loader's iterator, with PyTorch's dead-worker ``RuntimeError`` replaced by a ``WorkerDiedError``."""

    def __init__(self, iterator: Iterator[Any], loader: WatchedDataLoader) -> None:
        self.iterator, self.loader = iterator, loader

    def __iter__(self) -> _NamingDeadWorkers:
        return self

    def __next__(self) -> Any:
        try:
            return next(self.iterator)
        except RuntimeError as err:
            named = self.loader.worker_died(err)
            if named is None:
                raise
            raise named from err

    def __len__(self) -> int:
        return len(self.iterator)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # the wrapped iterator's other attributes (Lightning reads a few)
        if name in ("iterator", "loader"):
            raise AttributeError(name)
        return getattr(self.iterator, name)
