"""A small video data set whose classes differ only in how a shape moves over time, written as real MP4s.

Every clip shows one bright ellipse or rectangle on a dark static background, growing or shrinking, either
horizontally or vertically: its edges move outwards or inwards along one axis. The moving side sweeps the
same range of lengths as the fixed side is drawn from, so a single frame (a shape of random width and
height) says nothing about the class; a set of frames shows the axis that changes, and only their order
tells growing from shrinking: played backwards, a growing clip is a shrinking one. A model that sees the
frames as an unordered set (space-only attention) can reach 50% at most; one that attends over time can
reach 100%. The layout is the usual one for video lists: ``videos/{train,val}/<class>/<n>.mp4``,
``train.txt``/``val.txt`` with ``path label`` lines, ``classes.txt``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .synthetic import ensure_written

MOTION_CLASSES = ("grow_horizontally", "shrink_horizontally", "grow_vertically", "shrink_vertically")


def deforming_shape_clip(
    rng: np.random.Generator, motion: str, *, size: int = 64, num_frames: int = 10
) -> np.ndarray:
    """``[T, size, size, 3]`` uint8 frames of a shape whose width (``*_horizontally``) or height grows or
    shrinks linearly over the clip."""
    if motion not in MOTION_CLASSES:
        raise ValueError(f"unknown motion {motion!r}; expected one of {MOTION_CLASSES}")
    lo, hi = 0.1 * size, 0.95 * size
    start, end = (lo, hi) if motion.startswith("grow") else (hi, lo)
    start, end = start + rng.uniform(-0.05, 0.05) * size, end + rng.uniform(-0.05, 0.05) * size
    fixed = rng.uniform(lo, hi)
    cx, cy = rng.uniform(0.45, 0.55, 2) * size
    plain = np.full((size, size, 3), rng.uniform(0, 90, 3)) + rng.normal(0, 8, (size, size, 3))
    background = Image.fromarray(np.clip(plain, 0, 255).astype(np.uint8))  # dark, static, faintly noisy
    colour = tuple(int(v) for v in rng.integers(120, 256, 3))
    ellipse = bool(rng.integers(2))
    frames = []
    for t in range(num_frames):
        moving = start + (end - start) * t / max(num_frames - 1, 1)
        w, h = (moving, fixed) if motion.endswith("horizontally") else (fixed, moving)
        frame = background.copy()
        draw = ImageDraw.Draw(frame)
        box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        (draw.ellipse if ellipse else draw.rectangle)(box, fill=colour)
        frames.append(np.asarray(frame))
    return np.stack(frames)


def write_mp4(path: Path, frames: np.ndarray, fps: float = 8.0) -> None:
    """Encode ``[T, H, W, 3]`` uint8 frames (even sides) as H.264 (MPEG-4 part 2 if libx264 is unavailable).

    ffmpeg (imageio-ffmpeg's binary) is started here with ``start_new_session`` rather than through
    ``imageio_ffmpeg.write_frames``, whose ``preexec_fn`` makes the forked child run Python before it execs: that
    frees other threads' objects in the child, and a PyAV video reformatter among them waits for ever on slice
    threads the child does not have (the test suite hung there)."""
    import imageio_ffmpeg

    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames.shape[1:3]
    rate = str(Fraction(fps).limit_denominator())
    for codec, quality in (("libx264", ["-crf", "5"]), ("mpeg4", ["-qscale:v", "4"])):  # imageio's quality 9
        command = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{width}x{height}",
            "-pix_fmt", "rgb24", "-r", rate, "-i", "-", "-vcodec", codec, "-pix_fmt", "yuv420p", *quality,
            "-v", "error", str(path),
        ]
        encoder = subprocess.run(
            command, input=np.ascontiguousarray(frames).tobytes(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C of the run reaches Python, not the encoder half-way through a file
        )
        if encoder.returncode == 0:
            return
        path.unlink(missing_ok=True)
        if codec == "mpeg4":
            raise RuntimeError(f"ffmpeg could not encode {path}: {encoder.stderr.decode(errors='replace').strip()}")


def write_motion_videos(
    root: Path, *, train_per_class: int = 128, val_per_class: int = 32, size: int = 64, num_frames: int = 10,
    seed: int = 0, classes: Sequence[str] = MOTION_CLASSES,
) -> None:
    """Write the clips of ``classes`` (a subset of ``MOTION_CLASSES``) and the annotation files ``train.txt``,
    ``val.txt`` and ``classes.txt`` under ``root``."""
    rng = np.random.default_rng(seed)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    with ThreadPoolExecutor(4) as pool:  # the encoders are ffmpeg processes: run a few at once
        jobs = []
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            lines = []
            for n in range(count):
                for label, motion in enumerate(classes):
                    rel = Path("videos") / split / motion / f"{n:05d}.mp4"
                    clip = deforming_shape_clip(rng, motion, size=size, num_frames=num_frames)
                    jobs.append(pool.submit(write_mp4, root / rel, clip))
                    lines.append(f"{rel.as_posix()} {label}")
            (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
        for job in jobs:
            job.result()


def synthetic_motion_videos(train_per_class: int = 128, val_per_class: int = 32, seed: int = 0) -> Path:
    """The default video data set (64×64, 10 frames at 8 fps), written to the cache on first use."""
    name = f"motion-videos-v4-n{train_per_class}-{val_per_class}-seed{seed}"
    return ensure_written(
        name, lambda tmp: write_motion_videos(tmp, train_per_class=train_per_class, val_per_class=val_per_class, seed=seed)
    )
