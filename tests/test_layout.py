"""The package layout is a stack of layers: every import runs down it, and no module imports itself back in a
circle. ``ops`` (kernels) < ``backbones`` < ``heads``, ``datamodules`` < ``engine`` < ``search`` < ``tasks``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
LAYERS = {"ops": 0, "backbones": 1, "heads": 2, "datamodules": 2, "engine": 3, "search": 4, "tasks": 5}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The project modules ``path`` imports, lazily inside functions too (a lazy import is still a dependency)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    modules = {module_name(p) for p in sources()}
    return {m for m in found if m in modules and m != name}


def sources() -> list[Path]:
    return sorted(p for layer in LAYERS for p in (REPO / layer).rglob("*.py"))


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sources()}


def test_every_import_runs_down_the_layers() -> None:
    upward = [
        f"{a} imports {b}"
        for a, targets in graph().items()
        for b in targets
        if (la := a.split(".")[0]) != (lb := b.split(".")[0]) and LAYERS[lb] >= LAYERS[la]
    ]
    assert not upward, "\n".join(upward)


def test_no_module_imports_itself_back_in_a_circle() -> None:
    edges = graph()
    # a package's __init__ importing its own sub-modules (registration) is not a circle of concepts
    edges = {a: {b for b in bs if not a.startswith(b + ".") and not b.startswith(a + ".")} for a, bs in edges.items()}
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_private_torch_calls_stay_in_ops(package: str) -> None:
    if package == "ops":
        return
    offenders = [
        str(p.relative_to(REPO)) for p in (REPO / package).rglob("*.py")
        if "torch._C" in p.read_text() or "torch.ops." in p.read_text()
    ]
    assert not offenders, f"private torch calls outside ops/: {offenders}"
