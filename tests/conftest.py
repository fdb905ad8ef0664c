"""Test settings: a private synthetic-data cache, two threads, deterministic seeds, and the tiers.

Tiers (markers, pyproject.toml): ``python -m pytest`` runs every test that can run here; ``python -m pytest -m "not
slow and not distributed"`` is the quick tier; ``gpu`` tests skip without CUDA."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests skip where CUDA is not available (CI, the development machines)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def synthetic_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Synthetic data sets are written once per test session into a temporary cache."""
    path = os.environ.get("VISION_SUITE_TEST_CACHE") or str(tmp_path_factory.mktemp("vision-suite-cache"))
    os.environ["VISION_SUITE_CACHE"] = path
    return path


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Tiny models on one thread: on two shared cores a second thread mostly spins while it waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
