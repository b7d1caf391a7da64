"""Embeddings of a polysense checkpoint for the curation stages, one model per process and
device. `Embedder` carries what the config says about them: the checkpoint (`ckpt`), the device
(`device`: cpu, cuda, cuda:1, mps) and the batch (`embed_batch`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch
from PIL import Image


@cache
def _model(ckpt: str, device: str):
    from polysense import load

    # a checkpoint directory, or a preset name (random init)
    return load(ckpt, family="clip", device=device)


@dataclass(frozen=True)
class Embedder:
    ckpt: str
    device: str = "cpu"
    batch_size: int = 256

    @classmethod
    def of(cls, cfg: Any) -> Embedder:
        """The embedder a `CurateConfig` describes ("auto" resolved to this machine's device)."""
        from polysense.devices import resolve_device

        device = str(resolve_device(cfg.device, flag="device"))
        return cls(ckpt=cfg.ckpt, device=device, batch_size=cfg.embed_batch)

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, D) float32 unit vectors of the checkpoint's image tower."""
        model, b = _model(self.ckpt, self.device), self.batch_size
        parts = [model.encode_image(list(images[i : i + b])) for i in range(0, len(images), b)]
        if not parts:
            return np.zeros((0, model.cfg.embed_dim), dtype=np.float32)
        return torch.cat(parts).float().cpu().numpy()

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) float32 unit vectors of the checkpoint's text tower."""
        model, b = _model(self.ckpt, self.device), 2 * self.batch_size
        parts = [model.encode_text(list(texts[i : i + b])) for i in range(0, len(texts), b)]
        if not parts:
            return np.zeros((0, model.cfg.embed_dim), dtype=np.float32)
        return torch.cat(parts).float().cpu().numpy()
