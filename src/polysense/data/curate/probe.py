"""The default image-safety hook: a logistic-regression probe on a checkpoint's image embeddings.

Train it on a few labelled embeddings (1 = flag) with `train_probe`, save it, and point
``safety.probe`` at the file; the safety stage flags an image whose probability is >= the
threshold. Any other classifier plugs in as ``safety.classifier="module:function"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from polysense.errors import PolysenseError
from polysense.fileio import atomic_open


class EmbeddingProbe:
    """p(flag | image) = sigmoid(embedding . weight + bias)."""

    def __init__(self, *, weight: np.ndarray, bias: float) -> None:
        self.weight = np.asarray(weight, dtype=np.float32)  # (D,)
        self.bias = float(bias)

    def __call__(self, images: Sequence[object], embeddings: np.ndarray | None) -> np.ndarray:
        if embeddings is None:
            raise PolysenseError("safety.probe scores embeddings: set ckpt to the checkpoint")
        if embeddings.shape[1] != len(self.weight):
            raise PolysenseError(
                f"safety.probe expects {len(self.weight)}-d embeddings, the checkpoint gives "
                f"{embeddings.shape[1]}-d: train the probe on the same checkpoint"
            )
        logits = embeddings @ self.weight + self.bias  # (N,)
        return 0.5 * (1.0 + np.tanh(0.5 * logits))  # the sigmoid, without overflow

    def save(self, path: str | Path) -> None:
        with atomic_open(path, "wb") as fh:
            np.savez(fh, weight=self.weight, bias=np.float64(self.bias))

    @classmethod
    def load(cls, path: str | Path) -> EmbeddingProbe:
        if not Path(path).is_file():
            raise PolysenseError(f"{path}: safety probe not found; train one with train_probe")
        with np.load(path, allow_pickle=False) as z:
            return cls(weight=z["weight"], bias=float(z["bias"]))


def train_probe(
    embeddings: np.ndarray, labels: np.ndarray, *, l2: float = 1e-4, steps: int = 200
) -> EmbeddingProbe:
    """Fit the probe with L-BFGS on the (class-balanced) logistic loss plus an L2 penalty."""
    x = torch.as_tensor(embeddings, dtype=torch.float32)  # (N, D)
    y = torch.as_tensor(labels, dtype=torch.float32)  # (N,)
    if y.min() == y.max():
        raise PolysenseError("train_probe needs both flagged (1) and clean (0) examples")
    pos_weight = (y == 0).sum() / (y == 1).sum()
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = x @ w + b  # (N,)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, y, pos_weight=pos_weight
        )
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return EmbeddingProbe(weight=w.detach().numpy(), bias=float(b.detach()))
