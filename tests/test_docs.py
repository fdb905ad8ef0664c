"""The documentation site builds with ``mkdocs build --strict``: a broken link, a missing page or an API name that
no longer exists fails here, before it reaches a reader."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import shlex
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


TASK_PAGES = ("classification", "video", "segmentation", "medical")


@pytest.mark.parametrize("task", TASK_PAGES)
def test_task_page_has_a_layout_tree_and_a_working_command(task: str) -> None:
    """Each task page draws its data layout as a tree, and its first command runs: the recipe and every flag parse
    (``--print_config`` resolves the whole config without training)."""
    text = (ROOT / "docs" / "tasks" / f"{task}.md").read_text()
    assert "## Data layout" in text and "├── " in text
    first = re.search(r"```bash\n(python -m tasks\.\S+ [^\n]*)", text)
    assert first, f"docs/tasks/{task}.md shows no command"
    words = shlex.split(first.group(1), comments=True)
    out = io.StringIO()
    with pytest.raises(SystemExit) as exited, contextlib.redirect_stdout(out):
        importlib.import_module(words[2]).main(args=[*words[3:], "--print_config"])
    assert exited.value.code in (0, None), first.group(1)
    assert "model:" in out.getvalue()
