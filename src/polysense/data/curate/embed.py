"""Embeddings of a polysense checkpoint for the curation stages, one model per process."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np
import torch
from PIL import Image


@cache
def _model(ckpt: str):
    from polysense import load

    return load(ckpt, family="clip")  # a checkpoint directory, or a preset name (random init)


@torch.no_grad()
def embed_images(ckpt: str, images: Sequence[Image.Image], batch: int = 256) -> np.ndarray:
    """(N, D) float32 unit vectors of the checkpoint's image tower."""
    model = _model(ckpt)
    parts = [model.encode_image(list(images[i : i + batch])) for i in range(0, len(images), batch)]
    if not parts:
        return np.zeros((0, model.cfg.embed_dim), dtype=np.float32)
    return torch.cat(parts).float().numpy()


@torch.no_grad()
def embed_texts(ckpt: str, texts: Sequence[str], batch: int = 512) -> np.ndarray:
    """(N, D) float32 unit vectors of the checkpoint's text tower."""
    model = _model(ckpt)
    parts = [model.encode_text(list(texts[i : i + batch])) for i in range(0, len(texts), batch)]
    if not parts:
        return np.zeros((0, model.cfg.embed_dim), dtype=np.float32)
    return torch.cat(parts).float().numpy()
