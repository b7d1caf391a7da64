"""The shard-index cache (data/shard_index.py): a cached index equals a freshly read one, a
changed or cut-short shard is read again, a damaged or pickled cache file is never trusted, and
reading shards in worker processes gives the same index."""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest

from polysense.data import shard_index
from polysense.data.shard_index import build_index, cache_root
from test_pipeline import write_shards


def _equal(a, b) -> None:
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            assert np.array_equal(x, y), f.name
        else:
            assert x == y, f.name


def _shards(root: Path) -> list[str]:
    return sorted(str(p) for p in write_shards(root).glob("*.tar"))


def _no_reads(monkeypatch) -> None:
    monkeypatch.setattr(shard_index, "_scan", lambda path: pytest.fail(f"read {path}"))


def test_cached_index_equals_a_fresh_read_and_skips_the_tars(tmp_path, monkeypatch):
    shards = _shards(tmp_path / "shards")
    monkeypatch.setenv("POLYSENSE_CACHE", "off")
    fresh = build_index(shards)
    assert cache_root() is None
    monkeypatch.setenv("POLYSENSE_CACHE", str(tmp_path / "cache"))
    first = build_index(shards)  # reads and stores
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == len(shards)
    _no_reads(monkeypatch)
    again = build_index(shards)  # from the cache alone
    _equal(fresh, first)
    _equal(fresh, again)
    # the kept members depend on the modalities asked for, not on what was cached
    cached_image_only = build_index(shards, modalities=("image",))
    monkeypatch.undo()
    monkeypatch.setenv("POLYSENSE_CACHE", "off")
    _equal(cached_image_only, build_index(shards, modalities=("image",)))
    assert len(cached_image_only.offset) == len(fresh)  # one member per sample, not two


def test_a_changed_shard_is_read_again(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYSENSE_CACHE", str(tmp_path / "cache"))
    shards = _shards(tmp_path / "shards")
    before = build_index(shards)
    with tarfile.open(shards[0]) as tar:  # rewrite shard 0 without its first sample
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first_key = members[0][0].name.split(".")[0]
    with tarfile.open(shards[0], "w") as tar:
        for m, data in members:
            if not m.name.startswith(first_key + "."):
                tar.addfile(m, io.BytesIO(data))
    after = build_index(shards)
    assert len(after) == len(before) - 1 and first_key not in after.keys.tolist()
    assert after.sample(0)["key"] == before.keys[1]  # read at its new offsets


def test_a_cut_short_shard_warns_every_time_and_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYSENSE_CACHE", str(tmp_path / "cache"))
    shards = _shards(tmp_path / "shards")
    size = os.path.getsize(shards[1])
    with open(shards[1], "r+b") as f:
        f.truncate(size // 2)
    for _ in range(2):
        with pytest.warns(UserWarning, match="cut short"):
            index = build_index(shards)
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == len(shards) - 1
    assert 0 < int((index.shard == 1).sum()) < 16


def test_damaged_or_pickled_cache_files_are_read_again(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYSENSE_CACHE", str(tmp_path / "cache"))
    shards = _shards(tmp_path / "shards")
    fresh = build_index(shards)
    files = sorted((tmp_path / "cache").rglob("*.npz"))
    files[0].write_bytes(b"not an npz")
    # an object array would need pickle to load: np.load(allow_pickle=False) refuses it
    with open(files[1], "wb") as f:
        np.savez(f, keys=np.array([object()], dtype=object), counts=np.array([1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _equal(build_index(shards), fresh)


def test_worker_processes_read_the_same_index(tmp_path, monkeypatch):
    shards = _shards(tmp_path / "shards")
    monkeypatch.setattr(shard_index, "PARALLEL_FROM", 2)
    monkeypatch.setenv("POLYSENSE_CACHE", "off")
    _equal(build_index(shards, workers=2), build_index(shards, workers=1))
