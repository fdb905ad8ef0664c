"""The suite's version: the installed distribution's (``pyproject.toml``'s ``version``), read once.

The package has no ``vision_suite`` module (its layers are top-level packages), so the version lives in the
lowest layer every entry point shares: ``engine.__version__``, printed by ``python -m tasks.<task> --version``.
Read from the install's metadata rather than written here twice; a source tree used without installing says
``0+unknown``."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "vision-suite"

try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:  # run from a source tree that was never pip-installed
    __version__ = "0+unknown"
