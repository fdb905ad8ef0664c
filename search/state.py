"""A search's state on disk, so a killed search resumes: ``<output_dir>/state.json`` holds the settings of the run
(a resumed one must have the same), the last finished round (the evolution's ``generation``, the pruning's ``step``)
and every candidate evaluated so far, rewritten atomically after each round."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .results import Candidate


def write_state(path: Path, settings: dict[str, Any], round_name: str, index: int,
                candidates: list[dict[str, Any]]) -> None:
    """Replace ``path`` by the state after round ``index`` (``round_name``: ``generation``, ``step``): ``candidates``
    as plain dicts."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, round_name: index, "records": candidates}))
    tmp.replace(path)


def candidate_record(candidate: Candidate, **extra: Any) -> dict[str, Any]:
    return {**extra, **asdict(candidate)}


def read_state(path: Path, settings: dict[str, Any], round_name: str) -> tuple[int, list[dict[str, Any]]] | None:
    """The last finished round and the candidates' records of a previous run at ``path`` with these ``settings``;
    ``None`` when there is none. A ValueError names the settings that differ, or a state of another version."""
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    saved = state.get("settings", {})
    if saved != settings:
        changed = sorted(k for k in settings.keys() | saved.keys() if saved.get(k) != settings.get(k))
        raise ValueError(f"{path} is a search with other settings ({', '.join(changed)}); use another output_dir")
    if round_name not in state or not isinstance(state.get("records"), list):
        raise ValueError(f"{path} was written by another version of the search; use another output_dir")
    return state[round_name], state["records"]


def candidate_from(record: dict[str, Any], path: Path) -> Candidate:
    """The ``Candidate`` of a record ``read_state`` returned (its extra keys removed first)."""
    try:
        return Candidate(**record)
    except TypeError as err:
        raise ValueError(f"{path} was written by another version of the search ({err}); use another output_dir") from err
