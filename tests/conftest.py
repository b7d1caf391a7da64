"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import make_pairs


@pytest.fixture(scope="session")
def pairs_jsonl(tmp_path_factory) -> Path:
    return make_pairs(tmp_path_factory.mktemp("pairs"), 64)
