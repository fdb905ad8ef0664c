"""Reading a clip's frames, and what happens when that fails.

decord is the fast reader (it decodes only the frames asked for), but it fails on some valid files (H.264 at
widths 16, 24, 48 or 72 px: a buffer size mismatch); PyAV (FFmpeg) reads those. A clip neither reader can
decode is skipped by the dataset; ``SkippedClipCeiling`` stops a run whose skipped clips pass a share of the
clips, so a data set that fails to decode does not train on nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import DataError

ClipChooser = Callable[[int, float], list[np.ndarray]]  # (frames in the video, its fps) -> frame indices per clip


def read_with_decord(path: Path, choose: ClipChooser) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(frames [F, H, W, 3] of the chosen indices in ascending order, the clips' indices)``, decoding only
    the chosen frames."""
    import decord

    decord.logging.set_level(decord.logging.QUIET)
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    if len(reader) == 0:
        raise ValueError("the video has no frames")
    clips = choose(len(reader), reader.get_avg_fps())
    wanted = np.unique(np.concatenate(clips))
    return reader.get_batch(wanted.tolist()).asnumpy(), clips


def read_with_pyav(path: Path, choose: ClipChooser) -> tuple[np.ndarray, list[np.ndarray]]:
    """What ``read_with_decord`` returns, decoded with PyAV (FFmpeg) frame by frame up to the last chosen one.
    A container that does not state its frame count is decoded whole first; chosen indices past the frames
    actually there (a count the header overstates) get the last decoded frame."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 0)
        frames = container.decode(stream)
        decoded: list[Any] = [] if stream.frames > 0 else list(frames)
        count = stream.frames if stream.frames > 0 else len(decoded)
        if count == 0:
            raise ValueError("the video has no frames")
        clips = choose(count, fps)
        wanted = np.unique(np.concatenate(clips))
        wanted_set = set(wanted.tolist())
        picked: dict[int, np.ndarray] = {}
        for i, frame in enumerate(decoded) if decoded else enumerate(frames):
            if i > wanted[-1]:
                break
            if i in wanted_set:
                picked[i] = frame.to_ndarray(format="rgb24")
        if not picked:
            raise ValueError("no frame could be decoded")
        last = picked[max(picked)]
    return np.stack([picked.get(int(i), last) for i in wanted]), clips


FRAME_READERS: dict[str, Callable[[Path, ClipChooser], tuple[np.ndarray, list[np.ndarray]]]] = {
    "decord": read_with_decord,
    "pyav": read_with_pyav,
}


def probe_with_decord(path: Path, full: bool) -> None:
    """Open ``path`` and read its frame count (``full``: decode every frame, 16 at a time, keeping none)."""
    import decord

    decord.logging.set_level(decord.logging.QUIET)
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    count = len(reader)
    if count == 0:
        raise ValueError("the video has no frames")
    for start in range(0, count if full else 0, 16):
        reader.get_batch(list(range(start, min(start + 16, count))))


def probe_with_pyav(path: Path, full: bool) -> None:
    """What ``probe_with_decord`` checks, with PyAV: the container's video stream (``full``: every frame decoded)."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("the file holds no video stream")
        stream = container.streams.video[0]
        if not full:
            if stream.codec_context.width <= 0 or stream.codec_context.height <= 0:
                raise ValueError("the video stream has no frame size")
            return
        if sum(1 for _ in container.decode(stream)) == 0:
            raise ValueError("the video has no frames")


CLIP_PROBES: dict[str, Callable[[Path, bool], None]] = {"decord": probe_with_decord, "pyav": probe_with_pyav}


def probe_clip(path: Path, mode: Literal["full", "header"] = "full") -> str | None:
    """Why no reader of ``FRAME_READERS`` can serve ``path``, each reader's reason (``None`` when one can), found up front: ``full``
    decodes every frame of the clip (a training pass may read any of them), ``header`` opens the container and
    reads the stream information only (fast; misses damage past the header). Readers are tried in the order the
    dataset tries them, so a clip that decord fails on and PyAV reads passes, as it does in training."""
    failures = []
    for name, probe in CLIP_PROBES.items():
        try:
            probe(path, mode == "full")
            return None
        except ImportError:
            continue
        except Exception as err:  # noqa: BLE001  the readers raise several types for corrupt, truncated or odd files
            text = str(err).strip()
            failures.append(f"{name}: {type(err).__name__}: {text.splitlines()[0][:150] if text else ''}")
    return "; ".join(failures) or "no video reader installed (decord or av)"


class SkippedClipCeiling:
    """Counts the clips skipped in each pass over a split and stops the run, naming the first files, once they
    pass ``fraction`` of the clips of that pass (``total``).

    Args:
        fraction: the share of a pass's clips that may be skipped (0 stops at the first undecodable clip).
    """

    def __init__(self, fraction: float) -> None:
        if not 0 <= fraction <= 1:
            raise ValueError(f"max_skipped_fraction must be in [0, 1], got {fraction}")
        self.fraction = fraction
        self.passes: dict[str, tuple[Any, list[str]]] = {}

    def add(self, split: str, pass_key: Any, files: Sequence[str], total: int) -> None:
        key, skipped = self.passes.get(split, (None, []))
        if key != pass_key:
            key, skipped = pass_key, []
        skipped = [*skipped, *files]
        self.passes[split] = (key, skipped)
        if len(skipped) > self.fraction * total:
            first = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
            message = (
                f"{len(skipped)} of the {total} {split} clips of this pass could not be decoded (by decord or PyAV), "
                f"more than max_skipped_fraction={self.fraction:g}; first: {first}"
            )
            raise DataError(message, summary=f"{skipped[0]}: cannot be decoded, nor {len(skipped) - 1} more {split} "
                            f"clip(s) of this pass (over max_skipped_fraction={self.fraction:g}; see the warnings above)")
