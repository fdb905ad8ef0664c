"""The suite has one version: pyproject.toml's, as installed, printed by every task's ``--version`` and described
by a release section of CHANGELOG.md."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
from pathlib import Path

import pytest
import tomllib

import engine

ROOT = Path(__file__).resolve().parents[1]
PROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_engine_version_is_the_projects() -> None:
    assert engine.__version__ == PROJECT_VERSION, "reinstall (pip install -e .) after changing pyproject's version"


@pytest.mark.parametrize("task", ["classification", "video", "segmentation", "medical"])
@pytest.mark.parametrize("where", [[], ["fit"]], ids=["command", "subcommand"])
def test_task_prints_version(task: str, where: list[str]) -> None:
    out = io.StringIO()
    with pytest.raises(SystemExit) as exited, contextlib.redirect_stdout(out):
        importlib.import_module(f"tasks.{task}").main(args=[*where, "--version"])
    assert exited.value.code in (0, None)
    assert out.getvalue().strip() == f"vision-suite {PROJECT_VERSION}"


def test_search_prints_version() -> None:
    out = io.StringIO()
    with pytest.raises(SystemExit) as exited, contextlib.redirect_stdout(out):
        importlib.import_module("search.run").main(["--version"])
    assert exited.value.code in (0, None)
    assert out.getvalue().strip() == f"vision-suite {PROJECT_VERSION}"


def test_changelog_has_a_section_for_the_version() -> None:
    """Keep a Changelog: ``## [Unreleased]`` on top, then ``## [X.Y.Z] - YYYY-MM-DD`` per release, newest first."""
    text = (ROOT / "CHANGELOG.md").read_text()
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", text, flags=re.MULTILINE)
    assert PROJECT_VERSION in releases
    headings = re.findall(r"^## (.*)$", text, flags=re.MULTILINE)
    assert headings[0] == "[Unreleased]", headings[0]
