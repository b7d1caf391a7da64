"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import make_pairs


@pytest.fixture(scope="session")
def pairs_jsonl(tmp_path_factory) -> Path:
    return make_pairs(tmp_path_factory.mktemp("pairs"), 64)


@pytest.fixture(scope="session", autouse=True)
def shard_index_cache(tmp_path_factory):
    """Shard-index cache files go to a directory of this test session, not ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("POLYSENSE_CACHE", str(tmp_path_factory.mktemp("polysense-cache")))
    yield
    mp.undo()
