"""VQA accuracy: the standard answer normalisation of the VQA evaluation code (lower case,
punctuation, number words to digits, articles and contractions) and its consensus rule.

With several reference answers (VQA v2 has ten), an answer scores min(#matching refs / 3, 1),
averaged over the ten leave-one-out subsets of the references as the official script does; with
one reference (the world) it is exact match after normalisation.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

_CONTRACTIONS = {
    "dont": "don't",
    "doesnt": "doesn't",
    "isnt": "isn't",
    "arent": "aren't",
    "cant": "can't",
    "wont": "won't",
    "whats": "what's",
    "thats": "that's",
    "im": "i'm",
    "youre": "you're",
}
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@"]
_PUNCT += ["`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")


def normalize_answer(answer: str) -> str:
    """The VQA script's processPunctuation + processDigitArticle: 'Two.' -> '2', 'a dog' -> 'dog'."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    original = text  # the script tests the unmodified answer for every mark
    for p in _PUNCT:
        if (p + " " in original or " " + p in original) or _COMMA_DIGIT.search(original):
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD.sub("", text)
    words = []
    for word in text.split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def answer_accuracy(prediction: str, references: Sequence[str]) -> float:
    """min(#matches / 3, 1) averaged over leave-one-out subsets (several refs); exact match (one)."""
    pred = normalize_answer(prediction)
    refs = [normalize_answer(r) for r in references]
    if len(refs) == 1:
        return float(pred == refs[0])
    scores = []
    for i in range(len(refs)):
        others = refs[:i] + refs[i + 1 :]
        scores.append(min(sum(r == pred for r in others) / 3.0, 1.0))
    return sum(scores) / len(scores)


def vqa_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} questions")
    return sum(answer_accuracy(p, r) for p, r in zip(predictions, references, strict=True)) / len(
        predictions
    )


def answer_questions(
    model: Any,
    pixels: Sequence[torch.Tensor],
    questions: Sequence[str],
    *,
    batch_size: int = 256,
    max_new_tokens: int = 6,
) -> list[str]:
    """Greedy answers of the VLM to (image tiles, question) pairs through the chat template."""
    from polysense.models.vlm import chat_prompt

    out: list[str] = []
    for i in range(0, len(questions), batch_size):
        prompts = [chat_prompt(q) for q in questions[i : i + batch_size]]
        out += model.generate(pixels[i : i + batch_size], prompts, max_new_tokens=max_new_tokens)
    return out


def evaluate(model: Any, data: Any, *, batch_size: int = 256) -> dict[str, Any]:
    """Every QA pair of a split (train.vlm.SplitData): overall and per question type."""
    from polysense.eval.captioning import scene_pixels

    pix = scene_pixels(model.cfg.vision, data.images)
    items = [(i, q) for i, qa in enumerate(data.qa) for q in qa]
    if not items:
        return {}
    preds = answer_questions(
        model, [pix[i] for i, _ in items], [q["question"] for _, q in items], batch_size=batch_size
    )
    by_type: dict[str, list[float]] = defaultdict(list)
    for (_, q), p in zip(items, preds, strict=True):
        by_type[q.get("type", "other")].append(answer_accuracy(p, [q["answer"]]))
    allv = [v for vs in by_type.values() for v in vs]
    metrics: dict[str, Any] = {"vqa_accuracy": sum(allv) / len(allv), "vqa_n_questions": len(allv)}
    for kind, vs in sorted(by_type.items()):
        metrics[f"vqa_accuracy_{kind}"] = sum(vs) / len(vs)
    metrics["vqa_examples"] = [
        {"key": data.keys[i], "question": q["question"], "answer": q["answer"], "predicted": p}
        for (i, q), p in list(zip(items, preds, strict=True))[:8]
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
    """`polysense eval vqa`: exact-match VQA accuracy on a world split, per question type."""
    from polysense.models.vlm import load_vlm
    from polysense.train.vlm import load_split

    model = load_vlm(ckpt)
    split_data = load_split(data, split, image_size=model.cfg.vision.image_size, limit=limit)
    with torch.no_grad():
        metrics = evaluate(model, split_data, batch_size=batch_size)
    return metrics | {"n_samples": len(split_data), "split": split or "all"}
