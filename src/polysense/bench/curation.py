"""`polysense bench curation`: does curation pay? Build a noisy corpus from the world, curate it,
train clip-tiny on raw and on curated data for the same budget (steps, and a wall-clock cap), and
compare zero-shot top-1 and text-to-image R@5 on the world's clean test split.

Also reports every stage's counts and throughput, and, against the corpus's ground truth, the
recall and false-positive rate of dedup and of the contamination check.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from polysense.bench.report import write_report
from polysense.data.curate import (
    ContaminationConfig,
    CurateConfig,
    FilterConfig,
    RecaptionConfig,
    SafetyConfig,
    run_curate,
    train_probe,
)
from polysense.data.noisy import (
    build_noisy_corpus,
    probe_examples,
    read_truth,
    score_dedup,
    score_leaks,
)

# Equal budget = equal steps; the time cap only guards the 15-minute total on a loaded machine
# (a run it stops is marked stopped_early, and equal_steps turns false).
DEFAULTS = {"n_base": 8000, "steps": 600, "max_minutes": 5.0}


def curate_config(
    corpus: Path,
    out: Path,
    *,
    ckpt: str,
    world: str,
    workers: int,
    probe: str = "",
    probe_threshold: float = 0.5,
) -> CurateConfig:
    """The bench's curation: every stage, the image-caption filter at cosine 0.8 with the given
    checkpoint (trained on clean data: the role a public CLIP plays for web data), the safety
    probe when one is given."""
    return CurateConfig(
        name="bench-curation",
        source=str(corpus),
        out=str(out),
        ckpt=ckpt,
        workers=workers,
        filter=FilterConfig(min_similarity=0.8),
        safety=SafetyConfig(probe=probe, threshold=probe_threshold),
        recaption=RecaptionConfig(captioner="template", mix_ratio=0.3),
        contamination=ContaminationConfig(eval_source=world, eval_splits=("test", "test_novel")),
    )


def _train_eval(data: Path, out: Path, *, world: str, steps: int, max_minutes: float) -> dict:
    from polysense.config import apply_overrides
    from polysense.eval.suite import evaluate
    from polysense.models.checkpoint import load_model
    from polysense.presets import get_preset
    from polysense.train.loop import train

    cfg = apply_overrides(
        get_preset("clip-tiny"), [f"train.steps={steps}", f"train.max_minutes={max_minutes}"]
    )
    result = train(cfg, data=data, out=out, progress=False)
    metrics = evaluate(load_model(out), world, split="test")
    return {
        "zeroshot_top1": metrics["zeroshot_top1"],
        "zeroshot_top5": metrics["zeroshot_top5"],
        "t2i_r5": metrics["t2i_r5"],
        "i2t_r5": metrics["i2t_r5"],
        "steps": result.steps,
        "train_seconds": result.seconds,
        "train_samples_per_s": result.train_samples_per_s,
        "stopped_early": result.stopped_early,
        "final_loss": result.final_loss,
    }


def run_curation_bench(
    out: str | Path,
    *,
    world: str = "runs/world",
    ckpt: str = "runs/quickstart/ckpt",
    n_base: int = DEFAULTS["n_base"],
    steps: int = DEFAULTS["steps"],
    max_minutes: float = DEFAULTS["max_minutes"],
    workers: int = 1,
) -> dict[str, Any]:
    """Run the whole comparison; writes OUT/curation.json/.md/.png and returns the results."""
    out = Path(out)
    started = time.perf_counter()
    corpus = out / "noisy"
    t0 = time.perf_counter()
    summary = build_noisy_corpus(world, corpus, n_base=n_base)
    corpus_seconds = time.perf_counter() - t0
    from polysense.data.curate.embed import Embedder

    images, labels = probe_examples(world)  # val split: disjoint from the corpus
    half = len(images) // 2
    embeddings = Embedder(ckpt=ckpt).images(images)
    probe = train_probe(embeddings[:half], labels[:half])
    # the threshold: at most 1 % of the clean training images flagged
    train_scores = probe(images[:half], embeddings[:half])
    threshold = float(np.quantile(train_scores[labels[:half] == 0], 0.99)) + 1e-6
    held_out = probe(images[half:], embeddings[half:]) >= threshold
    probe_quality = {
        "threshold": threshold,
        "recall": float(held_out[labels[half:] == 1].mean()),
        "false_positive_rate": float(held_out[labels[half:] == 0].mean()),
        "n_train": half,
        "n_test": len(images) - half,
    }
    probe.save(out / "probe.npz")
    cfg = curate_config(
        corpus,
        out / "curated",
        ckpt=ckpt,
        world=world,
        workers=workers,
        probe=str(out / "probe.npz"),
        probe_threshold=threshold,
    )
    report = run_curate(cfg)
    import resource

    curate_peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    truth = read_truth(corpus)
    rejects = [json.loads(x) for x in (out / "curated" / "rejects.jsonl").read_text().splitlines()]
    by_stage: dict[str, set[str]] = {}
    by_reason: dict[str, set[str]] = {}
    for r in rejects:
        by_stage.setdefault(r["stage"], set()).add(r["key"])
        by_reason.setdefault(r["reason"], set()).add(r["key"])
    # contamination is scored on the samples that reached it (earlier stages may drop leaks)
    reached = set(by_stage.get("contamination", set()))
    dropped_before = set().union(*(v for k, v in by_stage.items() if k != "contamination"))
    leak_truth = [t for t in truth if t["key"] not in dropped_before]
    safety_truth = [
        t
        for t in truth
        if t["key"] not in by_stage.get("dedup", set()) | by_stage.get("filter", set())
    ]
    quality = {
        "dedup": score_dedup(truth, by_stage.get("dedup", set())),
        "contamination": score_leaks(leak_truth, reached),
        "safety_blocklist": score_leaks(
            safety_truth, by_reason.get("blocklist", set()), "blocklist"
        ),
        "safety_probe": score_leaks(
            safety_truth, by_reason.get("unsafe_image", set()), "unsafe_image"
        ),
        "probe_held_out": probe_quality,
    }
    runs = {}
    for name, data in (("raw", corpus), ("curated", out / "curated")):
        runs[name] = _train_eval(
            data, out / f"train-{name}", world=world, steps=steps, max_minutes=max_minutes
        )
        runs[name]["n_train"] = report["input"] if name == "raw" else report["output"]
    stages = {
        name: {k: s[k] for k in ("in", "kept", "dropped", "samples_per_s")}
        for name, s in report["stages"].items()
    }
    results = {
        **runs,
        "stages": stages,
        "stage_order": list(stages),
        "quality": quality,
        "corpus": summary | {"build_seconds": corpus_seconds},
        "budget": {"steps": steps, "max_minutes": max_minutes, "batch_size": 128},
        "equal_steps": runs["raw"]["steps"] == runs["curated"]["steps"],
        "curate_wall_seconds": report["wall_seconds"],
        "curate_peak_rss_gib": curate_peak_gib,
        "total_seconds": time.perf_counter() - started,
    }
    table = [
        {
            "data": name,
            "n_train": runs[name]["n_train"],
            "steps": runs[name]["steps"],
            "zeroshot_top1": runs[name]["zeroshot_top1"],
            "t2i_r5": runs[name]["t2i_r5"],
            "i2t_r5": runs[name]["i2t_r5"],
        }
        for name in ("raw", "curated")
    ]
    table += [
        {
            "data": f"stage {name}",
            "n_train": s["kept"],
            "steps": None,
            "zeroshot_top1": None,
            "t2i_r5": None,
            "i2t_r5": None,
            "in": s["in"],
            "dropped": ", ".join(f"{k} {v}" for k, v in s["dropped"].items()),
            "samples_per_s": s["samples_per_s"],
        }
        for name, s in stages.items()
    ]

    def plot(ax: Any) -> None:
        names = ["zeroshot_top1", "t2i_r5"]
        xs = range(len(names))
        for k, name in enumerate(("raw", "curated")):
            ax.bar([x + 0.38 * k for x in xs], [runs[name][m] for m in names], 0.36, label=name)
        ax.set_xticks([x + 0.19 for x in xs], names)
        ax.set_ylim(0, 1)
        ax.set_title(f"clip-tiny, {steps} steps: raw vs curated noisy corpus (world test)")
        ax.legend()

    d, c = quality["dedup"], quality["contamination"]
    notes = (
        f"Noisy corpus: {summary['n_total']} samples from {summary['n_base']} world scenes "
        f"({summary['kinds']}). Same budget for both: {steps} steps of 128, capped at "
        f"{max_minutes} min. Dedup recall {d['recall']:.3f}, false positives "
        f"{d['false_positive_rate']:.4f}; contamination recall {c['recall']:.3f}, false "
        f"positives {c['false_positive_rate']:.4f}."
    )
    write_report(out, "curation", results, table, plot, title="Curation bench", notes=notes)
    return results


def embedding_dedup_scale(
    n: int = 1_000_000,
    dim: int = 256,
    *,
    threshold: float = 0.95,
    n_pairs: int = 10_000,
    nprobe: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """Embedding dedup of `n` unit vectors with `n_pairs` injected near-duplicates (cosine about
    0.97-0.99); random vectors in 256-d are near-orthogonal, so the injected pairs are the truth.
    Reports seconds, peak resident memory of this process, pairs found and recall."""
    import resource

    import numpy as np

    from polysense.data.curate.signatures import cosine_pairs

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.choice(n // 2, n_pairs, replace=False)
    dst = n // 2 + rng.choice(n - n // 2, n_pairs, replace=False)
    noise = rng.standard_normal((n_pairs, dim), dtype=np.float32)
    x[dst] = x[src] + 0.15 * noise / np.linalg.norm(noise, axis=1, keepdims=True)
    x[dst] /= np.linalg.norm(x[dst], axis=1, keepdims=True)
    start = time.perf_counter()
    q, d, _ = cosine_pairs(x, x, threshold, nprobe=nprobe)
    seconds = time.perf_counter() - start
    found = {(int(a), int(b)) for a, b in zip(q, d, strict=True) if a < b}
    truth = {(int(min(a, b)), int(max(a, b))) for a, b in zip(src, dst, strict=True)}
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "n": n,
        "dim": dim,
        "threshold": threshold,
        "index": "flat" if n <= 200_000 else f"IVFFlat nlist={int(4 * np.sqrt(n))} nprobe={nprobe}",
        "seconds": seconds,
        "peak_rss_gib": peak_kib / 2**20,
        "injected_pairs": n_pairs,
        "pairs_found": len(found),
        "recall": len(found & truth) / n_pairs,
        "extra_pairs": len(found - truth),
    }


if __name__ == "__main__":  # python -m polysense.bench.curation N OUT.json
    import sys

    from polysense.fileio import atomic_write_json

    result = embedding_dedup_scale(int(sys.argv[1]))
    print(json.dumps(result, indent=2))
    if len(sys.argv) > 2:
        atomic_write_json(sys.argv[2], result)
