"""The curation stages as per-shard functions.

Every stage maps input shards to output shards through `filter_shard`; stages that need to see
the whole corpus (dedup, contamination, a top-fraction filter) first write a per-shard score file
(``work/NN-stage/shard-N.npz``), then a global plan (``plan.npz``) that the per-shard pass reads.
Each function takes one picklable `Task`, so a process pool or Ray Data can map it.
"""

from __future__ import annotations

import importlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from polysense.data.curate import shards as sh
from polysense.data.curate.config import CurateConfig
from polysense.data.curate.signatures import (
    Signatures,
    compute_signatures,
    cosine_pairs,
    hamming_pairs,
    thumb_corr,
)
from polysense.errors import PolysenseError

DEFAULT_BLOCKLIST = Path(__file__).resolve().parent / "blocklist.txt"
Verdict = tuple[str, float | None, str] | None


@dataclass(frozen=True)
class Task:
    stage: str
    src: str  # input shard
    dst: str  # output shard (apply) or score file (scan)
    work: str  # the stage's work directory (plan.npz)
    cfg: CurateConfig


# ---------------------------------------------------------------------------------------------
# scan: per-shard signatures / scores


def _decoded(raws: list[sh.Raw]) -> tuple[list[str], list[Any], list[list[str]]]:
    keys = [str(r["__key__"]) for r in raws]
    images = [sh.image(r) for r in raws]
    texts = [sh.captions(sh.meta(r)) for r in raws]
    return keys, images, texts


def scan_shard(task: Task) -> float:
    """Write the shard's signatures (dedup, contamination) or similarity scores (filter)."""
    start = time.perf_counter()
    raws = list(sh.read_shard(task.src))
    keys, images, texts = _decoded(raws)
    cfg = task.cfg
    if task.stage == "filter":
        from polysense.data.curate.embed import Embedder

        embed = Embedder.of(cfg)
        sims = np.full(len(raws), np.nan, dtype=np.float32)
        texts = [t[: cfg.filter.max_captions] for t in texts]
        rows = [i for i in range(len(raws)) if images[i] is not None and texts[i]]
        if rows:
            img = embed.images([images[i] for i in rows])  # (M, D)
            flat = [c for i in rows for c in texts[i]]
            txt = embed.texts(flat)  # (sum captions, D)
            owner = np.repeat(np.arange(len(rows)), [len(texts[i]) for i in rows])
            cos = (img[owner] * txt).sum(1)  # (sum captions,)
            # a sample's score: the mean over its captions (a shuffled caption set scores low)
            means = np.bincount(owner, weights=cos) / np.bincount(owner)
            sims[rows] = means
        with sh.atomic_open(task.dst, "wb") as fh:
            np.savez(fh, keys=np.asarray(keys, dtype=str), sims=sims)
    else:
        threshold = (
            cfg.dedup.embedding_threshold
            if task.stage == "dedup"
            else cfg.contamination.embedding_threshold
        )
        sigs = compute_signatures(keys, images, texts, embed=_embedder(cfg, threshold > 0))
        sigs.save(Path(task.dst))
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# global plans: which keys to drop, why, with what score


@dataclass
class Plan:
    """Keys to drop with (reason, score, detail); saved as plan.npz in the stage's work dir."""

    keys: list[str]
    reasons: list[str]
    scores: np.ndarray
    details: list[str]
    seconds: float = 0.0
    threshold: float = float("nan")

    def save(self, path: Path) -> None:
        with sh.atomic_open(path, "wb") as fh:
            np.savez(
                fh,
                keys=np.asarray(self.keys, dtype=str),
                reasons=np.asarray(self.reasons, dtype=str),
                scores=self.scores.astype(np.float32),
                details=np.asarray(self.details, dtype=str),
                seconds=np.float64(self.seconds),
                threshold=np.float64(self.threshold),
            )

    @classmethod
    def load(cls, path: Path) -> Plan:
        with np.load(path, allow_pickle=False) as z:
            return cls(
                keys=[str(k) for k in z["keys"]],
                reasons=[str(r) for r in z["reasons"]],
                scores=z["scores"],
                details=[str(d) for d in z["details"]],
                seconds=float(z["seconds"]),
                threshold=float(z["threshold"]),
            )


@cache
def _plan_lookup(path: str) -> dict[str, tuple[str, float, str]]:
    plan = Plan.load(Path(path))
    return {
        k: (r, float(s), d)
        for k, r, s, d in zip(plan.keys, plan.reasons, plan.scores, plan.details, strict=True)
    }


def _verified(sigs_a: Signatures, sigs_b: Signatures, qi, di, verify: float):
    """Keep candidate pairs whose thumbnails correlate >= verify (both must have images)."""
    if len(qi) == 0:
        return np.zeros(0, bool)
    ok = sigs_a.has_image[qi] & sigs_b.has_image[di]
    if verify > 0:
        ok &= thumb_corr(sigs_a.thumb[qi], sigs_b.thumb[di]) >= verify
    return ok


def plan_dedup(sigs: Signatures, cfg: CurateConfig) -> Plan:
    """Clusters of duplicates (connected components over exact, perceptual and embedding
    edges); the first sample of each cluster in input order is kept, the others dropped."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    dc = cfg.dedup
    n = len(sigs)
    edges: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []  # (i, j, score, kind)
    if dc.exact:
        combined = sigs.image_hash * np.int64(1_000_003) + sigs.text_hash  # wraps, still a hash
        order = np.argsort(combined, kind="stable")
        same = combined[order[1:]] == combined[order[:-1]]
        i, j = order[:-1][same], order[1:][same]
        edges.append((i, j, np.ones(len(i), np.float32), 0))
    if dc.phash_radius >= 0:
        qi, di, dist = hamming_pairs(sigs.phash, sigs.phash, dc.phash_radius)
        keep = (qi < di) & _verified(sigs, sigs, qi, di, dc.verify_corr)
        edges.append((qi[keep], di[keep], dist[keep], 1))
    if dc.embedding_threshold > 0:
        assert sigs.emb is not None
        qi, di, cos = cosine_pairs(sigs.emb, sigs.emb, dc.embedding_threshold)
        keep = (qi < di) & _verified(sigs, sigs, qi, di, dc.verify_corr)
        edges.append((qi[keep], di[keep], cos[keep], 2))
    kinds = ("exact", "perceptual", "embedding")
    if not edges or sum(len(e[0]) for e in edges) == 0:
        return Plan(keys=[], reasons=[], scores=np.zeros(0, np.float32), details=[])
    i = np.concatenate([e[0] for e in edges])
    j = np.concatenate([e[1] for e in edges])
    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    first = np.full(label.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, label, np.arange(n))
    # Each dropped sample is explained by its strongest edge: exact, then perceptual, embedding.
    reason = np.full(n, -1)
    score = np.zeros(n, np.float32)
    for a, b, s, kind in reversed(edges):  # later (weaker) kinds first, overwritten by stronger
        for node in (a, b):
            reason[node] = kind
            score[node] = s
    drop = np.flatnonzero((first[label] != np.arange(n)) & (reason >= 0))
    return Plan(
        keys=[sigs.keys[k] for k in drop],
        reasons=[kinds[reason[k]] for k in drop],
        scores=score[drop],
        details=[f"duplicate of {sigs.keys[first[label[k]]]}" for k in drop],
    )


def _embedder(cfg: CurateConfig, wanted: bool):
    """The config's embedder when embeddings are `wanted` (and a checkpoint is set), else None."""
    from polysense.data.curate.embed import Embedder

    return Embedder.of(cfg) if wanted and cfg.ckpt else None


def eval_signatures(cfg: CurateConfig) -> Signatures:
    """Signatures of the evaluation data the training set is checked against."""
    from polysense.data.readers import detect_format, read_samples

    cc = cfg.contamination
    fmt = detect_format(cc.eval_source)
    splits: tuple[str | None, ...] = cc.eval_splits if fmt in ("world", "wds") else (None,)
    parts = []
    for split in splits or (None,):
        samples = list(read_samples(cc.eval_source, split=split))
        parts.append(
            compute_signatures(
                [f"{split}:{s['key']}" if split else s["key"] for s in samples],
                [s.get("image") for s in samples],
                [s.get("text") or [] for s in samples],
                embed=_embedder(cfg, cc.embedding_threshold > 0),
            )
        )
    return Signatures.concat(parts)


def plan_contamination(train: Signatures, evals: Signatures, cfg: CurateConfig) -> Plan:
    """Training samples whose image (exact pixels, pHash + thumbnail, or embedding) matches an
    evaluation sample; the caption does not matter: a leaked test image is a leak."""
    cc = cfg.contamination
    best: dict[int, tuple[int, float, str]] = {}  # train row -> (kind, score, eval key)

    def add(rows: np.ndarray, cols: np.ndarray, scores: np.ndarray, kind: int) -> None:
        for r, c, s in zip(rows.tolist(), cols.tolist(), scores.tolist(), strict=True):
            if r not in best or kind < best[r][0]:
                best[r] = (kind, s, evals.keys[c])

    lookup: dict[int, int] = {}
    for c in np.flatnonzero(evals.has_image):
        lookup.setdefault(int(evals.image_hash[c]), int(c))
    rows = [r for r in np.flatnonzero(train.has_image) if int(train.image_hash[r]) in lookup]
    cols = [lookup[int(train.image_hash[r])] for r in rows]
    add(np.asarray(rows, np.int64), np.asarray(cols, np.int64), np.ones(len(rows)), 0)
    if cc.phash_radius >= 0 and len(evals):
        qi, di, dist = hamming_pairs(train.phash, evals.phash, cc.phash_radius)
        keep = _verified(train, evals, qi, di, cc.verify_corr)
        add(qi[keep], di[keep], dist[keep], 1)
    if cc.embedding_threshold > 0 and len(evals):
        assert train.emb is not None and evals.emb is not None
        qi, di, cos = cosine_pairs(train.emb, evals.emb, cc.embedding_threshold)
        keep = _verified(train, evals, qi, di, cc.verify_corr)
        add(qi[keep], di[keep], cos[keep], 2)
    kinds = ("leak_exact", "leak_perceptual", "leak_embedding")
    rows_sorted = sorted(best)
    return Plan(
        keys=[train.keys[r] for r in rows_sorted],
        reasons=[kinds[best[r][0]] for r in rows_sorted],
        scores=np.asarray([best[r][1] for r in rows_sorted], np.float32),
        details=[f"matches eval sample {best[r][2]}" for r in rows_sorted],
    )


def plan_filter(keys: list[str], sims: np.ndarray, cfg: CurateConfig) -> Plan:
    """Samples below the similarity threshold (fixed, or the top fraction's cut-off)."""
    fc = cfg.filter
    threshold = fc.min_similarity if fc.min_similarity is not None else -np.inf
    scored = sims[np.isfinite(sims)]
    if fc.top_fraction > 0 and len(scored):
        threshold = max(threshold, float(np.quantile(scored, 1 - fc.top_fraction)))
    low = np.flatnonzero(np.isfinite(sims) & (sims < threshold))
    return Plan(
        keys=[keys[k] for k in low],
        reasons=["low_similarity"] * len(low),
        scores=sims[low],
        details=[f"image-caption cosine < {threshold:.3f}"] * len(low),
        threshold=float(threshold),
    )


# ---------------------------------------------------------------------------------------------
# apply: one pass over a shard that keeps, edits or rejects each sample


_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)


def caption_problem(caption: str, cfg: CurateConfig) -> str | None:
    """The heuristic a caption fails (length, language-ish), or None."""
    fc = cfg.filter
    words = caption.split()
    if len(words) < fc.min_words:
        return "caption_too_short"
    if len(words) > fc.max_words:
        return "caption_too_long"
    chars = "".join(words)
    letters = sum(len(w) for w in _WORD.findall(caption))
    if letters / max(len(chars), 1) < fc.min_alpha:
        return "caption_not_language"
    return None


def _apply_filter(task: Task, items: list[sh.Raw]) -> list[Verdict]:
    plan = _plan_lookup(str(Path(task.work) / "plan.npz"))
    fc = task.cfg.filter
    out: list[Verdict] = []
    for raw in items:
        meta = sh.meta(raw)
        caps = sh.captions(meta)
        im = sh.image(raw)
        if im is not None:
            w, h = im.size
            if min(w, h) < fc.min_image_side:
                out.append(("image_too_small", float(min(w, h)), f"{w}x{h}"))
                continue
            if max(w, h) / min(w, h) > fc.max_aspect:
                out.append(("image_aspect", max(w, h) / min(w, h), f"{w}x{h}"))
                continue
        problems = [caption_problem(c, task.cfg) for c in caps]
        good = [c for c, p in zip(caps, problems, strict=True) if p is None]
        if not good:
            reason = problems[0] if problems else "caption_too_short"
            out.append((reason, None, caps[0][:80] if caps else ""))
            continue
        if key_plan := plan.get(str(raw["__key__"])):
            out.append(key_plan)
            continue
        if len(good) < len(caps):  # drop the failing captions, keep the sample
            meta[sh.caption_field(meta)] = good
            sh.set_meta(raw, meta)
        out.append(None)
    return out


def read_blocklist(path: str | Path) -> list[str]:
    """Lower-case terms of a blocklist file: one per line, '#' starts a comment."""
    path = Path(path) if path else DEFAULT_BLOCKLIST
    if not Path(path).is_file():
        raise PolysenseError(f"{path}: blocklist file not found; set safety.blocklist")
    terms = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        term = line.split("#", 1)[0].strip().lower()
        if term:
            terms.append(term)
    return terms


@cache
def _blocklist_re(path: str) -> re.Pattern[str] | None:
    terms = read_blocklist(path)
    if not terms:
        return None
    alternatives = "|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


@cache
def _image_scorer(probe: str, classifier: str) -> Callable[..., np.ndarray] | None:
    if classifier:
        module, _, attr = classifier.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise PolysenseError(
                f"safety.classifier={classifier!r}: cannot import it ({exc}); "
                "give 'module:function'"
            ) from exc
    if probe:
        from polysense.data.curate.probe import EmbeddingProbe

        return EmbeddingProbe.load(probe)
    return None


def _apply_safety(task: Task, items: list[sh.Raw]) -> list[Verdict]:
    sc = task.cfg.safety
    pattern = _blocklist_re(sc.blocklist)
    out: list[Verdict] = [None] * len(items)
    for n, raw in enumerate(items):
        meta = sh.meta(raw)
        texts = [*sh.captions(meta), str(meta.get("caption_synthetic") or "")]
        hit = next((m for t in texts if pattern and (m := pattern.search(t))), None)
        if hit is not None:
            out[n] = ("blocklist", None, f"term {hit.group(0).lower()!r}")
    scorer = _image_scorer(sc.probe, sc.classifier)
    rows = [n for n in range(len(items)) if out[n] is None]
    if scorer is not None and rows:
        images = [sh.image(items[n]) for n in rows]
        rows = [n for n, im in zip(rows, images, strict=True) if im is not None]
        images = [im for im in images if im is not None]
        emb = None
        if task.cfg.ckpt:
            from polysense.data.curate.embed import Embedder

            emb = Embedder.of(task.cfg).images(images)
        scores = np.asarray(scorer(images, emb), dtype=np.float32)
        for n, s in zip(rows, scores.tolist(), strict=True):
            if s >= sc.threshold:
                out[n] = ("unsafe_image", float(s), f"classifier score >= {sc.threshold}")
    return out


def _apply_recaption(task: Task, items: list[sh.Raw]) -> list[Verdict]:
    from polysense.data.curate.captioners import get_captioner

    rc = task.cfg.recaption
    captioner = get_captioner(rc.captioner, rc.prompt)
    metas = [sh.meta(r) for r in items]
    synthetic = captioner([sh.image(r) for r in items], metas)
    for raw, meta, caption in zip(items, metas, synthetic, strict=True):
        if not caption:
            continue
        meta["caption_synthetic"] = caption
        if rc.mix_ratio > 0 and sh.stable_fraction(str(raw["__key__"]), rc.seed) < rc.mix_ratio:
            field = sh.caption_field(meta)
            meta["captions_original"] = sh.captions(meta)
            meta[field] = [caption]
        sh.set_meta(raw, meta)
    return [None] * len(items)


def _apply_plan(task: Task, items: list[sh.Raw]) -> list[Verdict]:
    plan = _plan_lookup(str(Path(task.work) / "plan.npz"))
    verdicts = [plan.get(str(raw["__key__"])) for raw in items]
    if task.stage == "contamination" and not task.cfg.contamination.remove:
        return [None] * len(items)  # reported in contamination.jsonl, kept
    return verdicts


_APPLY: dict[str, Callable[[Task, list[sh.Raw]], list[Verdict]]] = {
    "dedup": _apply_plan,
    "filter": _apply_filter,
    "safety": _apply_safety,
    "recaption": _apply_recaption,
    "contamination": _apply_plan,
}


def apply_shard(task: Task) -> dict[str, Any]:
    """Run one stage over one shard; writes the output shard and its done record."""
    record = sh.filter_shard(
        Path(task.src),
        Path(task.dst),
        stage=task.stage,
        decide=lambda items: _APPLY[task.stage](task, items),
    )
    sh.save_record(Path(task.dst), record)
    return record.to_json()
