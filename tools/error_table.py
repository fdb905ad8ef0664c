"""Write the error listing of ``docs/troubleshooting.md``: every ``raise SomeError(...)`` in the packages a user's
input reaches, with its message as the code writes it (``{...}`` where the message fills in a value), grouped by
package and file.

    python tools/error_table.py            # print the listing (Markdown)
    python tools/error_table.py --check    # exit 1 if docs/troubleshooting.md's listing differs
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from doc_block import print_or_check  # tools/doc_block.py

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("datamodules", "backbones", "heads", "engine", "search", "tasks")
DOC = ROOT / "docs" / "troubleshooting.md"
BEGIN, END = "<!-- error listing: python tools/error_table.py -->", "<!-- end of error listing -->"


def message(node: ast.expr | None) -> str:
    """The message template of a raise's first argument: literal text with ``{...}`` for what is filled in."""
    if node is None:
        return ""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{…}" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
        return message(node.left) + message(node.right) if isinstance(node.op, ast.Add) else message(node.left)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "join":
        return "{…}"
    return "{…}"


def raises(path: Path) -> list[tuple[int, str, str]]:
    """``(line, exception name, message)`` of every ``raise Name(...)`` in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            func = node.exc.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name.endswith(("Error", "Exception")):
                text = " ".join(message(node.exc.args[0] if node.exc.args else None).split())
                found.append((node.lineno, name, text))
    return sorted(found)


def listing() -> str:
    out = []
    for package in PACKAGES:
        files = [(p, raises(p)) for p in sorted((ROOT / package).rglob("*.py"))]
        files = [(p, r) for p, r in files if r]
        if not files:
            continue
        out += [f"### `{package}/`", "", "| where | error | message |", "| --- | --- | --- |"]
        for path, found in files:
            rel = path.relative_to(ROOT).as_posix()  # no line numbers: the listing changes only with the messages
            for line, name, text in found:
                shown = text.replace("|", "\\|").replace("`", "'").replace("[", "\\[").replace("]", "\\]")
                out.append(f"| `{rel}` | `{name}` | {shown[:300]} |")
        out.append("")
    return "\n".join(out).strip()


def main() -> int:
    return print_or_check(__doc__.split("\n")[0], DOC, BEGIN, END, listing, "listing")

if __name__ == "__main__":
    sys.exit(main())
