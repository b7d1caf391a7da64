"""The curation run: read any source into working shards, run the stages shard by shard, write the
final shards, ``report.json`` (counts that add up) and ``rejects.jsonl`` (key, stage, reason, score).

Layout of OUT::

    work/00-read/shard-N.tar (+ .done.json)      the source as working shards
    work/01-dedup/shard-N.npz, plan.npz          per-shard signatures, the global plan
    work/01-dedup/out/shard-N.tar (+ .done.json) the stage's output (the last stage's is OUT)
    shard-N.tar, manifest.json, report.json, rejects.jsonl

Rerunning the same command resumes: finished shards, score files and plans are reused.
"""

from __future__ import annotations

import io
import itertools
import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from polysense.config import to_dict
from polysense.data.curate import shards as sh
from polysense.data.curate import shuffle
from polysense.data.curate.config import CurateConfig, check_config
from polysense.data.curate.signatures import Signatures
from polysense.data.curate.stages import (
    Plan,
    Task,
    apply_shard,
    eval_signatures,
    plan_contamination,
    plan_dedup,
    plan_filter,
    scan_shard,
)
from polysense.errors import DataError, PolysenseError
from polysense.fileio import atomic_open, atomic_write_json

_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_RESERVED = {"key", "source", "image", "text", "audio", "sample_rate", "video", "ocr_image"}


# ---------------------------------------------------------------------------------------------
# read: any source -> working shards


def _encode(sample: dict[str, Any], key: str) -> sh.Raw:
    """A reader sample -> tar members: png, json (captions + JSON-able fields), wav, video.npy."""
    raw: sh.Raw = {"__key__": key}  # type: ignore[dict-item]
    if sample.get("image") is not None:
        raw["png"] = sh.png_bytes(sample["image"])
    if sample.get("ocr_image") is not None:
        raw["ocr.png"] = sh.png_bytes(sample["ocr_image"])
    if sample.get("audio") is not None:
        import soundfile

        buf = io.BytesIO()
        soundfile.write(buf, sample["audio"], int(sample.get("sample_rate", 16000)), format="WAV")
        raw["wav"] = buf.getvalue()
    if sample.get("video") is not None:
        buf = io.BytesIO()
        np.save(buf, sample["video"], allow_pickle=False)
        raw["video.npy"] = buf.getvalue()
    meta: dict[str, Any] = {"captions": list(sample.get("text") or [])}
    for name, value in sample.items():
        if name in _RESERVED or name == "image_path":
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        meta[name] = value
    sh.set_meta(raw, meta)
    return raw


def _shard_keys(path: Path) -> list[str]:
    return [str(raw["__key__"]) for raw in sh.read_shard(path)]


def read_source(cfg: CurateConfig, dst: Path, *, progress: bool) -> list[sh.ShardRecord]:
    """Stream the source into `dst/shard-N.tar` of `cfg.shard_size` samples; resumes after the
    last complete shard. Reader rejects are recorded in the shard during which they happened."""
    from polysense.data.readers import Rejects, read_samples

    dst.mkdir(parents=True, exist_ok=True)
    records: list[sh.ShardRecord] = []
    seen: set[str] = set()
    index = 0
    while (record := sh.load_record(dst / sh.shard_name(index))) is not None:
        records.append(record)
        seen.update(_shard_keys(dst / sh.shard_name(index)))
        index += 1
    if records and records[-1].extra.get("last"):
        return records  # the source was read to its end
    rejects = Rejects()
    stream = read_samples(cfg.source, split=cfg.split, rejects=rejects, limit=cfg.limit)
    n_done = sum(r.kept for r in records)
    for _ in range(n_done):  # the samples already written: skip them (and their rejects)
        next(stream)
    rejects_seen = sum(r.n_in - r.kept for r in records)
    bar = sh._bar(progress, "read", None)
    start = time.perf_counter()
    buffer: list[sh.Raw] = []

    def flush(last: bool) -> None:
        nonlocal index, buffer, rejects_seen, start
        new = rejects.records[rejects_seen:]
        rejects_seen = len(rejects.records)
        record = sh.ShardRecord(shard=sh.shard_name(index), n_in=len(buffer) + len(new))
        record.kept = len(buffer)
        for r in new:
            record.reject(
                key=r["key"], stage="read", reason=r["reason"], score=None, detail=r["detail"]
            )
        if last:
            record.extra["last"] = 1
        sh.write_shard(dst / sh.shard_name(index), buffer)
        record.seconds = time.perf_counter() - start
        sh.save_record(dst / sh.shard_name(index), record)
        records.append(record)
        index, buffer, start = index + 1, [], time.perf_counter()

    with bar as advance:
        for n, sample in enumerate(stream, start=n_done):
            key = _KEY_CHARS.sub("_", str(sample["key"])) or f"sample{n:09d}"
            if key in seen:
                key = f"{key}_{n}"
            seen.add(key)
            buffer.append(_encode(sample, key))
            if len(buffer) == cfg.shard_size:
                flush(last=False)
                advance()
        flush(last=True)
    return records


# ---------------------------------------------------------------------------------------------
# stages


def _in_shards(src: Path) -> list[Path]:
    return sorted(src.glob("shard-*.tar"))


def _scan_and_plan(
    cfg: CurateConfig, stage: str, inputs: list[Path], work: Path, *, progress: bool
) -> float:
    """Per-shard score files, then the global plan; returns the seconds spent (this run or the
    run that made them)."""
    plan_path = work / "plan.npz"
    if plan_path.is_file():
        return Plan.load(plan_path).seconds
    tasks = [
        Task(stage=stage, src=str(p), dst=str(work / (p.stem + ".npz")), work=str(work), cfg=cfg)
        for p in inputs
    ]
    todo = [t for t in tasks if not Path(t.dst).is_file()]
    scan_seconds = sh.map_tasks(
        scan_shard,
        todo,
        workers=cfg.workers,
        engine=cfg.engine,
        label=f"{stage}: scan",
        progress=progress,
    )
    start = time.perf_counter()
    if stage == "filter":
        keys, sims = [], []
        for t in tasks:
            with np.load(t.dst, allow_pickle=False) as z:
                keys += [str(k) for k in z["keys"]]
                sims.append(z["sims"])
        plan = plan_filter(keys, np.concatenate(sims) if sims else np.zeros(0), cfg)
    else:
        sigs = Signatures.concat([Signatures.load(Path(t.dst)) for t in tasks])
        if stage == "dedup":
            plan = plan_dedup(sigs, cfg)
        else:
            plan = plan_contamination(sigs, eval_signatures(cfg), cfg)
            rows = [
                {"key": k, "reason": r, "score": float(s), "detail": d}
                for k, r, s, d in zip(
                    plan.keys, plan.reasons, plan.scores, plan.details, strict=True
                )
            ]
            with atomic_open(work.parent.parent / "contamination.jsonl", "w") as fh:
                fh.writelines(json.dumps(row) + "\n" for row in rows)
    plan.seconds = float(sum(scan_seconds)) + time.perf_counter() - start
    plan.save(plan_path)
    return plan.seconds


def run_stage(
    cfg: CurateConfig, stage: str, src: Path, dst: Path, work: Path, *, progress: bool
) -> tuple[list[sh.ShardRecord], float]:
    """One stage over every shard of `src` into `dst`; returns the shard records and the seconds
    of its global part (scans and plan)."""
    work.mkdir(parents=True, exist_ok=True)
    dst.mkdir(parents=True, exist_ok=True)
    inputs = _in_shards(src)
    if stage == "shard":
        return _run_shard_stage(cfg, inputs, dst, work, progress=progress)
    extra = 0.0
    if stage in ("dedup", "contamination") or (
        stage == "filter" and (cfg.filter.min_similarity is not None or cfg.filter.top_fraction > 0)
    ):
        extra = _scan_and_plan(cfg, stage, inputs, work, progress=progress)
    else:
        Plan(keys=[], reasons=[], scores=np.zeros(0), details=[]).save(work / "plan.npz")
    tasks = [
        Task(stage=stage, src=str(p), dst=str(dst / p.name), work=str(work), cfg=cfg)
        for p in inputs
    ]
    todo = [t for t in tasks if sh.load_record(Path(t.dst)) is None]
    sh.map_tasks(
        apply_shard, todo, workers=cfg.workers, engine=cfg.engine, label=stage, progress=progress
    )
    records = [sh.load_record(Path(t.dst)) for t in tasks]
    return [r for r in records if r is not None], extra


def _run_shard_stage(
    cfg: CurateConfig, inputs: list[Path], dst: Path, work: Path, *, progress: bool
) -> tuple[list[sh.ShardRecord], float]:
    counts = [sum(1 for _ in sh.read_shard(p)) for p in inputs]
    total, size = sum(counts), cfg.shard.shard_size
    perm_path = work / "perm.npy"
    if not perm_path.is_file():
        perm = np.random.default_rng(cfg.shard.seed).permutation(total)
        with atomic_open(perm_path, "wb") as fh:
            np.save(fh, perm)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
    scatters = [
        shuffle.ScatterTask(
            src=str(p),
            index=i,
            offset=offsets[i],
            perm=str(perm_path),
            size=size,
            pieces=str(work / "pieces"),
            record=str(work / (p.stem + ".done.json")),
        )
        for i, p in enumerate(inputs)
    ]
    todo = [t for t in scatters if not Path(t.record).is_file()]
    kw = {"workers": cfg.workers, "engine": cfg.engine, "progress": progress}
    sh.map_tasks(shuffle.scatter, todo, label="shard: scatter", **kw)
    n_out = -(-total // size)
    gathers = [
        shuffle.GatherTask(dest=d, pieces=str(work / "pieces"), dst=str(dst / sh.shard_name(d)))
        for d in range(n_out)
    ]
    todo_g = [g for g in gathers if not Path(g.dst).with_suffix(".entry.json").is_file()]
    sh.map_tasks(shuffle.gather, todo_g, label="shard: gather", **kw)
    entries = [json.loads(Path(g.dst).with_suffix(".entry.json").read_text()) for g in gathers]
    shuffle.write_manifest(dst, entries, shard_size=size, seed=cfg.shard.seed, shuffled=True)
    records = [sh.ShardRecord.from_json(json.loads(Path(t.record).read_text())) for t in scatters]
    return records, float(sum(e["seconds"] for e in entries))


# ---------------------------------------------------------------------------------------------
# the whole run


def _summary(records: list[sh.ShardRecord], extra_seconds: float) -> dict[str, Any]:
    dropped: Counter[str] = Counter()
    extra: Counter[str] = Counter()
    for r in records:
        dropped.update(r.dropped)
        extra.update({k: v for k, v in r.extra.items() if k != "last"})
    n_in = sum(r.n_in for r in records)
    seconds = sum(r.seconds for r in records) + extra_seconds
    return {
        "in": n_in,
        "kept": sum(r.kept for r in records),
        "dropped": dict(sorted(dropped.items())),
        "samples_per_s": n_in / seconds if seconds > 0 else None,
        "seconds": seconds,
        **({"extra": dict(extra)} if extra else {}),
    }


def check_counts(report: dict[str, Any]) -> None:
    """input = output + every drop, and each stage's input = the previous stage's output."""
    stages = list(report["stages"].values())
    for name, s in report["stages"].items():
        if s["in"] != s["kept"] + sum(s["dropped"].values()):
            raise DataError(f"report: stage {name} in={s['in']} != kept + dropped ({s})")
    for prev, cur in itertools.pairwise(stages):
        if cur["in"] != prev["kept"]:
            raise DataError(
                f"report: a stage read {cur['in']} samples, the one before kept {prev['kept']}"
            )
    drops = sum(sum(s["dropped"].values()) for s in stages)
    if report["input"] != report["output"] + drops:
        raise DataError(
            f"report: input {report['input']} != output {report['output']} + drops {drops}"
        )


def _check_same_run(cfg: CurateConfig, work: Path) -> None:
    """Resume only the run that made `work`: the same config, up to workers/engine/name."""
    fields = {k: v for k, v in to_dict(cfg).items() if k not in ("workers", "engine", "name")}
    path = work / "config.json"
    if path.is_file():
        before = json.loads(path.read_text())
        if before != json.loads(json.dumps(fields)):
            changed = sorted(
                k for k in fields if before.get(k) != json.loads(json.dumps(fields[k]))
            )
            raise PolysenseError(
                f"{work.parent} holds a run with a different config (changed: {changed}); "
                "resume it with the same settings, or use a new --out"
            )
    else:
        atomic_write_json(path, fields)


def run_curate(cfg: CurateConfig, *, progress: bool = False) -> dict[str, Any]:
    """Run the configured stages over `cfg.source` into `cfg.out`; returns the report."""
    check_config(cfg)
    out = Path(cfg.out)
    work = out / "work"
    _check_same_run(cfg, work)
    started = time.perf_counter()
    read_records = read_source(cfg, work / "00-read", progress=progress)
    summaries = {"read": _summary(read_records, 0.0)}
    src = work / "00-read"
    for n, stage in enumerate(cfg.stages, start=1):
        stage_work = work / f"{n:02d}-{stage}"
        dst = out if n == len(cfg.stages) else stage_work / "out"
        records, extra = run_stage(cfg, stage, src, dst, stage_work, progress=progress)
        summaries[stage] = _summary(records, extra)
        src = dst
    if cfg.stages[-1] != "shard":
        shuffle.write_manifest(out, shuffle.manifest_entries(out), shuffled=False)
    manifest = json.loads((out / "manifest.json").read_text())
    all_rejects = [rej for r in read_records for rej in r.rejects]
    for n, stage in enumerate(cfg.stages, start=1):
        if stage == "shard":
            continue
        dst = out if n == len(cfg.stages) else work / f"{n:02d}-{stage}" / "out"
        for p in sorted(dst.glob("shard-*.done.json")):
            all_rejects += json.loads(p.read_text())["rejects"]
    with atomic_open(out / "rejects.jsonl", "w") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in all_rejects)
    report = {
        "source": str(cfg.source),
        "out": str(out),
        "input": summaries["read"]["in"],
        "output": manifest["count"],
        "stages": summaries,
        "stage_order": list(summaries),  # the JSON file sorts keys; this is the run's order
        "rejects": len(all_rejects),
        "wall_seconds": time.perf_counter() - started,
        "config": to_dict(cfg),
    }
    check_counts(report)
    atomic_write_json(out / "report.json", report)
    return report
