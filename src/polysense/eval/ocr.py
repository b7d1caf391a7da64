"""Reading text in images: the VLM answers "what is written here?" on the world's rendered-text
strips (4:1, cut into four square tiles); exact match and character error rate are reported.

CER = total edit distance (Levenshtein: insertions, deletions, substitutions) / total reference
characters, over the split; exact match compares the stripped strings, case included.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance by the two-row dynamic programme."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    if len(predictions) != len(references) or not references:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
    edits = sum(
        edit_distance(p.strip(), r.strip()) for p, r in zip(predictions, references, strict=True)
    )
    chars = sum(len(r.strip()) for r in references)
    return {"ocr_exact_match": exact / len(references), "ocr_cer": edits / max(chars, 1)}


def evaluate(model: Any, data: Any, *, batch_size: int = 256) -> dict[str, Any]:
    """OCR on a split whose scenes carry rendered-text strips (data.instruct.SplitData.ocr)."""
    from polysense.data.chat import OCR_INSTRUCTION
    from polysense.data.transforms import tile_pixels
    from polysense.eval.vqa import answer_questions

    if data.ocr is None:
        return {}
    v = model.cfg.vision
    pix = list(tile_pixels(data.ocr, v.image_size, v.image_mean, v.image_std))
    preds = answer_questions(
        model, pix, [OCR_INSTRUCTION] * len(pix), batch_size=batch_size, max_new_tokens=8
    )
    metrics: dict[str, Any] = ocr_scores(preds, data.ocr_text)
    metrics["ocr_examples"] = [
        {"key": k, "text": t, "predicted": p}
        for k, t, p in zip(data.keys[:8], data.ocr_text[:8], preds[:8], strict=False)
    ]
    return metrics


def eval_task(
    *,
    ckpt: Path,
    data: str,
    split: str | None,
    batch_size: int,
    limit: int | None,
    clip: Path | None,
) -> dict[str, Any]:
    """`polysense eval ocr`: exact match and CER on the world's OCR strips (needs a world made
    with the ocr modality, e.g. runs/world-all)."""
    from polysense.data.instruct import load_split
    from polysense.errors import PolysenseError
    from polysense.models.checkpoint import load_vlm

    model = load_vlm(ckpt)
    split_data = load_split(data, split, image_size=model.cfg.vision.image_size, limit=limit)
    if split_data.ocr is None:
        raise PolysenseError(
            f"{data}: the samples have no OCR images (KEY.ocr.png); generate the world with "
            "`polysense world generate --modalities image,text,ocr`"
        )
    with torch.no_grad():
        metrics = evaluate(model, split_data, batch_size=batch_size)
    return metrics | {"n_samples": len(split_data), "split": split or "all"}
