"""Pieces every DataModule shares: image reading with clear errors, up-front file checks, loaders."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

import lightning as L
import numpy as np
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .errors import DataError, listing_error
from .sampling import (
    EpochShuffleSampler,
    ResumableDataLoader,
    SeededSamples,
    process_group,
)
from .workers import SampleFiles, WatchedDataLoader

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CheckFiles = bool | Literal["full", "header", "none"]
"""The up-front file check: ``full``/``true`` decodes every file, ``header`` reads headers only (fast, misses
truncated files), ``none``/``false`` skips it."""
T = TypeVar("T")


def default_num_workers() -> int:
    return min(4, os.cpu_count() or 1)


def read_image(path: str | Path, mode: str = "RGB") -> np.ndarray:
    """Decode an image to a ``[H, W, C]`` (or ``[H, W]`` for mode ``L``/``P``) uint8 array."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert(mode) if img.mode != mode else img.copy())
    except Exception as err:  # PIL raises several types for corrupt or truncated files
        raise DataError(f"cannot read image {path}: {type(err).__name__}: {err}") from err


def check_mode(value: CheckFiles) -> Literal["full", "header", "none"]:
    """The ``check_files`` option as one of its three forms."""
    if value is True or value == "full":
        return "full"
    if value is False or value in ("none", None):
        return "none"
    if value == "header":
        return "header"
    raise ValueError(f"check_files must be true/full, header or false/none, got {value!r}")


def check_workers() -> int:
    """Threads of the up-front checks: the decoders (Pillow, zlib) release the GIL, so threads use every core."""
    return max(2, min(16, os.cpu_count() or 1))


def run_check(
    items: Sequence[T], probe: Callable[[T], list[str]], *, what: str, mode: str, workers: int | None = None
) -> list[str]:
    """``probe`` every item in a thread pool (``workers`` threads, default ``check_workers()``), with a progress
    bar on a terminal and the time taken printed (by rank 0); the problems found, in the items' order."""
    start = time.perf_counter()
    rank_zero = process_group()[0] == 0
    with ThreadPoolExecutor(workers or check_workers()) as pool:
        results = pool.map(probe, items)
        bar = tqdm(results, total=len(items), desc=f"checking {what}", unit="file", leave=False,
                   disable=None if rank_zero else True, file=sys.stderr)
        problems = [p for found in bar for p in found]
    if rank_zero:
        print(f"checked {len(items)} {what} ({mode}) in {time.perf_counter() - start:.1f} s", flush=True)
    return problems


def probe_image(path: str | Path, mode: Literal["full", "header"] = "full") -> str | None:
    """Why ``path`` cannot serve as an image (``None`` when it can): ``full`` decodes every pixel, so a
    truncated file fails here; ``header`` only parses the header (``PIL.Image.verify``)."""
    try:
        with Image.open(path) as img:
            img.load() if mode == "full" else img.verify()
        return None
    except Exception as err:  # PIL raises several types for corrupt or truncated files
        return f"{path}: {type(err).__name__}: {err}"


def check_images(paths: Sequence[str | Path], *, mode: CheckFiles = "full") -> None:
    """Decode every file (``mode="header"``: read its header) and raise one DataError listing the unreadable ones."""
    form = check_mode(mode)
    if form == "none":
        return
    bad = run_check(list(paths), lambda p: [m] if (m := probe_image(p, form)) else [], what="images", mode=form)
    if bad:
        raise listing_error("unreadable image file(s)", bad)


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def make_loader(
    dataset: Dataset, *, batch_size: int, num_workers: int, shuffle: bool, drop_last: bool = False,
    collate_fn: Callable[[list[Any]], Any] | None = None, files: SampleFiles | None = None,
) -> DataLoader:
    """The loader of one split, the same on one process or many.

    Training (``shuffle=True``): a ``ResumableDataLoader`` whose order is a function of the run's seed and the
    epoch, sharded over the processes, with each sample augmented from its own seed (see ``sampling.py``), so a
    resumed run repeats an uninterrupted one exactly. Evaluation: in order, and under several processes each
    rank gets a disjoint shard without the padding repeats of ``DistributedSampler``, so every sample is counted
    once in the metrics and written once in the predictions. Both are ``WatchedDataLoader``s: a worker that dies is
    named with the ``files`` of the sample it was reading and of its batch.
    """
    rank, world = process_group()
    options: dict[str, Any] = dict(
        batch_size=batch_size, drop_last=drop_last, num_workers=num_workers,
        persistent_workers=num_workers > 0, pin_memory=False, collate_fn=collate_fn, files=files,
    )
    if shuffle:
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # set by seed_everything (LightningCLI's seed_everything)
        sampler = EpochShuffleSampler(dataset, seed=seed, num_replicas=world, rank=rank)  # type: ignore[arg-type]
        return ResumableDataLoader(SeededSamples(dataset, seed), sampler=sampler, **options)
    unrepeated = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
    return WatchedDataLoader(dataset, sampler=unrepeated, **options)


class TaskDataModule(L.LightningDataModule):
    """What every task's DataModule shares: data from ``root`` or, without one, the field's synthetic set
    (written once to the cache folder by ``synthetic_root``), one dataset per split in ``datasets`` (filled
    by ``setup``), and the loaders of ``make_loader``. A subclass says how a split is batched through
    ``split_batch_size`` and ``collate``.

    Args:
        root: the data folder; ``None`` uses the built-in synthetic data.
        num_workers: loader worker processes per process (default: up to 4, the cores there are).
    """

    def __init__(self, root: str | Path | None, num_workers: int | None) -> None:
        super().__init__()
        self.root = Path(root) if root else None
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.datasets: dict[str, Dataset] = {}

    def synthetic_root(self) -> Path:
        """Write the built-in data set on first use and return its folder."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        if self.root is None:
            self.synthetic_root()

    def data_root(self) -> Path:
        return self.root if self.root is not None else self.synthetic_root()

    def write_prediction(self, row: dict[str, Any], output_dir: Path) -> dict[str, Any]:
        """Write what a model predicted for one input in this data's own format (a palette PNG mask, a NIfTI
        volume in the scan's grid) under ``output_dir`` and return the row for ``predictions.csv``, with the
        written file's path in place of the array. Called by the prediction writer for every row of
        ``predict_step``; rows that hold no array (class scores) pass through."""
        return row

    def split_batch_size(self, split: str) -> int:
        return self.hparams.batch_size

    def input_size(self) -> tuple[int, ...] | None:
        """The spatial size of one sample as the model receives it in training (``(H, W)``, ``(T, H, W)``...), for
        the model summary's FLOPs; ``None`` where it is not fixed."""
        return None

    def collate(self, split: str) -> Callable[[list[Any]], Any] | None:
        return None

    def loader(self, split: str) -> DataLoader:
        data, batch_size, train = self.datasets[split], self.split_batch_size(split), split == "train"
        return make_loader(
            data, batch_size=batch_size, num_workers=self.num_workers, shuffle=train,
            drop_last=train and len(data) > batch_size, collate_fn=self.collate(split),  # type: ignore[arg-type]
            files=lambda index: self.sample_files(split, index),
        )

    def sample_files(self, split: str, index: int) -> list[str]:
        """The files sample ``index`` of ``split`` is read from, for messages that name it (a loader worker that
        died on it); empty where a DataModule does not say."""
        return []

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.loader("predict")


def format_list(items: Iterable[Any], limit: int = 10) -> str:
    items = list(items)
    return ", ".join(map(str, items[:limit])) + (f", ... ({len(items)} in all)" if len(items) > limit else "")
