"""Every command in README.md's fenced shell blocks is covered: the task commands parse (``--print_config``
resolves the whole recipe without training), the install commands name extras that exist, the test command is
the one CI runs, and the docs command builds the site that ``tests/test_docs.py`` builds."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def readme_commands(text: str) -> list[list[str]]:
    """The commands of every ```bash block: continuation lines joined, ``a && b`` split, comments dropped."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words:
                    commands.append(words)
    return commands


COMMANDS = readme_commands(README.read_text())


def test_readme_is_short_and_has_commands() -> None:
    assert len(README.read_text().splitlines()) <= 200
    assert any(c[:3] == ["python", "-m", "pytest"] for c in COMMANDS)
    assert sum(c[:2] == ["python", "-m"] and c[2].startswith("tasks.") for c in COMMANDS) >= 10


def test_readme_test_command_is_what_ci_runs() -> None:
    """``.ci/run`` runs exactly README.md's test command (the first ``python -m pytest`` of the README)."""
    first = next(c for c in COMMANDS if c[:3] == ["python", "-m", "pytest"])
    ci = [shlex.split(line) for line in (ROOT / ".ci/run").read_text().splitlines() if "pytest" in line]
    assert first in ci, f"README's test command {shlex.join(first)} is not run by .ci/run"


def test_readme_install_commands_name_existing_extras() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installs = [c for c in COMMANDS if c[:2] == ["pip", "install"]]
    assert installs
    for command in installs:
        assert command[2:4] == ["-e", command[3]] and command[3].startswith(".["), shlex.join(command)
        for extra in command[3][2:-1].split(","):
            assert extra in extras, f"README installs the extra {extra!r}, which pyproject.toml does not declare"


def test_readme_has_no_uncovered_command() -> None:
    covered = ("python -m pytest", "pip install", "python -m tasks.", "mkdocs serve", "mkdocs build")
    for command in COMMANDS:
        line = shlex.join(command)
        assert line.startswith(covered), f"README command not covered by a test: {line}"
    if any(c[0] == "mkdocs" for c in COMMANDS):
        assert (ROOT / "tests/test_docs.py").is_file()  # builds the same site with --strict


TASK_COMMANDS = [c for c in COMMANDS if c[:2] == ["python", "-m"] and c[2].startswith("tasks.")]


@pytest.mark.parametrize("command", TASK_COMMANDS, ids=[" ".join(c[2:4]) for c in TASK_COMMANDS])
def test_readme_task_command_parses(command: list[str]) -> None:
    """The recipe, every flag and every value of the command are valid: LightningCLI resolves the whole config."""
    module = importlib.import_module(command[2])
    out = io.StringIO()
    with pytest.raises(SystemExit) as exited, contextlib.redirect_stdout(out):
        module.main(args=[*command[3:], "--print_config"])
    assert exited.value.code in (0, None), f"{shlex.join(command)} did not parse:\n{out.getvalue()}"
    assert "model:" in out.getvalue() and "data:" in out.getvalue()
