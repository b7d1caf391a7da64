"""Linear probe: logistic regression (scikit-learn) on frozen image embeddings, as CLIP and
CLIP_benchmark measure how much a representation holds beyond what its prompts reach.

The model embeds the labelled train and test images once; a multinomial `LogisticRegression`
(L-BFGS) is fitted on the train embeddings and scores the test ones. Its inverse regularisation
`C` is given, or chosen as CLIP's paper does: fitted on a seeded 80 % of the train embeddings for
each C of a log grid, the best on the other 20 % wins, and the probe is refitted on all of them.
Top-k ranks count ties against the model, as zero-shot does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from polysense.errors import PolysenseError
from polysense.eval.zeroshot import (
    _label_index,
    accuracy_topk,
    class_name,
    encode_images,
    eval_mode,
    progress_bar,
)

C_GRID: tuple[float, ...] = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


def labelled_features(
    model: Any,
    samples: Iterable[dict[str, Any]],
    *,
    classnames: Sequence[str],
    batch_size: int = 256,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(N, D) float64 image embeddings, (N,) class indices and the number of samples ignored
    (no image, or no label among `classnames`)."""
    index = {class_name(c): i for i, c in enumerate(classnames)}
    index |= {c: i for i, c in enumerate(classnames)}
    chunks: list[torch.Tensor] = []
    labels: list[int] = []
    pending: list[Any] = []
    n_ignored = 0
    with eval_mode(model), progress_bar(progress, "features") as advance:
        for sample in samples:
            target = _label_index(sample.get("label"), index, len(classnames))
            if target is None or sample.get("image") is None:
                n_ignored += 1
                continue
            pending.append(sample["image"])
            labels.append(target)
            if len(pending) == batch_size:
                chunks.append(encode_images(model, pending))
                advance(len(pending))
                pending.clear()
        if pending:
            chunks.append(encode_images(model, pending))
            advance(len(pending))
    if not labels:
        raise PolysenseError(
            f"no sample has an image and a label among the {len(classnames)} class names "
            f"({n_ignored} ignored); the linear probe needs labelled images"
        )
    return torch.cat(chunks).double().numpy(), np.asarray(labels), n_ignored


def _fit(features: np.ndarray, labels: np.ndarray, c: float, max_iter: int) -> Any:
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise PolysenseError(
            "the linear probe needs scikit-learn: pip install 'polysense[probe]'"
        ) from None

    return LogisticRegression(C=c, max_iter=max_iter).fit(features, labels)


def _scores(probe: Any, features: np.ndarray, n_classes: int) -> torch.Tensor:
    """(N, C) class probabilities; a class the probe never saw in training scores -1."""
    scores = np.full((len(features), n_classes), -1.0)
    scores[:, probe.classes_] = probe.predict_proba(features)
    return torch.from_numpy(scores)


def choose_c(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    grid: Sequence[float] = C_GRID,
    max_iter: int = 1000,
    seed: int = 0,
) -> tuple[float, dict[float, float]]:
    """The C of `grid` whose probe, fitted on a seeded 80 % of the data, has the best top-1 on
    the other 20 % (the smallest C among equals), and every C's held-out top-1."""
    order = np.random.default_rng(seed).permutation(len(labels))
    n_val = max(1, len(labels) // 5)
    val, fit = order[:n_val], order[n_val:]
    if len(np.unique(labels[fit])) < 2:
        raise PolysenseError(
            "choosing C needs at least two classes in the training part; pass C explicitly"
        )
    n_classes = int(labels.max()) + 1
    held_out = {}
    for c in grid:
        probe = _fit(features[fit], labels[fit], c, max_iter)
        scores = _scores(probe, features[val], n_classes)
        held_out[c] = accuracy_topk(scores, torch.from_numpy(labels[val]), ks=(1,))[1]
    best = max(held_out.values())
    return min(c for c, acc in held_out.items() if acc == best), held_out


def linear_probe_eval(
    model: Any,
    train: Iterable[dict[str, Any]],
    test: Iterable[dict[str, Any]],
    *,
    classnames: Sequence[str],
    c: float | None = None,
    max_iter: int = 1000,
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, Any]:
    """Fit a logistic-regression probe on `train`'s image embeddings and score `test`.

    Returns ``linear_probe_top1``, ``linear_probe_top5`` (fractions), ``linear_probe_c`` (the C
    used), ``n_train``, ``n_samples`` (test samples scored) and ``n_ignored`` (test samples with
    no image or no label among `classnames`)."""
    if c is not None and not c > 0:
        raise PolysenseError(f"C={c}: the inverse regularisation must be > 0 (e.g. 1.0)")
    kwargs = {"classnames": classnames, "batch_size": batch_size, "progress": progress}
    x_train, y_train, _ = labelled_features(model, train, **kwargs)
    x_test, y_test, n_ignored = labelled_features(model, test, **kwargs)
    if len(np.unique(y_train)) < 2:
        raise PolysenseError("the linear probe needs training images of at least two classes")
    if c is None:
        c, _ = choose_c(x_train, y_train, max_iter=max_iter)
    probe = _fit(x_train, y_train, c, max_iter)
    top = accuracy_topk(
        _scores(probe, x_test, len(classnames)), torch.from_numpy(y_test), ks=(1, 5)
    )
    return {
        "linear_probe_top1": top[1],
        "linear_probe_top5": top[5],
        "linear_probe_c": c,
        "n_train": len(y_train),
        "n_samples": len(y_test),
        "n_ignored": n_ignored,
    }
