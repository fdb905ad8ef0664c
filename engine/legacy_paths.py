"""Module paths of the previous release's flat ``tasks/`` layout, resolved to where their contents live now, so a
YAML written by it (``class_path: tasks.fewshot_callback.FewShotEvaluator``, a run's saved ``config.yaml``) still
runs. Installed by ``tasks/__init__.py``; an old name imports the new module under both names."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

MOVED = {
    "tasks.checkpointing": "engine.checkpointing",
    "tasks.cli": "engine.cli",
    "tasks.distillation": "engine.distillation",
    "tasks.distributed": "engine.distributed",
    "tasks.export": "engine.export",
    "tasks.fewshot_callback": "engine.fewshot_callback",
    "tasks.medical_metrics": "engine.volume_metrics",
    "tasks.optimization": "engine.optimization",
    "tasks.pictures": "engine.pictures",
    "tasks.picture_makers": "engine.picture_makers",
    "tasks.predict": "engine.predict",
    "tasks.run_state": "engine.run_state",
    "tasks.sliding_window": "engine.sliding_window",
    "tasks.token_maps": "engine.token_maps",
    "tasks.sandwich": "search.sandwich",
    "tasks.search_data": "search.holdout",
    "tasks.search_evolution": "search.evolution",
    "tasks.search_latency": "search.latency",
    "tasks.search_mes": "search.mes",
    "tasks.medical_head_weights": "heads.unetr_weights",
    "tasks.segmentation_head_weights": "heads.segformer_weights",
}
"""Old module -> new module; the classes kept their names."""


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self.spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        """The new module is already executed; the old name is only bound to it (its own spec restored, which the
        import system overwrote with the alias's)."""
        module.__spec__ = self.spec


class LegacyPathFinder(importlib.abc.MetaPathFinder):
    """Finds the old module names of ``MOVED`` and hands out the new modules."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(MOVED[fullname]))


def install() -> None:
    if not any(isinstance(finder, LegacyPathFinder) for finder in sys.meta_path):
        sys.meta_path.append(LegacyPathFinder())
