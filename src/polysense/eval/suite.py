"""The evaluation a trained dual encoder gets after training and from `polysense eval`.

On the world: zero-shot classification of single-object scenes over the 24 colour x shape
classes, and image<->text Recall@K on multi-object scenes (whose captions carry counts and
relations), per split. On other data: retrieval over all samples, and zero-shot when samples
carry a `label` (an image folder's class, a CSV column), over the given class names or the
labels found (`_` read as spaces), with the given templates or `openai`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from polysense.data.readers import Rejects, detect_format, read_samples
from polysense.errors import DataError
from polysense.eval.retrieval import retrieval_eval
from polysense.eval.templates import default_templates
from polysense.eval.zeroshot import class_name, zeroshot_eval

TASKS = ("zeroshot", "retrieval")


def _classnames(data: str | Path, samples: list[dict[str, Any]]) -> list[str]:
    if detect_format(data) == "world":
        from polysense.data.world import load_manifest

        return list(load_manifest(data)["classes"])
    labels = sorted({s["label"] for s in samples if isinstance(s.get("label"), str)})
    return list(dict.fromkeys(class_name(label) for label in labels))


def evaluate(
    model: Any,
    data: str | Path,
    *,
    split: str | None,
    tasks: tuple[str, ...] = TASKS,
    batch_size: int = 256,
    limit: int | None = None,
    progress: bool = False,
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    image_root: str | Path | None = None,
) -> dict[str, Any]:
    """Metrics (DESIGN.md keys) of `model` on one split of `data`.

    `classnames` (class-index order) and `templates` default to the world's on a world, and to
    the labels found and the `openai` set elsewhere. Besides the metrics: ``n_samples`` (samples
    read), ``n_rejected`` (samples the reader skipped), ``zeroshot_n_samples`` and
    ``retrieval_n_samples`` (samples each task scored).
    """
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise DataError(f"unknown evaluation task(s) {sorted(unknown)}; choose from {list(TASKS)}")
    rejects = Rejects()
    samples = list(
        read_samples(data, split=split, limit=limit, rejects=rejects, image_root=image_root)
    )
    if not samples:
        raise DataError(f"{data}: no samples to evaluate" + (f" in split {split}" if split else ""))
    metrics: dict[str, Any] = {}
    if "zeroshot" in tasks:
        names = list(classnames) if classnames is not None else _classnames(data, samples)
        if names and any(s.get("label") is not None for s in samples):
            zs = zeroshot_eval(
                model,
                samples,
                classnames=names,
                templates=templates or default_templates(detect_format(data) == "world"),
                batch_size=batch_size,
                progress=progress,
            )
            metrics |= {k: zs[k] for k in ("zeroshot_top1", "zeroshot_top5")}
            metrics["zeroshot_n_samples"] = zs["n_samples"]
            metrics["zeroshot_per_class"] = zs["per_class"]
        elif tasks == ("zeroshot",):
            raise DataError(
                f"{data}: no sample has a label; zero-shot needs labelled images (an image "
                "folder's sub-folders, or a 'label' column or field naming the class)"
            )
    if "retrieval" in tasks:
        multi = [s for s in samples if len(s.get("objects") or []) >= 2]
        pool = multi if len(multi) >= 10 else samples
        rt = retrieval_eval(model, pool, batch_size=batch_size, progress=progress)
        metrics |= {k: v for k, v in rt.items() if k.startswith(("i2t", "t2i"))}
        metrics["retrieval_n_samples"] = rt["n_samples"]
        metrics["retrieval_n_captions"] = rt["n_captions"]
        metrics["retrieval_n_shared_captions"] = rt["n_shared_captions"]
    metrics["n_samples"] = len(samples)
    metrics["n_rejected"] = rejects.count
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


def data_probe(
    data: str | Path,
    *,
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    limit: int = 1000,
    image_root: str | Path | None = None,
) -> Callable[[Any], dict[str, float]]:
    """For any source (`polysense train --eval-data`): a probe the trainer calls every
    `train.eval_every` steps on the first `limit` samples, read once. Labelled images give
    `val_zeroshot_top1` (with `classnames`/`templates` as `evaluate` takes them); other data,
    image-caption pairs, give `val_t2i_r1` and `val_i2t_r1`."""
    samples = list(read_samples(data, split=None, limit=limit, image_root=image_root))
    if not samples:
        raise DataError(f"--eval-data {data}: no samples to evaluate")
    names = list(classnames) if classnames is not None else _classnames(data, samples)
    labelled = bool(names) and any(s.get("label") is not None for s in samples)
    prompts = templates or default_templates(detect_format(data) == "world")

    def probe(model: Any) -> dict[str, float]:
        if labelled:
            zs = zeroshot_eval(model, samples, classnames=names, templates=prompts)
            return {"val_zeroshot_top1": zs["zeroshot_top1"]}
        rt = retrieval_eval(model, samples)
        return {"val_t2i_r1": rt["t2i_r1"], "val_i2t_r1": rt["i2t_r1"]}

    return probe


def linear_probe(
    model: Any,
    data: str | Path,
    *,
    split: str | None,
    train_data: str | Path | None,
    classnames: Sequence[str] | None = None,
    c: float | None = None,
    batch_size: int = 256,
    limit: int | None = None,
    image_root: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The linear probe of `polysense eval linear-probe`: fitted on `train_data` (on a world,
    its train split by default), scored on `split` of `data`."""
    from polysense.eval.linear_probe import linear_probe_eval

    is_world = detect_format(data) == "world"
    if train_data is None and not is_world:
        raise DataError(
            f"{data}: the linear probe is fitted on other labelled images than it is scored on; "
            "pass them with --train-data PATH (a folder of class sub-folders, a CSV with a "
            "'label' column ...)"
        )
    train_source = train_data if train_data is not None else data
    train_split = "train" if train_data is None else None
    rejects = Rejects()
    read = {"limit": limit, "rejects": rejects, "image_root": image_root}
    train = list(read_samples(train_source, split=train_split, **read))
    test = list(read_samples(data, split=split, **read))
    names = list(classnames) if classnames is not None else _classnames(train_source, train)
    if not names:
        raise DataError(
            f"{train_source}: no sample has a label; the linear probe needs labelled images"
        )
    result = linear_probe_eval(
        model, train, test, classnames=names, c=c, batch_size=batch_size, progress=progress
    )
    return {
        **{k: v for k, v in result.items() if k.startswith("linear_probe")},
        "linear_probe_n_train": result["n_train"],
        "linear_probe_n_samples": result["n_samples"],
        "n_samples": len(test),
        "n_rejected": rejects.count,
    }
