"""VQA accuracy: the standard answer normalisation of the VQA evaluation code (lower case,
punctuation, number words to digits, articles and contractions) and its consensus rule.

With several reference answers (VQA v2 has ten), an answer scores min(#matching refs / 3, 1),
averaged over the ten leave-one-out subsets of the references as the official script does; with
one reference (the world) it is exact match after normalisation.

`read_vqav2` reads the official VQAv2 files: the questions file (`questions[]` of image_id,
question, question_id) and the annotations file (`annotations[]` of question_id, ten `answers`,
answer_type); images are COCO's `COCO_<data_subtype>_<image_id:012d>.jpg` under the image root,
as the official VQA API names them (data_subtype from the questions file, default val2014).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from polysense.errors import PolysenseError

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
    from polysense.data.chat import chat_prompt

    out: list[str] = []
    for i in range(0, len(questions), batch_size):
        prompts = [chat_prompt(q) for q in questions[i : i + batch_size]]
        out += model.generate(pixels[i : i + batch_size], prompts, max_new_tokens=max_new_tokens)
    return out


def evaluate(model: Any, data: Any, *, batch_size: int = 256) -> dict[str, Any]:
    """Every QA pair of a split (data.instruct.SplitData): overall and per question type."""
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


def coco_image_name(image_id: int, subtype: str = "val2014") -> str:
    """COCO 2014's file name, as the VQA API builds it: 123 -> COCO_val2014_000000000123.jpg."""
    return f"COCO_{subtype}_{int(image_id):012d}.jpg"


def read_vqav2(
    questions: str | Path, annotations: str | Path, *, limit: int | None = None
) -> list[dict[str, Any]]:
    """The questions of a VQAv2 questions file, each with its image's file name, its ten answers
    and answer type from the annotations file (one-line errors name the file and the field)."""
    from polysense.eval.formats import field, read_json

    qfix = "a VQAv2 questions file has questions[] of {image_id, question, question_id}"
    afix = "a VQAv2 annotations file has annotations[] of {question_id, answers[], answer_type}"
    qdoc = read_json(questions, "a VQAv2 questions JSON (--data)")
    adoc = read_json(annotations, "a VQAv2 annotations JSON (--annotations)")
    qs = field(qdoc, "questions", str(questions), qfix)
    subtype = str(qdoc.get("data_subtype") or "val2014")
    by_id: dict[Any, dict[str, Any]] = {}
    for i, a in enumerate(field(adoc, "annotations", str(annotations), afix)):
        where = f"{annotations}: annotations[{i}]"
        answers = field(a, "answers", where, afix)
        refs = [str(field(x, "answer", f"{where}.answers", afix)) for x in answers]
        if not refs:
            raise PolysenseError(f"{where} has an empty 'answers' list; {afix}")
        by_id[field(a, "question_id", where, afix)] = {
            "answers": refs,
            "answer_type": str(a.get("answer_type") or "other"),
        }
    out = []
    for i, q in enumerate(qs[:limit] if limit else qs):
        where = f"{questions}: questions[{i}]"
        qid = field(q, "question_id", where, qfix)
        if qid not in by_id:
            raise PolysenseError(
                f"{where}: question_id {qid} has no annotation in {annotations}; pass the "
                "annotations file of the same split"
            )
        image_id = field(q, "image_id", where, qfix)
        out.append(
            {
                "question_id": qid,
                "question": str(field(q, "question", where, qfix)),
                "image": coco_image_name(image_id, subtype),
            }
            | by_id[qid]
        )
    return out


def evaluate_vqav2(
    model: Any, items: Sequence[dict[str, Any]], image_root: Path | None, *, batch_size: int = 256
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Soft VQA accuracy over `read_vqav2`'s questions, overall and per answer type, and the
    answers in the VQA results format ([{question_id, answer}])."""
    from polysense.eval.formats import open_images

    named = [(q["image"], f"question {q['question_id']}") for q in items]
    preds = answer_questions(
        model, open_images(image_root, named), [q["question"] for q in items],
        batch_size=batch_size,
    )  # fmt: skip
    by_type: dict[str, list[float]] = defaultdict(list)
    for q, p in zip(items, preds, strict=True):
        by_type[q["answer_type"]].append(answer_accuracy(p, q["answers"]))
    allv = [v for vs in by_type.values() for v in vs]
    metrics: dict[str, Any] = {"vqa_accuracy": sum(allv) / len(allv), "vqa_n_questions": len(allv)}
    for kind, vs in sorted(by_type.items()):
        metrics[f"vqa_accuracy_{kind.replace('/', '_')}"] = sum(vs) / len(vs)
    results = [
        {"question_id": q["question_id"], "answer": p} for q, p in zip(items, preds, strict=True)
    ]
    return metrics, results


def eval_task(
    *,
    ckpt: Path,
    data: str,
    split: str | None,
    batch_size: int,
    limit: int | None,
    clip: Path | None,
    annotations: Path | None = None,
    image_root: Path | None = None,
    results: Path | None = None,
) -> dict[str, Any]:
    """`polysense eval vqa`: VQA accuracy on a world split per question type, or with
    --annotations the soft accuracy on VQAv2 questions + annotations per answer type."""
    from polysense.data.instruct import load_split
    from polysense.models.checkpoint import load_vlm

    if annotations is not None:
        from polysense.eval.formats import no_split
        from polysense.fileio import atomic_write_json

        no_split(split, data, "a VQAv2 questions file")
        items = read_vqav2(data, annotations, limit=limit)
        model = load_vlm(ckpt)
        with torch.no_grad():
            metrics, answers = evaluate_vqav2(model, items, image_root, batch_size=batch_size)
        if results is not None:
            atomic_write_json(results, answers)
        return metrics | {"n_samples": len(items), "split": "all"}
    if results is not None or image_root is not None:
        raise PolysenseError(
            "--results/--image-root go with a VQAv2 questions file; pass --annotations FILE too"
        )
    from polysense.data.readers import detect_format
    from polysense.eval.formats import SPLIT_FORMATS, no_split

    fmt = detect_format(data)
    if fmt not in SPLIT_FORMATS:
        no_split(split, data, f"a {fmt} source")
    model = load_vlm(ckpt)
    split_data = load_split(data, split, image_size=model.cfg.vision.image_size, limit=limit)
    with torch.no_grad():
        metrics = evaluate(model, split_data, batch_size=batch_size)
    return metrics | {"n_samples": len(split_data), "split": split or "all"}
