"""The generated block of a docs page, between two HTML comments: printed for pasting, or (``--check``) compared with
the page. Shared by ``tools/backbone_table.py`` and ``tools/error_table.py``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def print_or_check(description: str, doc: Path, begin: str, end: str, make: Callable[[], str], what: str) -> int:
    """``python tools/<tool>.py`` prints ``make()``; with ``--check`` it exits 1, naming ``doc``, where the page's
    block between ``begin`` and ``end`` differs."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true", help=f"compare with {doc.relative_to(doc.parents[1])} instead of printing")
    args = parser.parse_args()
    text = make()
    if not args.check:
        print(text)
        return 0
    page = doc.read_text()
    current = page.split(begin, 1)[1].split(end, 1)[0].strip() if begin in page else ""
    if current != text:
        print(f"{doc} is out of date: run python tools/{Path(sys.argv[0]).name} and paste its {what}", file=sys.stderr)
        return 1
    return 0
