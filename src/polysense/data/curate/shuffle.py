"""The shard stage: an exact global shuffle into fixed-size shards, in bounded memory, and the
manifest of counts and checksums.

A seeded permutation of the N sample positions says where each sample goes: output shard
``p // size`` at slot ``p % size``. Pass 1 (per input shard) scatters each sample into a small
piece file per destination; pass 2 (per output shard) loads its pieces (at most `size` samples),
orders them by slot and writes the shard. Only the permutation (8 bytes per sample) and one shard
are ever in memory, and the result is a uniformly random permutation of the whole corpus.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from polysense.data.curate import shards as sh
from polysense.errors import DataError
from polysense.fileio import atomic_open, atomic_write_json

GENERATOR = "polysense.curate"


@dataclass(frozen=True)
class ScatterTask:
    src: str
    index: int
    offset: int
    perm: str
    size: int
    pieces: str
    record: str  # done-record path of this input shard


@dataclass(frozen=True)
class GatherTask:
    dest: int
    pieces: str
    dst: str


def scatter(task: ScatterTask) -> dict[str, Any]:
    start = time.perf_counter()
    raws = list(sh.read_shard(task.src))
    perm = np.load(task.perm, mmap_mode="r")[task.offset : task.offset + len(raws)]
    groups: dict[int, list[tuple[int, sh.Raw]]] = defaultdict(list)
    for raw, p in zip(raws, perm.tolist(), strict=True):
        groups[p // task.size].append((p % task.size, raw))
    for dest, items in groups.items():
        items.sort(key=lambda item: item[0])
        base = Path(task.pieces) / f"out-{dest:06d}" / f"from-{task.index:06d}"
        sh.write_shard(base.with_suffix(".tar"), (raw for _, raw in items))
        with atomic_open(base.with_suffix(".npy"), "wb") as fh:
            np.save(fh, np.asarray([slot for slot, _ in items], dtype=np.int64))
    record = sh.ShardRecord(shard=Path(task.src).name, n_in=len(raws), kept=len(raws))
    record.seconds = time.perf_counter() - start
    atomic_write_json(task.record, record.to_json())
    return record.to_json()


def gather(task: GatherTask) -> dict[str, Any]:
    start = time.perf_counter()
    slots: list[int] = []
    raws: list[sh.Raw] = []
    for piece in sorted((Path(task.pieces) / f"out-{task.dest:06d}").glob("from-*.tar")):
        slots += np.load(piece.with_suffix(".npy")).tolist()
        raws += list(sh.read_shard(piece))
    order = np.argsort(np.asarray(slots), kind="stable")
    count, digest = sh.write_shard(task.dst, (raws[k] for k in order))
    entry = {"path": Path(task.dst).name, "count": count, "sha256": digest}
    entry["seconds"] = time.perf_counter() - start
    atomic_write_json(Path(task.dst).with_suffix(".entry.json"), entry)
    return entry


def write_manifest(out: Path, entries: list[dict[str, Any]], **info: Any) -> dict[str, Any]:
    """OUT/manifest.json: total count and per shard {path, count, sha256}."""
    shards = [{k: e[k] for k in ("path", "count", "sha256")} for e in entries]
    manifest = {
        "generator": GENERATOR,
        "count": sum(e["count"] for e in shards),
        **info,
        "shards": shards,
    }
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def manifest_entries(out: Path) -> list[dict[str, Any]]:
    """Entries for the shards already in `out` (used when the last stage is not `shard`)."""
    entries = []
    for path in sorted(out.glob("shard-*.tar")):
        count = sum(1 for _ in sh.read_shard(path))
        entries.append({"path": path.name, "count": count, "sha256": sh.file_sha256(path)})
    return entries


def verify_manifest(out: str | Path) -> dict[str, Any]:
    """Recount and re-hash every shard the manifest lists; raise DataError on any mismatch."""
    out = Path(out)
    path = out / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path}: no manifest; run `polysense data shard` or `data curate`")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    problems = []
    for entry in manifest["shards"]:
        shard = out / entry["path"]
        if not shard.is_file():
            problems.append(f"{shard}: missing")
            continue
        if sh.file_sha256(shard) != entry["sha256"]:
            problems.append(f"{shard}: sha256 differs from the manifest (corrupted or changed)")
        count = sum(1 for _ in sh.read_shard(shard))
        if count != entry["count"]:
            problems.append(f"{shard}: {count} samples, the manifest says {entry['count']}")
    total = sum(e["count"] for e in manifest["shards"])
    if total != manifest["count"]:
        problems.append(f"{path}: shard counts add up to {total}, 'count' says {manifest['count']}")
    if problems:
        raise DataError("manifest check failed: " + "; ".join(problems))
    return manifest
