"""The LM's and the VLM's evaluation after a training stage (`polysense train lm-tiny` and
`vlm-tiny-stage1/2` write these figures to OUT/metrics.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from polysense.data.instruct import load_split, text_rows, world_texts
from polysense.models.checkpoint import load_lm
from polysense.models.vlm import VLM
from polysense.models.vlm_hf import HFChatTokenizer


@torch.no_grad()
def lm_val_loss(ckpt: Path, data: Path, split: str, limit: int = 2000) -> float:
    """Mean next-token loss of the LM checkpoint `ckpt` on the world text of a split."""
    lm, tok, _ = load_lm(ckpt)
    chat = tok.text_chat if isinstance(tok, HFChatTokenizer) else None  # as it trained
    texts = world_texts(load_split(data, split, image_size=32, limit=limit), chat)[:limit]
    total, count = 0.0, 0
    for i in range(0, len(texts), 256):
        ids, mask, labels = text_rows(tok, texts[i : i + 256])  # (B, T) each
        logits, _ = lm(lm.token_embed(ids), mask)  # (B, T, V)
        n = int((labels != -100).sum())
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        total += float(loss) * n
        count += n
    return total / max(count, 1)


@torch.no_grad()
def evaluate_vlm(
    model: VLM,
    data: str | Path,
    *,
    split: str,
    batch_size: int = 256,
    limit: int | None = None,
    clip: str | Path | None = None,
) -> dict[str, Any]:
    """Captioning (BLEU/CIDEr-D, with nearest-neighbour and most-frequent-caption baselines; the
    neighbours in the space of the CLIP checkpoint `clip` when given), CHAIR on the same
    captions, VQA, POPE (three samplings) and OCR on one split."""
    from polysense.eval import captioning, hallucination, ocr, vqa
    from polysense.models.checkpoint import load_model

    model.eval()
    split_data = load_split(data, split, image_size=model.cfg.vision.image_size, limit=limit)
    train = load_split(data, "train", image_size=model.cfg.vision.image_size)
    clip_model = load_model(clip) if clip is not None else None
    cap = captioning.evaluate(
        model, split_data, train=train, batch_size=batch_size, clip=clip_model
    )
    metrics = {k: v for k, v in cap.items() if k != "captions"}
    metrics |= hallucination.chair_metrics(cap["captions"], split_data.objects)
    metrics |= vqa.evaluate(model, split_data, batch_size=batch_size)
    metrics |= hallucination.evaluate_pope(model, split_data, train=train, batch_size=batch_size)
    if split_data.ocr is not None:
        metrics |= ocr.evaluate(model, split_data, batch_size=batch_size)
    metrics["n_samples"] = len(split_data)
    return metrics


def print_table(metrics: dict[str, Any], title: str) -> None:
    """The float figures of `metrics` (one level of nesting) as a rich table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:.4f}")
        elif isinstance(value, dict):
            for sub, v in value.items():
                if isinstance(v, float):
                    table.add_row(f"{key}.{sub}", f"{v:.4f}")
    Console().print(table)
