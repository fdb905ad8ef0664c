"""Test settings: a private synthetic-data cache, two threads, deterministic seeds."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def synthetic_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Synthetic data sets are written once per test session into a temporary cache."""
    path = os.environ.get("VISION_SUITE_TEST_CACHE") or str(tmp_path_factory.mktemp("vision-suite-cache"))
    os.environ["VISION_SUITE_CACHE"] = path
    return path


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
