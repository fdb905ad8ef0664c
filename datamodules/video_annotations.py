"""Video annotation files: ``path label`` lists (Kinetics, UCF101) and CSV files with a header.

Labels are class indices or class names. Class names come from a file (one name per line, or UCF101's
``classInd.txt`` with ``index name`` lines, whose indices may start at 1) or, without one, from the
training list: its sorted distinct names, or ``0..max`` when its labels are numbers. Every problem is
reported with the annotation file and line, all at once, before any training starts.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .common import DataError

PATH_COLUMNS = ("path", "video", "filename", "file")
LABEL_COLUMNS = ("label", "class", "label_name")


@dataclass(frozen=True)
class VideoSample:
    """One annotated video: its file, class index (-1 when unlabelled) and where it was listed."""

    path: Path
    label: int
    source: str  # "<annotation file>:<line>"


@dataclass(frozen=True)
class RawEntry:
    path: str
    label: str | None
    source: str


@dataclass(frozen=True)
class ClassVocabulary:
    """Class names in index order, and the label spellings that map onto each index."""

    names: list[str]
    lookup: dict[str, int]

    @classmethod
    def from_names(cls, names: Sequence[str]) -> ClassVocabulary:
        lookup = {str(i): i for i in range(len(names))}
        lookup.update({name: i for i, name in enumerate(names)})  # a name wins over a same-looking index
        return cls(list(names), lookup)


def _problem_list(problems: list[str], what: str) -> DataError:
    shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
    return DataError(f"{len(problems)} {what}:\n  {shown}")


def read_class_names(path: Path) -> ClassVocabulary:
    """Class names from a file of one name per line, or of ``index name`` lines (UCF101 ``classInd.txt``)."""
    if not path.is_file():
        raise DataError(f"class names file not found: {path}")
    lines = [(n, line.strip()) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if not lines:
        raise DataError(f"class names file {path} is empty")
    indexed = all(len(line.split(maxsplit=1)) == 2 and line.split()[0].isdigit() for _, line in lines)
    if not indexed:
        names = [line for _, line in lines]
        if len(set(names)) != len(names):
            raise DataError(f"class names file {path} lists a name twice")
        return ClassVocabulary.from_names(names)
    pairs = sorted((int(line.split(maxsplit=1)[0]), line.split(maxsplit=1)[1], n) for n, line in lines)
    vocab = ClassVocabulary.from_names([name for _, name, _ in pairs])
    base = pairs[0][0]
    if [i for i, _, _ in pairs] != list(range(base, base + len(pairs))):
        raise DataError(f"class names file {path}: indices must be consecutive, got {[i for i, _, _ in pairs][:10]}")
    lookup = {name: i for i, name in enumerate(vocab.names)} | {str(i + base): i for i in range(len(pairs))}
    return ClassVocabulary(vocab.names, lookup)


def read_entries(list_file: Path) -> list[RawEntry]:
    """Rows of an annotation file: a CSV with a header naming a path column, else ``path [label]`` lines."""
    if not list_file.is_file():
        raise DataError(f"annotation file not found: {list_file}")
    text = list_file.read_text()
    first = next((line for line in text.splitlines() if line.strip()), "")
    header = [h.strip().lower() for h in first.split(",")]
    path_col = next((c for c in PATH_COLUMNS if c in header), None)
    if "," in first and path_col is not None:
        label_col = next((c for c in LABEL_COLUMNS if c in header), None)
        rows = csv.DictReader(text.splitlines())
        rows.fieldnames = [h.strip().lower() for h in rows.fieldnames or []]
        entries = []
        for n, row in enumerate(rows, 2):
            label = (row.get(label_col) or "").strip() if label_col else ""
            if (row.get(path_col) or "").strip():
                entries.append(RawEntry(row[path_col].strip(), label or None, f"{list_file}:{n}"))
        if not entries:
            raise DataError(f"annotation file {list_file} lists no videos")
        return entries
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.strip().rsplit(maxsplit=1)
        if not parts or parts[0].startswith("#"):
            continue
        entries.append(RawEntry(parts[0], parts[1] if len(parts) == 2 else None, f"{list_file}:{n}"))
    if not entries:
        raise DataError(f"annotation file {list_file} lists no videos")
    return entries


def infer_vocabulary(entries: Sequence[RawEntry]) -> ClassVocabulary:
    """Classes of a training list without a names file: ``0..max`` for numeric labels, else sorted names."""
    labels = {e.label for e in entries if e.label is not None}
    if not labels:
        raise DataError(f"the training list ({entries[0].source.rsplit(':', 1)[0]}) has no labels")
    if all(label.isdigit() for label in labels):
        return ClassVocabulary.from_names([str(i) for i in range(max(map(int, labels)) + 1)])
    return ClassVocabulary.from_names(sorted(labels))


def resolve_samples(
    entries: Sequence[RawEntry], root: Path, vocab: ClassVocabulary, *, require_labels: bool = True
) -> list[VideoSample]:
    """Map labels to indices and paths under ``root``; a line without a label takes its parent folder's
    name when that is a class (UCF101 test lists). Raises one DataError naming every bad line."""
    samples, problems = [], []
    for entry in entries:
        path = Path(entry.path) if Path(entry.path).is_absolute() else root / entry.path
        label = entry.label
        if label is None and Path(entry.path).parent.name in vocab.lookup:
            label = Path(entry.path).parent.name
        if label is None:
            if require_labels:
                problems.append(f"{entry.source}: no label for {entry.path}")
            samples.append(VideoSample(path, -1, entry.source))
        elif label not in vocab.lookup:
            known = ", ".join(vocab.names[:8]) + (", ..." if len(vocab.names) > 8 else "")
            problems.append(f"{entry.source}: unknown label {label!r} (known: {known})")
        else:
            samples.append(VideoSample(path, vocab.lookup[label], entry.source))
    if problems:
        raise _problem_list(problems, "annotation line(s) with a missing or unknown label")
    return samples


def check_exists(samples: Sequence[VideoSample], *, workers: int = 16) -> None:
    """Raise one DataError naming every listed video that is missing or empty (checked in threads, so a
    network file system answers quickly)."""

    def problem(sample: VideoSample) -> str | None:
        try:
            if sample.path.stat().st_size > 0:
                return None
            return f"{sample.source}: video file is empty: {sample.path}"
        except OSError:
            return f"{sample.source}: video file not found: {sample.path}"

    with ThreadPoolExecutor(workers) as pool:
        problems = [p for p in pool.map(problem, samples) if p]
    if problems:
        raise _problem_list(problems, "listed video file(s) missing or empty")
