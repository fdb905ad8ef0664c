"""Video clips for action recognition: annotation lists, decord decoding, augmentation, multi-view testing.

Only the sampled frames are decoded (``VideoReader.get_batch``). Training clips are sampled densely (a
random window of ``num_frames * sampling_rate`` frames, Kinetics) or uniformly (one random frame per
segment, Something-Something), scaled so the short side is random in ``jitter_scales``, randomly cropped
and optionally flipped. Evaluation takes ``test_clips`` evenly spaced clips × ``test_crops`` crops along
the long side (``[V, C, T, H, W]`` per sample when ``V > 1``). A file decord cannot read (it fails on some
valid H.264 clips, e.g. of widths 16, 24, 48 or 72 px) is read with PyAV; each batch lists the reader that served
each clip under ``batch["readers"]``. Clips neither can decode are found at setup (``check_files``: every frame
decoded, or the headers read) and listed before training: left out with a warning naming each, or, more than
``max_skipped_fraction`` of a split, an error. A clip that fails later is skipped with one warning naming the file;
the collate function drops it and reports it under ``batch["skipped"]``, and a pass over a split that skips more
than ``max_skipped_fraction`` of its clips stops the run with an error naming the first ones.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import albumentations as A
import numpy as np
import torch
from einops import rearrange
from torch.utils.data import Dataset, default_collate

from .common import CheckFiles, DataError, TaskDataModule, check_mode, run_check
from .errors import listing_error
from .sampling import process_group
from .synthetic_videos import MOTION_CLASSES, synthetic_motion_videos
from .video_annotations import (
    ClassVocabulary,
    VideoSample,
    check_exists,
    infer_vocabulary,
    read_class_names,
    read_entries,
    resolve_samples,
)
from .video_decoding import FRAME_READERS, SkippedClipCeiling, probe_clip

SamplingName = Literal["dense", "uniform"]
VIDEO_MEAN = (0.45, 0.45, 0.45)  # the normalisation the TimeSformer (and SlowFast) release trains with
VIDEO_STD = (0.225, 0.225, 0.225)


class SkippedClipWarning(UserWarning):
    """A listed video could not be decoded and was left out of its batch."""


def dense_indices(
    num_video_frames: int, num_frames: int, stride: float, rng: np.random.Generator, view: int | None = None,
    num_views: int = 1,
) -> np.ndarray:
    """``num_frames`` indices ``stride`` source frames apart, starting at random (``view=None``, training)
    or at the centre of the ``view``-th of ``num_views`` equal ranges of start positions; a video shorter
    than the window repeats its last frame."""
    span = (num_frames - 1) * stride + 1
    delta = max(num_video_frames - span, 0.0)
    start = rng.uniform(0, delta) if view is None else delta * (view + 0.5) / num_views
    idx = start + np.arange(num_frames) * stride
    return np.clip(np.round(idx), 0, num_video_frames - 1).astype(np.int64)


def segment_indices(
    num_video_frames: int, num_frames: int, rng: np.random.Generator, view: int | None = None, num_views: int = 1
) -> np.ndarray:
    """One frame from each of ``num_frames`` equal segments: random within it (training) or at the
    ``(view + 0.5) / num_views`` point of every segment."""
    edges = np.linspace(0, num_video_frames, num_frames + 1)
    where = rng.uniform(0, 1, num_frames) if view is None else np.full(num_frames, (view + 0.5) / num_views)
    idx = edges[:-1] + where * (edges[1:] - edges[:-1])
    return np.clip(np.floor(idx), 0, num_video_frames - 1).astype(np.int64)


def spatial_crops(frames: np.ndarray, size: int, num_crops: int) -> list[np.ndarray]:
    """``num_crops`` (1 or 3) square crops of ``[T, H, W, C]`` frames: centred, or start/centre/end of the
    long side (the three-crop test of the SlowFast/TimeSformer release)."""
    h, w = frames.shape[1:3]
    if h < size or w < size:
        raise ValueError(f"frames of {h}x{w} are smaller than the crop size {size}")
    y, x = (h - size) // 2, (w - size) // 2
    if num_crops == 1:
        return [frames[:, y : y + size, x : x + size]]
    if h > w:
        return [frames[:, oy : oy + size, x : x + size] for oy in (0, y, h - size)]
    return [frames[:, y : y + size, ox : ox + size] for ox in (0, x, w - size)]


class ClipTransform:
    """uint8 frames ``[T, H, W, 3]`` -> normalised views ``[C, T, H, W]``: short-side jitter, random crop
    and flip in training (albumentations, the same parameters for every frame); short side to the crop
    size and 1 or 3 crops in evaluation.

    Args:
        train: random augmentation, else deterministic crops.
        crop_size: side of the square crops.
        scales: short-side lengths to draw from in training (repeats weight the draw).
        hflip: random horizontal flip in training (off for direction-sensitive classes, SSv2).
        mean, std: normalisation in 0..1 units.
        num_crops: evaluation crops per clip (1 or 3).
    """

    def __init__(
        self, *, train: bool, crop_size: int, scales: Sequence[int], hflip: bool, mean: Sequence[float],
        std: Sequence[float], num_crops: int = 1,
    ) -> None:
        self.train, self.crop_size, self.num_crops = train, crop_size, num_crops
        ops: list[A.BasicTransform] = [A.SmallestMaxSize(max_size=list(scales) if train else crop_size)]
        if train:
            ops += [A.RandomCrop(height=crop_size, width=crop_size), A.HorizontalFlip(p=0.5 if hflip else 0.0)]
        self.augment = A.Compose(ops)
        self.mean = torch.tensor(mean).view(-1, 1, 1, 1) * 255
        self.std = torch.tensor(std).view(-1, 1, 1, 1) * 255
        self.rng = np.random.default_rng()

    def set_random_state(self, generator: np.random.Generator, py_random: random.Random) -> None:
        """Draw the augmentation (and the dataset's temporal jitter, through ``rng``) from these generators;
        the training loader seeds them per sample from ``(seed, epoch, index)`` (``sampling.SeededSamples``)."""
        self.rng = generator
        self.augment.set_random_state(generator, py_random)

    def set_random_seed(self, seed: int) -> None:
        self.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def __call__(self, frames: np.ndarray) -> list[torch.Tensor]:
        frames = np.asarray(self.augment(images=frames)["images"])
        crops = [frames] if self.train else spatial_crops(frames, self.crop_size, self.num_crops)
        clips = [rearrange(torch.from_numpy(np.ascontiguousarray(c)), "t h w c -> c t h w") for c in crops]
        return [(clip.float() - self.mean) / self.std for clip in clips]


class VideoClipDataset(Dataset):
    """Decode, sample and transform one clip (or ``num_clips`` clips × the transform's crops) per video.

    Args:
        samples: the annotated videos.
        transform: frames -> views.
        num_frames: frames per clip.
        sampling: ``dense`` (window of ``sampling_rate`` spaced frames) or ``uniform`` (segments).
        sampling_rate: frame spacing of dense sampling, at ``target_fps`` when given (else at the video's rate).
        target_fps: frame rate that ``sampling_rate`` refers to (the release uses 30 for Kinetics).
        num_clips: evaluation clips per video (``None``: one random clip, training).
    """

    def __init__(
        self, samples: Sequence[VideoSample], transform: ClipTransform, *, num_frames: int, sampling: SamplingName,
        sampling_rate: int, target_fps: float | None = None, num_clips: int | None = None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.num_frames, self.sampling, self.sampling_rate = num_frames, sampling, sampling_rate
        self.target_fps, self.num_clips = target_fps, num_clips
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def clip_indices(self, num_video_frames: int, fps: float) -> list[np.ndarray]:
        rng = self.transform.rng  # seeded per sample with the spatial augmentation
        views: list[int | None] = [None] if self.num_clips is None else list(range(self.num_clips))
        n = len(views) if self.num_clips is not None else 1
        if self.sampling == "uniform":
            return [segment_indices(num_video_frames, self.num_frames, rng, v, n) for v in views]
        stride = self.sampling_rate * (fps / self.target_fps if self.target_fps and fps > 0 else 1.0)
        return [dense_indices(num_video_frames, self.num_frames, stride, rng, v, n) for v in views]

    def load_views(self, path: Path) -> tuple[list[torch.Tensor], str]:
        """The clip's views and the name of the reader that decoded it: decord, else PyAV (``FRAME_READERS``);
        raises with every reader's reason when none can."""
        failures = []
        for name, read in FRAME_READERS.items():
            try:
                frames, clips = read(path, self.clip_indices)  # [F, H, W, 3], only the frames we need
            except ImportError:
                continue
            except Exception as err:  # the readers raise several types for corrupt, truncated or odd files
                failures.append(f"{name}: {type(err).__name__}: {str(err).strip()[:150]}")
                continue
            wanted = np.unique(np.concatenate(clips))
            return [view for clip in clips for view in self.transform(frames[np.searchsorted(wanted, clip)])], name
        raise ValueError("; ".join(failures) or "no video reader installed (decord or av)")

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        try:
            views, reader = self.load_views(sample.path)
        except Exception as err:
            if str(sample.path) not in self._warned:
                self._warned.add(str(sample.path))
                warnings.warn(
                    f"skipping {sample.path} (listed at {sample.source}): cannot decode it: {err}",
                    SkippedClipWarning, stacklevel=2,
                )
            return {"skipped": str(sample.path), "index": index}
        clip = views[0] if len(views) == 1 else torch.stack(views)  # [C, T, H, W] or [V, C, T, H, W]
        return {
            "input": clip, "target": torch.tensor(sample.label), "index": index, "path": str(sample.path),
            "reader": reader,
        }


def collate_clips(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch the decoded clips; skipped ones are dropped and listed under ``skipped`` (``input`` is None
    when every clip of the batch was skipped); ``readers`` names the reader of each kept clip."""
    kept = [item for item in items if "skipped" not in item]
    readers = [item.pop("reader") for item in kept]
    batch = default_collate(kept) if kept else {"input": None, "target": None, "index": torch.empty(0), "path": []}
    batch["skipped"] = [item["skipped"] for item in items if "skipped" in item]
    batch["readers"] = readers
    return batch


class VideoDataModule(TaskDataModule):
    """Annotated video folders (Kinetics, UCF101, Something-Something as video files); synthetic by default.

    Args:
        root: folder the listed paths (and annotation files given as relative paths) are under; ``None``
            writes and uses the built-in synthetic motion videos (MP4, ``path label`` lists).
        train_list, val_list: annotation files: ``path label`` lines, or CSV with a header naming a
            ``path`` (or ``video``/``filename``) column and a ``label`` (or ``class``) column.
        test_list: annotation file for ``test``; ``None`` tests on ``val_list``.
        predict_list: videos (labels optional) for ``predict``; ``None`` predicts ``val_list``.
        class_names: file of class names (one per line, or ``index name`` lines as UCF101's classInd.txt);
            ``None`` takes them from the training list.
        num_frames: frames per clip.
        sampling: ``dense`` (Kinetics: a window of ``sampling_rate``-spaced frames) or ``uniform`` (SSv2:
            one frame per equal segment of the whole video).
        sampling_rate, target_fps: frame spacing of dense sampling, counted at ``target_fps`` when given.
        jitter_scales: range of the training short side; ``inverse_uniform_scale`` draws it uniformly in
            ``1/scale`` (the release's SSv2 setting).
        crop_size: side of the square crops; evaluation scales the short side to it first.
        hflip: random horizontal flip in training (off when classes depend on left/right, as in SSv2).
        mean, std: normalisation in 0..1 units; the default is the TimeSformer release's.
        test_clips, test_crops: evaluation views in ``test`` and ``predict``: evenly spaced clips × crops
            along the long side; their scores are averaged by the module.
        batch_size: clips per process; the effective batch is ``batch_size * devices * nodes * accumulate``.
        num_workers: loader processes (``None``: up to 4).
        check_files: at setup, every listed file must exist and not be empty, and ``true``/``full`` decodes
            every frame of every clip (in threads, timed), ``header`` opens each container and reads its stream
            information only (fast, misses damage past the header); ``false``/``none`` checks nothing.
            Undecodable clips are listed, all of them, before training: more than ``max_skipped_fraction`` of a
            split stops the run, fewer are left out with a warning naming each.
        max_skipped_fraction: the share of a split's clips that may be undecodable: found up front they are left
            out; found later (``check_files: header``/``none``) they are skipped (with a warning), and a pass over
            a split (an epoch of training, one validation) that skips more than this share of its clips stops
            the run with an error naming the first files.
        synthetic_per_class, synthetic_val_per_class: training and validation clips per class of the synthetic set
            (more validation clips give a tighter estimate: each of the default 128 is 0.8 points of top-1; the
            training clips stay the same whatever the count).
    """

    def __init__(
        self,
        root: str | None = None,
        *,
        train_list: str = "train.csv",
        val_list: str = "val.csv",
        test_list: str | None = None,
        predict_list: str | None = None,
        class_names: str | None = None,
        num_frames: int = 8,
        sampling: SamplingName = "dense",
        sampling_rate: int = 8,
        target_fps: float | None = None,
        jitter_scales: tuple[int, int] = (256, 320),
        inverse_uniform_scale: bool = False,
        crop_size: int = 224,
        hflip: bool = True,
        mean: tuple[float, float, float] = VIDEO_MEAN,
        std: tuple[float, float, float] = VIDEO_STD,
        test_clips: int = 1,
        test_crops: Literal[1, 3] = 3,
        batch_size: int = 8,
        num_workers: int | None = None,
        check_files: CheckFiles = True,
        max_skipped_fraction: float = 0.1,
        synthetic_per_class: int = 128,
        synthetic_val_per_class: int = 32,
    ) -> None:
        super().__init__(root, num_workers)
        self.save_hyperparameters()
        if synthetic_per_class < 1 or synthetic_val_per_class < 1:
            raise ValueError(
                "synthetic_per_class and synthetic_val_per_class must be 1 or more, got "
                f"{synthetic_per_class} and {synthetic_val_per_class}"
            )
        self.skip_ceiling = SkippedClipCeiling(max_skipped_fraction)
        if test_crops not in (1, 3):
            raise ValueError(f"test_crops must be 1 or 3, got {test_crops}")
        lo, hi = jitter_scales
        if not crop_size <= lo <= hi:
            raise ValueError(f"jitter_scales {tuple(jitter_scales)} must be increasing and at least crop_size {crop_size}")
        if self.root is None:
            self.vocab = ClassVocabulary.from_names(MOTION_CLASSES)
        elif class_names:
            self.vocab = read_class_names(self._resolve(class_names))
        else:
            self.vocab = infer_vocabulary(read_entries(self._resolve(train_list)))

    @property
    def class_names(self) -> list[str]:
        return self.vocab.names

    @property
    def num_classes(self) -> int:
        return len(self.vocab.names)

    def input_size(self) -> tuple[int, int, int]:
        hp = self.hparams
        return (hp.num_frames, hp.crop_size, hp.crop_size)

    def synthetic_root(self) -> Path:
        return synthetic_motion_videos(self.hparams.synthetic_per_class, self.hparams.synthetic_val_per_class)

    def _resolve(self, name: str) -> Path:
        path = Path(name)
        return path if path.is_absolute() or self.root is None else self.root / path

    def list_path(self, split: Literal["train", "val", "test", "predict"]) -> Path:
        if self.root is None:  # the synthetic set has its own lists
            return self.data_root() / ("train.txt" if split == "train" else "val.txt")
        hp = self.hparams
        name = {"train": hp.train_list, "val": hp.val_list, "test": hp.test_list, "predict": hp.predict_list}[split]
        return self._resolve(name or hp.val_list)

    def samples(self, split: Literal["train", "val", "test", "predict"]) -> list[VideoSample]:
        """The split's videos, with labels resolved; unless ``check_files`` is ``none``, checked up front: every file
        exists, and the clips no reader can decode are left out (or stop the run, ``decodable``)."""
        entries = read_entries(self.list_path(split))
        samples = resolve_samples(entries, self.data_root(), self.vocab, require_labels=split != "predict")
        mode = check_mode(self.hparams.check_files)
        if mode == "none":
            return samples
        check_exists(samples)
        return self.decodable(samples, split, mode)

    def decodable(self, samples: list[VideoSample], split: str, mode: Literal["full", "header"]) -> list[VideoSample]:
        """``samples`` without the clips no reader can decode (``probe_clip``); raises one DataError listing them
        all when they are more than ``max_skipped_fraction`` of the split, else warns naming each."""
        bad: set[int] = set()

        def probe(index: int) -> list[str]:
            sample = samples[index]
            problem = probe_clip(sample.path, mode)
            if problem is None:
                return []
            bad.add(index)
            return [f"{sample.path}: cannot be decoded: {problem} (listed at {sample.source})"]

        problems = run_check(range(len(samples)), probe, what=f"{split} clips", mode=mode)
        if not problems:
            return samples
        fraction = self.hparams.max_skipped_fraction
        if len(problems) > fraction * len(samples):
            raise listing_error(
                f"undecodable {split} clip(s) of {len(samples)}, more than max_skipped_fraction={fraction:g}", problems
            )
        for problem in problems:
            warnings.warn(f"leaving out {problem}", SkippedClipWarning, stacklevel=2)
        return [s for i, s in enumerate(samples) if i not in bad]

    def scales(self) -> list[int]:
        lo, hi = self.hparams.jitter_scales
        if not self.hparams.inverse_uniform_scale:
            return list(range(lo, hi + 1))
        return [round(1 / u) for u in np.linspace(1 / hi, 1 / lo, 4 * (hi - lo + 1))]  # uniform in 1/scale

    def dataset(self, split: Literal["train", "val", "test", "predict"]) -> VideoClipDataset:
        hp = self.hparams
        train, multi_view = split == "train", split in ("test", "predict")
        transform = ClipTransform(
            train=train, crop_size=hp.crop_size, scales=self.scales(), hflip=hp.hflip, mean=hp.mean, std=hp.std,
            num_crops=hp.test_crops if multi_view else 1,
        )
        return VideoClipDataset(
            self.samples(split), transform, num_frames=hp.num_frames, sampling=hp.sampling,
            sampling_rate=hp.sampling_rate, target_fps=hp.target_fps,
            num_clips=None if train else (hp.test_clips if multi_view else 1),
        )

    def setup(self, stage: str) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}[stage]
        for split in splits:
            self.datasets[split] = self.dataset(split)  # type: ignore[arg-type]
        if stage == "fit" and len(self.datasets["train"]) == 0:
            raise DataError(f"the training list {self.list_path('train')} is empty")

    def sample_files(self, split: str, index: int) -> list[str]:
        return [str(self.datasets[split].samples[index].path)]

    def collate(self, split: str) -> Callable[[list[Any]], Any]:
        return collate_clips

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the batch's skipped clips against ``max_skipped_fraction`` of its pass over the split."""
        trainer = self.trainer
        if trainer is None or not isinstance(batch, dict) or not batch.get("skipped"):
            return batch
        split = (
            "train" if trainer.training else "val" if trainer.validating or trainer.sanity_checking
            else "test" if trainer.testing else "predict"
        )
        if split in self.datasets:
            per_rank = -(-len(self.datasets[split]) // process_group()[1])  # this process's shard, rounded up
            pass_key = (trainer.current_epoch, None if split == "train" else trainer.global_step, trainer.sanity_checking)
            self.skip_ceiling.add(split, pass_key, batch["skipped"], per_rank)
        return batch
