"""The evaluation a trained dual encoder gets after training and from `polysense eval`.

On the world: zero-shot classification of single-object scenes over the 24 colour x shape
classes, and image<->text Recall@K on multi-object scenes (whose captions carry counts and
relations), per split. On other data: retrieval over all samples, and zero-shot when samples
carry a `label` (an image folder's class).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from polysense.data.readers import detect_format, read_samples
from polysense.errors import DataError
from polysense.eval.retrieval import retrieval_eval
from polysense.eval.zeroshot import zeroshot_eval

TASKS = ("zeroshot", "retrieval")


def _classnames(data: str | Path, samples: list[dict[str, Any]]) -> list[str]:
    if detect_format(data) == "world":
        from polysense.data.world import load_manifest

        return list(load_manifest(data)["classes"])
    return sorted({s["label"] for s in samples if isinstance(s.get("label"), str)})


def evaluate(
    model: Any,
    data: str | Path,
    *,
    split: str | None,
    tasks: tuple[str, ...] = TASKS,
    batch_size: int = 256,
    limit: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Metrics (DESIGN.md keys) of `model` on one split of `data`."""
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise DataError(f"unknown evaluation task(s) {sorted(unknown)}; choose from {list(TASKS)}")
    samples = list(read_samples(data, split=split, limit=limit))
    if not samples:
        raise DataError(f"{data}: no samples to evaluate" + (f" in split {split}" if split else ""))
    metrics: dict[str, Any] = {}
    if "zeroshot" in tasks:
        classnames = _classnames(data, samples)
        labelled = [s for s in samples if s.get("label") in set(classnames)]
        if labelled:
            zs = zeroshot_eval(
                model, labelled, classnames=classnames, batch_size=batch_size, progress=progress
            )
            metrics |= {k: zs[k] for k in ("zeroshot_top1", "zeroshot_top5")}
            metrics["zeroshot_n_samples"] = zs["n_samples"]
            metrics["zeroshot_per_class"] = zs["per_class"]
    if "retrieval" in tasks:
        multi = [s for s in samples if len(s.get("objects") or []) >= 2]
        pool = multi if len(multi) >= 10 else samples
        rt = retrieval_eval(model, pool, batch_size=batch_size, progress=progress)
        metrics |= {k: v for k, v in rt.items() if k.startswith(("i2t", "t2i"))}
        metrics["retrieval_n_samples"] = rt["n_samples"]
        metrics["retrieval_n_captions"] = rt["n_captions"]
    metrics["n_samples"] = len(samples)
    return metrics


def evaluate_splits(
    model: Any, data: str | Path, *, splits: tuple[str, ...], **kwargs: Any
) -> dict[str, Any]:
    """The first split's metrics at the top level, every further split nested under its name
    (e.g. `{"zeroshot_top1": .., "test_novel": {"zeroshot_top1": ..}}`)."""
    first, *rest = splits
    result = evaluate(model, data, split=first, **kwargs)
    result["split"] = first
    for split in rest:
        result[split] = evaluate(model, data, split=split, **kwargs)
    return result


def val_zeroshot(data: str | Path) -> Callable[[Any], dict[str, float]] | None:
    """For a world: a probe that scores zero-shot top-1 on its val split's single-object scenes,
    for the trainer to call every `train.eval_every` steps (None for other data)."""
    if detect_format(data) != "world":
        return None
    from polysense.data.world import load_manifest

    classes = list(load_manifest(data)["classes"])
    val = [s for s in read_samples(data, split="val") if s.get("label") in set(classes)]

    def probe(model: Any) -> dict[str, float]:
        return {"val_zeroshot_top1": zeroshot_eval(model, val, classnames=classes)["zeroshot_top1"]}

    return probe
