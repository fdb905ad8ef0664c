"""The task modules (``TaskModule`` and its four tasks), each runnable as ``python -m tasks.<task>``."""

from engine.legacy_paths import install as _install_legacy_paths

_install_legacy_paths()  # the previous release's tasks.<helper> module paths, for old YAML class_paths
