"""The documentation site builds with ``mkdocs build --strict``: a broken link, a missing page or an API name that
no longer exists fails here, before it reaches a reader."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[docs]' (the dev extra has it)")
    pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed: pip install -e '.[docs]'")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for page in ("index.html", "getting-started/index.html", "tasks/segmentation/index.html", "api/backbones/index.html"):
        assert (site / page).is_file(), page
    api = (site / "api/backbones/index.html").read_text()
    assert "create_backbone" in api and "Supernet" in api  # mkdocstrings rendered the docstrings
    shutil.rmtree(site)
