"""What a killed writer leaves behind is removed by the next open or run, and only that: the
stale `.NAME.tmp-XXXXXXXX` directories of an index build/add and the `.state.pt.XXXXXXXX.tmp`
files of a checkpoint save go; a live writer's temp entry (locked), a fresh one (the instant
before its lock) and other files stay, and the real data is intact (issue 21, defect 9)."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import make_pairs, tiny_config
from polysense.fileio import STALE_AFTER_S, atomic_open, remove_stale
from polysense.index import EmbeddingIndex, build_index
from polysense.models.checkpoint import save_checkpoint
from polysense.models.clip import build_model
from polysense.train.checkpoint import STATE, load_state, save_state


def _age(path: Path, seconds: float = 10 * STALE_AFTER_S) -> Path:
    """Make `path` look untouched for `seconds` (a writer killed that long ago)."""
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def _mk(path: Path) -> Path:
    path.mkdir()
    return path


def _touch(path: Path, data: bytes = b"") -> Path:
    path.write_bytes(data)
    return path


class _Locked:
    """A live writer: holds the lock that fileio's writers hold on their temp entry."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        os.close(self.fd)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = tiny_config("clip-tiny", "model.vision.pool=mean", "train.precision=fp32")
    ckpt = save_checkpoint(build_model(cfg), cfg, tmp_path_factory.mktemp("ckpt"))
    pairs = make_pairs(tmp_path_factory.mktemp("pairs"), 12)
    out = tmp_path_factory.mktemp("root") / "index"
    build_index(ckpt, pairs, out, progress=False)
    return out


def test_open_removes_the_stale_temp_dirs_of_killed_builds(index_dir):
    root = index_dir.parent
    before = EmbeddingIndex.open(index_dir)
    query = np.asarray(before.embeddings("text")[:3])
    expected = before.search(query, k=4)
    stale = []
    for name in (".index.tmp-k1ll3d_a", ".index.tmp-abcdefgh"):  # mkdtemp's 8-char names
        (root / name).mkdir()
        (root / name / "items.sqlite").write_bytes(b"half written")
        (root / name / "image_emb.f32").write_bytes(b"\0" * 64)
        stale.append(_age(root / name))
    live = _age(_mk(root / ".index.tmp-livelive"))  # old, but a writer holds its lock
    fresh = _mk(root / ".index.tmp-justmade")  # created a moment ago, not locked yet
    other = _age(_mk(root / ".other.tmp-abcdefgh"))  # another index's temp dir
    unlike = _age(_mk(root / ".index.tmp-notours"))  # 7 characters: no mkdtemp name
    writer = _Locked(live)
    try:
        reopened = EmbeddingIndex.open(index_dir)
    finally:
        writer.release()
    assert not any(p.exists() for p in stale)
    assert live.is_dir() and fresh.is_dir() and other.is_dir() and unlike.is_dir()
    assert len(reopened) == len(before) == 12
    assert reopened.search(query, k=4) == expected
    # once the writer is gone (its lock with it), the next open removes its directory too
    EmbeddingIndex.open(index_dir)
    assert not live.exists() and fresh.exists()


def test_resume_and_save_remove_the_stale_temp_files_of_a_killed_save(tmp_path):
    out = tmp_path / "run"
    state = {"step": 7, "weights": torch.arange(6.0), "rng": torch.get_rng_state()}
    save_state(out, state)
    stale = [
        _age(_touch(out / ".state.pt.k1ll3d_a.tmp")),  # 0 bytes: killed before the first write
        _age(_touch(out / ".model.safetensors.abcdefgh.tmp", b"partial")),
    ]
    live = _age(_touch(out / ".state.pt.livelive.tmp"))
    fresh = _touch(out / ".state.pt.justmade.tmp")
    mine = [_touch(out / "notes.tmp"), _touch(out / ".state.pt.tmp")]  # not fileio's names
    writer = _Locked(live)
    try:
        loaded = load_state(out)
    finally:
        writer.release()
    assert not any(p.exists() for p in stale)
    assert live.exists() and fresh.exists() and all(p.exists() for p in mine)
    assert loaded["step"] == 7 and torch.equal(loaded["weights"], state["weights"])
    # the next save of a run (not only a resume) clears what is stale by then
    save_state(out, {**state, "step": 8})
    assert not live.exists() and fresh.exists()
    assert load_state(out)["step"] == 8 and (out / STATE).is_file()


def test_a_live_atomic_write_survives_a_cleaner(tmp_path):
    """A writer slower than STALE_AFTER_S (its temp file's time set far back mid-write) keeps
    its file: the lock, not the age, is what tells a live writer."""
    with atomic_open(tmp_path / "big.bin") as handle:
        handle.write(b"first half ")
        (temp,) = [p for p in tmp_path.iterdir() if p.name.startswith(".big.bin.")]
        _age(temp)
        assert remove_stale(tmp_path) == [] and temp.exists()
        handle.write(b"second half")
    assert (tmp_path / "big.bin").read_bytes() == b"first half second half"
    assert [p.name for p in tmp_path.iterdir()] == ["big.bin"]
