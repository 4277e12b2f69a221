"""Shared fixtures: a tiny MovieLens-100k folder in the official format, an isolated cache.

Helpers that tests import live in modules of their own (``tests/ml100k.py``, ``tests/multiprocess.py``), not here;
``write_ml100k`` stays importable from this module for the tests that still do so.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.ml100k import TITLES, write_ml100k

__all__ = ["TITLES", "write_ml100k"]


@pytest.fixture
def ml100k_folder(tmp_path: Path) -> Path:
    return write_ml100k(tmp_path / "ml-100k")


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Points the library's cache at an empty temporary folder."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("TORCHREC_SID_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module of tiny-tensor tests (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    as fast, and no stall when other processes hold the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
