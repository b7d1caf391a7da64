"""Zero-shot classification: class names become text prompts, images go to the nearest class.

Each class is embedded through several prompt templates ("a photo of a {}.") whose unit
embeddings are averaged and re-normalised (prompt ensembling, as in CLIP's zero-shot notebook).
An image is then classified by cosine similarity against the (C, D) class matrix.

Ties are scored against the model: the rank of the true class is the number of *other* classes
whose score is greater than or equal to it, and a prediction is correct at k when that rank is
below k. A collapsed model (every score equal) therefore scores 0, never 100%.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from polysense.errors import PolysenseError
from polysense.eval.templates import WORLD

DEFAULT_TEMPLATES: tuple[str, ...] = WORLD  # the world's prompts (see eval/templates.py)


# ---------------------------------------------------------------- batched encoding (shared)


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Put an `nn.Module` in eval mode (dropout off) and inference mode; restore its mode after."""
    was_training = bool(getattr(model, "training", False))
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if isinstance(model, torch.nn.Module):
            model.train(was_training)


@contextmanager
def progress_bar(enabled: bool, description: str) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`; with `enabled`, a transient rich progress bar counts the items."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda n: bar.advance(task, n)


def _stack_images(images: Sequence[Any]) -> Any:
    """A list of PIL images is passed as is; a list of (3, H, W) tensors becomes (B, 3, H, W)."""
    if all(isinstance(im, Tensor) for im in images):
        return torch.stack(list(images))  # (B, 3, H, W)
    if any(isinstance(im, Tensor) for im in images):
        raise PolysenseError("a batch mixes tensor and PIL images: give one kind for every sample")
    return list(images)


def _check_embeddings(emb: Any, n: int, what: str) -> Tensor:
    if not isinstance(emb, Tensor) or emb.ndim != 2 or emb.shape[0] != n:
        shape = tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__
        raise PolysenseError(f"model.{what} returned {shape} for {n} inputs: expected ({n}, D)")
    emb = emb.detach().float().cpu()
    if not torch.isfinite(emb).all():
        raise PolysenseError(f"model.{what} returned non-finite values (NaN or inf)")
    return emb


def encode_images(model: Any, images: Sequence[Any]) -> Tensor:
    """One batch of PIL images or (3, H, W) tensors -> (B, D) float32 on the CPU."""
    return _check_embeddings(model.encode_image(_stack_images(images)), len(images), "encode_image")


def encode_texts(
    model: Any, texts: Sequence[str], *, batch_size: int = 256, progress: bool = False
) -> Tensor:
    """Embed `texts` in batches of `batch_size` under inference mode -> (M, D) float32 on the CPU."""
    if batch_size < 1:
        raise PolysenseError(f"batch_size={batch_size}: must be at least 1")
    out = []
    with eval_mode(model), progress_bar(progress, "texts") as advance:
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            out.append(_check_embeddings(model.encode_text(chunk), len(chunk), "encode_text"))
            advance(len(chunk))
    if not out:
        raise PolysenseError("no text to embed")
    return torch.cat(out)  # (M, D)


# ---------------------------------------------------------------- metrics


def fraction(hits: Tensor) -> float:
    """Mean of a boolean tensor as an exact Python float (count / total, not a float32 mean)."""
    return int(hits.sum()) / hits.numel()


def target_ranks(logits: Tensor, targets: Tensor) -> Tensor:
    """(N, C) scores, (N,) class ids -> (N,) rank of the target: other classes scoring >= it."""
    target_score = logits.gather(1, targets[:, None])  # (N, 1)
    return (logits >= target_score).sum(1) - 1  # (N,), minus the target itself


def accuracy_topk(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy (a fraction in [0, 1]) for each k; k >= C gives 1.0, ties count as misses."""
    if logits.ndim != 2 or targets.shape != (logits.shape[0],) or logits.shape[0] == 0:
        raise PolysenseError(
            f"accuracy_topk: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} "
            "must be (N, C) and (N,) with N > 0"
        )
    if not torch.isfinite(logits).all():
        raise PolysenseError("accuracy_topk: logits contain NaN or inf")
    ranks = target_ranks(logits, targets.long())
    return {k: fraction(ranks < k) for k in ks}


# ---------------------------------------------------------------- zero-shot


def _check_classes(classnames: Sequence[str], templates: Sequence[str]) -> None:
    if not classnames:
        raise PolysenseError("zero-shot needs at least one class name (classnames is empty)")
    if len(set(classnames)) != len(classnames):
        dupes = sorted({c for c in classnames if list(classnames).count(c) > 1})
        raise PolysenseError(f"classnames has duplicates {dupes}: give each class once")
    if not templates:
        raise PolysenseError("zero-shot needs at least one prompt template (templates is empty)")
    for t in templates:
        if t.count("{}") != 1:
            raise PolysenseError(
                f"template {t!r} must contain '{{}}' exactly once (the class name)"
            )


def zeroshot_classifier(
    model: Any,
    classnames: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    *,
    batch_size: int = 256,
    progress: bool = False,
) -> Tensor:
    """(C, D) unit class embeddings: per class, the re-normalised mean of its unit prompt embeddings."""
    _check_classes(classnames, templates)
    prompts = [t.format(c) for c in classnames for t in templates]  # class-major
    emb = encode_texts(model, prompts, batch_size=batch_size, progress=progress)  # (C*T, D)
    emb = F.normalize(emb, dim=-1).view(len(classnames), len(templates), -1)  # (C, T, D)
    return F.normalize(emb.mean(1), dim=-1)  # (C, D)


def class_name(label: str) -> str:
    """How a label (an image folder's name) reads as a class name: `_` become spaces."""
    return label.replace("_", " ").strip()


def _label_index(label: Any, index: dict[str, int], n_classes: int) -> int | None:
    """A label string names a class (as written, or with `_` read as spaces); an int label, or
    a string of digits that names no class (a CSV cell), is a class index. Anything else: None."""
    if isinstance(label, str):
        found = index.get(label, index.get(class_name(label)))
        if found is not None or not label.strip().isdigit():
            return found
        label = int(label)
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < n_classes:
        return label
    return None


def zeroshot_eval(
    model: Any,
    samples: Iterable[dict[str, Any]],
    *,
    classnames: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, Any]:
    """Zero-shot top-1/top-5 accuracy over the samples whose `label` is one of `classnames`.

    Returns ``zeroshot_top1``, ``zeroshot_top5`` (fractions), ``n_samples`` (samples scored),
    ``n_ignored`` (no image, or no label among the classes) and ``per_class`` (top-1 accuracy of
    each class that has at least one sample). Samples are streamed: only one batch of images is
    held at a time.
    """
    if batch_size < 1:
        raise PolysenseError(f"batch_size={batch_size}: must be at least 1")
    classifier = zeroshot_classifier(model, classnames, templates, batch_size=batch_size)  # (C, D)
    index = {class_name(c): i for i, c in enumerate(classnames)}
    index |= {c: i for i, c in enumerate(classnames)}
    ranks: list[Tensor] = []
    targets: list[int] = []
    images: list[Any] = []
    n_seen = n_ignored = 0
    seen_labels: set[str] = set()

    def flush() -> None:
        emb = F.normalize(encode_images(model, images), dim=-1)  # (B, D)
        if emb.shape[1] != classifier.shape[1]:
            raise PolysenseError(
                f"image embeddings have D={emb.shape[1]} but text embeddings D={classifier.shape[1]}"
            )
        logits = emb @ classifier.T  # (B, C)
        ranks.append(target_ranks(logits, torch.tensor(targets[-len(images) :])))
        images.clear()

    with eval_mode(model), progress_bar(progress, "zero-shot") as advance:
        for sample in samples:
            n_seen += 1
            target = _label_index(sample.get("label"), index, len(classnames))
            if target is None or sample.get("image") is None:
                n_ignored += 1
                if len(seen_labels) < 5 and sample.get("label") is not None:
                    seen_labels.add(repr(sample.get("label")))
                continue
            images.append(sample["image"])
            targets.append(target)
            if len(images) == batch_size:
                flush()
                advance(batch_size)
        if images:
            advance(len(images))
            flush()

    if n_seen == 0:
        raise PolysenseError("zero-shot evaluation got no samples: check --data and --split")
    if not targets:
        raise PolysenseError(
            f"none of the {n_seen} samples has an image and a label among the "
            f"{len(classnames)} class names (labels seen: {', '.join(sorted(seen_labels)) or 'none'}); "
            "zero-shot needs samples with a 'label' field naming a class"
        )
    rank = torch.cat(ranks)  # (N,)
    target = torch.tensor(targets)  # (N,)
    per_class = {classnames[c]: fraction(rank[target == c] < 1) for c in sorted(set(targets))}
    return {
        "zeroshot_top1": fraction(rank < 1),
        "zeroshot_top5": fraction(rank < 5),
        "n_samples": len(targets),
        "n_ignored": n_ignored,
        "per_class": per_class,
    }
