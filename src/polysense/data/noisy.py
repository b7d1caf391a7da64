"""A noisy image-text corpus built from the world, with ground truth of every injected fault, to
measure the curation pipeline (docs/curation.md).

From the world's train split it takes scenes that are unique by their metadata (no earlier scene,
and no test scene, with the same objects within 2 px: the world itself holds such near-copies,
which would blur what was injected), then injects: shuffled captions (caption sets moved to
other images), near-duplicates (exact copies, JPEG re-encodes, brightness, noise, blur),
blocklisted words in captions, non-language captions, "unsafe" images (a black X drawn across:
a stand-in for content an image classifier should flag), and test-set leaks (test scenes, copied
or re-encoded). `truth.jsonl` says, per key, the kind and the original (``of``).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

from polysense.data.curate import shards as sh
from polysense.data.curate.stages import read_blocklist
from polysense.errors import PolysenseError
from polysense.fileio import atomic_open, atomic_write_json

PERTURBATIONS = ("copy", "jpeg", "brightness", "noise", "blur")
_GARBAGE = ("IMG_{n:04d}.JPG", "DSC{n:05d} ### 0{n}", "{n} {n} {n} -- ++ //", "x7_{n:06d}.png")


def perturb(im: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """A near-duplicate of `im`: one of PERTURBATIONS."""
    if kind == "copy":
        return im.copy()
    if kind == "jpeg":
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(rng.integers(75, 95)))
        with Image.open(io.BytesIO(buf.getvalue())) as out:
            return out.convert("RGB")
    if kind == "brightness":
        return ImageEnhance.Brightness(im).enhance(float(rng.choice([0.85, 0.9, 1.05])))
    if kind == "noise":
        pixels = np.asarray(im, dtype=np.int16) + rng.integers(-6, 7, (*im.size[::-1], 3))
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if kind == "blur":
        w, h = im.size
        small = im.resize((max(1, w * 3 // 4), max(1, h * 3 // 4)), Image.BILINEAR)
        return small.resize((w, h), Image.BILINEAR)
    raise PolysenseError(f"unknown perturbation {kind!r}; choose from {PERTURBATIONS}")


def mark_unsafe(im: Image.Image) -> Image.Image:
    """The stand-in for unsafe content: a 2 px black X from corner to corner."""
    im = im.copy()
    draw = ImageDraw.Draw(im)
    w, h = im.size
    draw.line([(0, 0), (w - 1, h - 1)], fill=(0, 0, 0), width=2)
    draw.line([(0, h - 1), (w - 1, 0)], fill=(0, 0, 0), width=2)
    return im


def probe_examples(world: str | Path, n: int = 1000) -> tuple[list[Image.Image], np.ndarray]:
    """Labelled images for the safety probe from the world's val split (disjoint from the
    corpus): every other one marked (label 1)."""
    from polysense.data.readers import read_samples

    samples = list(read_samples(world, split="val", limit=n))
    images = [mark_unsafe(s["image"]) if i % 2 else s["image"] for i, s in enumerate(samples)]
    return images, np.asarray([i % 2 for i in range(len(samples))], dtype=np.float32)


def _layout(sample: dict[str, Any]) -> tuple[tuple[str, ...], np.ndarray]:
    objs = sorted(sample.get("objects") or [], key=lambda o: (o["color"], o["shape"], o["size"]))
    kinds = tuple(f"{o['color']} {o['size']} {o['shape']}" for o in objs)
    return kinds, np.asarray([o["bbox"] for o in objs], dtype=np.int32)


class _LayoutIndex:
    """Scenes seen so far by object kinds; a scene matches one with the same kinds whose boxes
    are all within `tol` pixels."""

    def __init__(self, tol: int = 2) -> None:
        self.tol = tol
        self.groups: dict[tuple[str, ...], list[np.ndarray]] = {}

    def matches(self, sample: dict[str, Any]) -> bool:
        kinds, boxes = _layout(sample)
        return any(
            np.abs(other - boxes).max(initial=0) <= self.tol for other in self.groups.get(kinds, [])
        )

    def add(self, sample: dict[str, Any]) -> None:
        kinds, boxes = _layout(sample)
        self.groups.setdefault(kinds, []).append(boxes)


def _raw(key: str, image: Image.Image, sample: dict[str, Any], captions: list[str]) -> sh.Raw:
    raw: sh.Raw = {"__key__": key, "png": sh.png_bytes(image)}  # type: ignore[dict-item]
    meta = {"captions": captions}
    for name in ("objects", "label", "relations", "split"):
        if name in sample:
            meta[name] = sample[name]
    sh.set_meta(raw, meta)
    return raw


def build_noisy_corpus(
    world: str | Path,
    out: str | Path,
    *,
    n_base: int = 10_000,
    shuffled: float = 0.3,
    near_dups: float = 0.2,
    blocklisted: float = 0.03,
    garbage: float = 0.02,
    unsafe: float = 0.02,
    leaks: float = 0.03,
    seed: int = 0,
    shard_size: int = 1000,
    blocklist: str | Path = "",
) -> dict[str, Any]:
    """Write `out/shard-N.tar` + `truth.jsonl` + `noisy.json`; fractions are of `n_base`.

    Shuffled, blocklisted and garbage captions hit disjoint base samples; near-duplicates copy
    clean base samples (each source at most once), leaks copy distinct test scenes.
    Returns the summary written to noisy.json (counts per kind, natural near-copies skipped)."""
    from polysense.data.readers import read_samples

    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tests = list(read_samples(world, split="test"))
    index = _LayoutIndex()
    for s in tests:
        index.add(s)
    base: list[dict[str, Any]] = []
    skipped = 0
    for s in read_samples(world, split="train"):
        if index.matches(s):
            skipped += 1
            continue
        index.add(s)
        base.append(s)
        if len(base) == n_base:
            break
    if len(base) < n_base:
        raise PolysenseError(
            f"{world}: only {len(base)} metadata-unique train scenes, asked for n_base={n_base}"
        )
    n = len(base)
    counts = {
        k: round(f * n)
        for k, f in (
            ("shuffled", shuffled),
            ("blocklist", blocklisted),
            ("garbage", garbage),
            ("unsafe_image", unsafe),
            ("near_dup", near_dups),
            ("leak", leaks),
        )
    }
    if sum(counts.values()) - counts["leak"] > n:
        raise PolysenseError("the injected fractions of base samples add up to more than 1")
    order = rng.permutation(n)
    cut = np.cumsum([counts[k] for k in ("shuffled", "blocklist", "garbage", "unsafe_image")])
    shuf, block, junk, marked, clean = np.split(order, cut)
    captions = [list(s["text"]) for s in base]
    kind = ["clean"] * n
    # shuffled: a cyclic shift of caption sets over a random order has no fixed point
    for a, b in zip(shuf, np.roll(shuf, 1), strict=True):
        captions[a], kind[a] = list(base[b]["text"]), "shuffled"
    terms = read_blocklist(blocklist)
    for i in block:
        term = str(rng.choice(terms))
        captions[i] = [f"{c} {term}" if rng.random() < 0.5 else f"{term} {c}" for c in captions[i]]
        kind[i] = "blocklist"
    for j, i in enumerate(junk):
        captions[i] = [_GARBAGE[j % len(_GARBAGE)].format(n=int(rng.integers(10_000)))]
        kind[i] = "garbage"
    images = [s["image"] for s in base]
    for i in marked:
        images[i], kind[i] = mark_unsafe(images[i]), "unsafe_image"
    rows: list[tuple[sh.Raw, dict[str, Any]]] = []
    for i, s in enumerate(base):
        truth = {"kind": kind[i], "of": None, "source_key": s["key"]}
        rows.append((_raw("", images[i], s, captions[i]), truth))
    for j, i in enumerate(rng.choice(clean, counts["near_dup"], replace=False)):
        how = PERTURBATIONS[j % len(PERTURBATIONS)]
        image = perturb(base[i]["image"], how, rng)
        truth = {"kind": "near_dup", "of": int(i), "perturbation": how, "source_key": None}
        rows.append((_raw("", image, base[i], list(base[i]["text"])), truth))
    for j, t in enumerate(rng.choice(len(tests), counts["leak"], replace=False)):
        how = ("copy", "jpeg", "brightness")[j % 3]
        image = perturb(tests[t]["image"], how, rng)
        truth = {"kind": "leak", "of": None, "perturbation": how, "source_key": tests[t]["key"]}
        rows.append((_raw("", image, tests[t], list(tests[t]["text"])), truth))
    # spread everything over the corpus; keys are assigned in the final order
    position = rng.permutation(len(rows))
    keys = [""] * len(rows)
    for row, p in enumerate(position):
        keys[row] = f"noisy-{p:08d}"
    final: list[tuple[sh.Raw, dict[str, Any]] | None] = [None] * len(rows)
    for row, p in enumerate(position):
        raw, truth = rows[row]
        raw["__key__"] = keys[row]  # type: ignore[assignment]
        truth = {"key": keys[row], **truth}
        if truth["of"] is not None:
            truth["of"] = keys[truth["of"]]  # base rows come first: row index == base index
        final[p] = (raw, truth)
    for start in range(0, len(final), shard_size):
        part = final[start : start + shard_size]
        sh.write_shard(out / sh.shard_name(start // shard_size), (r for r, _ in part))  # type: ignore[misc]
    with atomic_open(out / "truth.jsonl", "w") as fh:
        fh.writelines(json.dumps(t) + "\n" for _, t in final)  # type: ignore[misc]
    summary = {
        "world": str(world),
        "n_base": n,
        "n_total": len(final),
        "natural_near_copies_skipped": skipped,
        "kinds": dict(Counter(t["kind"] for _, t in final)),  # type: ignore[misc]
        "seed": seed,
    }
    atomic_write_json(out / "noisy.json", summary)
    return summary


def read_truth(corpus: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(corpus) / "truth.jsonl").read_text().splitlines()]


def score_dedup(truth: Sequence[dict[str, Any]], dropped: set[str]) -> dict[str, float]:
    """Recall of injected duplicates and false-positive rate of a dedup's dropped keys.

    A group is an original with its injected copies; it needs len(group) - 1 drops (which member
    survives does not matter). Recall = drops inside groups (capped per group) / drops needed;
    false positives = the other drops / the samples that should survive."""
    groups: dict[str, list[str]] = {}
    for t in truth:
        if t["kind"] == "near_dup":
            groups.setdefault(t["of"], [t["of"]]).append(t["key"])
    in_group = {k for g in groups.values() for k in g}
    needed = sum(len(g) - 1 for g in groups.values())
    found = sum(min(sum(k in dropped for k in g), len(g) - 1) for g in groups.values())
    excess = sum(max(0, sum(k in dropped for k in g) - (len(g) - 1)) for g in groups.values())
    outside = len(dropped - in_group)
    survivors = len(truth) - needed
    return {
        "recall": found / needed if needed else 1.0,
        "false_positive_rate": (outside + excess) / survivors if survivors else 0.0,
        "injected": needed,
        "found": found,
        "false_positives": outside + excess,
    }


def score_leaks(
    truth: Sequence[dict[str, Any]], flagged: set[str], kind: str = "leak"
) -> dict[str, float]:
    """Recall of the injected `kind` (test-set leaks by default) among the flagged keys, and
    the false-positive rate among the other samples."""
    leaks = {t["key"] for t in truth if t["kind"] == kind}
    others = len(truth) - len(leaks)
    return {
        "recall": len(flagged & leaks) / len(leaks) if leaks else 1.0,
        "false_positive_rate": len(flagged - leaks) / others if others else 0.0,
        "injected": len(leaks),
        "found": len(flagged & leaks),
        "false_positives": len(flagged - leaks),
    }
