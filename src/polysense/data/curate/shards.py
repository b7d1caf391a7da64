"""Shard plumbing of the curation pipeline: tar members in and out, per-shard tasks that resume,
a process pool or Ray Data to map them, and the per-shard records a report adds up.

A shard task writes its output shard atomically and then a ``.done.json`` record (counts,
rejects, seconds) atomically; a rerun skips every task whose record exists, so an interrupted run
resumes without duplicating or losing samples (a half-written shard is never published).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from polysense.errors import DataError, PolysenseError
from polysense.fileio import atomic_open, atomic_write_json

Raw = dict[str, bytes]  # one sample's tar members by extension, plus "__key__"
ENGINES = ("local", "ray")


# ---------------------------------------------------------------------------------------------
# tar members


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def read_shard(path: str | Path) -> Iterator[Raw]:
    """The samples of a webdataset tar as ``{"__key__": key, ext: bytes}`` (key before the first
    dot of a member name, members of one key consecutive, as webdataset writes them)."""
    current: Raw | None = None
    with tarfile.open(path, mode="r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            key, _, ext = base.partition(".")
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}  # type: ignore[dict-item]
            handle = tar.extractfile(member)
            assert handle is not None
            current[ext] = handle.read()
    if current is not None:
        yield current


def write_shard(path: str | Path, samples: Iterable[Raw]) -> tuple[int, str]:
    """Write samples atomically as a tar (deterministic headers); returns (count, sha256)."""
    count = 0
    with (
        atomic_open(path, "wb") as fh,
        tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for raw in samples:
            key = str(raw["__key__"])
            for ext, data in raw.items():
                if ext != "__key__":
                    tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
            count += 1
    return count, file_sha256(path)


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def meta(raw: Raw) -> dict[str, Any]:
    """The sample's json member (captions, objects, label ...), {} when it has none."""
    data = raw.get("json")
    return json.loads(data) if data else {}


def set_meta(raw: Raw, value: dict[str, Any]) -> None:
    raw["json"] = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def captions(raw_meta: dict[str, Any]) -> list[str]:
    """The sample's captions as read by `polysense.data.readers` (caption, captions or text)."""
    for name in ("caption", "captions", "text"):
        if name in raw_meta:
            value = raw_meta[name]
            return [value] if isinstance(value, str) else [str(c) for c in value]
    return []


def caption_field(raw_meta: dict[str, Any]) -> str:
    return next((n for n in ("caption", "captions", "text") if n in raw_meta), "captions")


def image(raw: Raw) -> Image.Image | None:
    """The decoded RGB image of a sample (png/jpg member), None when it has none."""
    for ext in ("png", "jpg", "jpeg", "webp"):
        if ext in raw:
            with Image.open(io.BytesIO(raw[ext])) as im:
                return im.convert("RGB")
    return None


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# per-shard records


@dataclass
class ShardRecord:
    """What one stage did to one shard: counts, rejects ({key, stage, reason, score, detail})."""

    shard: str
    n_in: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    extra: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def reject(
        self, *, key: str, stage: str, reason: str, score: float | None, detail: str = ""
    ) -> None:
        self.dropped[reason] += 1
        self.rejects.append(
            {"key": key, "stage": stage, "reason": reason, "score": score, "detail": detail}
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "in": self.n_in,
            "kept": self.kept,
            "dropped": dict(self.dropped),
            "rejects": self.rejects,
            "extra": dict(self.extra),
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardRecord:
        return cls(
            shard=data["shard"],
            n_in=data["in"],
            kept=data["kept"],
            dropped=Counter(data["dropped"]),
            rejects=list(data["rejects"]),
            extra=Counter(data.get("extra") or {}),
            seconds=float(data["seconds"]),
        )


def done_path(out_shard: Path) -> Path:
    return out_shard.with_name(out_shard.name.removesuffix(".tar") + ".done.json")


def load_record(out_shard: Path) -> ShardRecord | None:
    path = done_path(out_shard)
    if not path.is_file():
        return None
    try:
        return ShardRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, KeyError) as exc:
        raise DataError(
            f"{path}: unreadable shard record ({exc}); delete it to redo the shard"
        ) from exc


def save_record(out_shard: Path, record: ShardRecord) -> None:
    atomic_write_json(done_path(out_shard), record.to_json())


def filter_shard(
    src: Path,
    dst: Path,
    *,
    stage: str,
    decide: Callable[[list[Raw]], list[tuple[str, float | None, str] | None]],
    batch: int = 256,
) -> ShardRecord:
    """Stream `src` to `dst` in batches; `decide(batch)` returns per sample None (keep, possibly
    after editing the sample in place) or (reason, score, detail) to reject it."""
    start = time.perf_counter()
    record = ShardRecord(shard=dst.name)

    def kept() -> Iterator[Raw]:
        buffer: list[Raw] = []
        for raw in read_shard(src):
            buffer.append(raw)
            if len(buffer) == batch:
                yield from _decide(buffer)
                buffer = []
        if buffer:
            yield from _decide(buffer)

    def _decide(items: list[Raw]) -> Iterator[Raw]:
        verdicts = decide(items)
        for raw, verdict in zip(items, verdicts, strict=True):
            record.n_in += 1
            if verdict is None:
                record.kept += 1
                yield raw
            else:
                reason, score, detail = verdict
                key = str(raw["__key__"])
                record.reject(key=key, stage=stage, reason=reason, score=score, detail=detail)

    write_shard(dst, kept())
    record.seconds = time.perf_counter() - start
    return record


# ---------------------------------------------------------------------------------------------
# mapping tasks over shards


def map_tasks(
    fn: Callable[[Any], Any],
    tasks: Sequence[Any],
    *,
    workers: int = 1,
    engine: str = "local",
    label: str = "",
    progress: bool = False,
) -> list[Any]:
    """``[fn(t) for t in tasks]`` in order: in this process (workers <= 1), a local process pool,
    or Ray Data over a Ray cluster (``engine="ray"``; a local one is started when none runs)."""
    if engine not in ENGINES:
        raise PolysenseError(f"engine={engine!r}: choose one of {', '.join(ENGINES)}")
    if not tasks:
        return []
    if engine == "ray":
        return _map_ray(fn, tasks, workers)
    results: list[Any] = [None] * len(tasks)
    with _bar(progress, label, len(tasks)) as advance:
        if workers <= 1 or len(tasks) == 1:
            for i, task in enumerate(tasks):
                results[i] = fn(task)
                advance()
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
                for i, result in enumerate(pool.map(fn, tasks)):
                    results[i] = result
                    advance()
    return results


def _map_ray(fn: Callable[[Any], Any], tasks: Sequence[Any], workers: int) -> list[Any]:
    """Ray Data: one row per task, `fn` mapped over the rows, results back in task order."""
    try:
        import ray
    except ImportError as exc:
        raise PolysenseError(
            "--engine ray needs Ray Data: pip install 'ray[data]' (or use --engine local)"
        ) from exc
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if "RAY_ADDRESS" not in os.environ:
            kwargs["num_cpus"] = max(workers, 1)
        ray.init(**kwargs)
    import cloudpickle  # ships with ray

    payloads = [{"i": i, "task": cloudpickle.dumps(t)} for i, t in enumerate(tasks)]
    fn_bytes = cloudpickle.dumps(fn)

    def run(row: dict[str, Any]) -> dict[str, Any]:
        result = cloudpickle.loads(fn_bytes)(cloudpickle.loads(row["task"]))
        return {"i": row["i"], "result": cloudpickle.dumps(result)}

    rows = ray.data.from_items(payloads).map(run).take_all()
    results: list[Any] = [None] * len(tasks)
    for row in rows:
        results[row["i"]] = cloudpickle.loads(row["result"])
    return results


class _bar:
    """A rich progress bar over tasks, or nothing."""

    def __init__(self, enabled: bool, label: str, total: int | None) -> None:
        self.enabled, self.label, self.total = enabled, label, total

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        from rich.progress import Progress

        self.progress = Progress(transient=False)
        self.progress.start()
        task = self.progress.add_task(self.label or "shards", total=self.total)
        return lambda: self.progress.update(task, advance=1)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.stop()


def stable_fraction(key: str, seed: int) -> float:
    """A number in [0, 1) fixed by (key, seed): per-sample decisions that do not depend on order."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def as_array(values: Sequence[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)
