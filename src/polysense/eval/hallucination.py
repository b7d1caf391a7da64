"""Object hallucination: POPE (yes/no probes) and CHAIR (objects mentioned in captions).

POPE (Li et al. 2023) asks "is there a X?" for every ground-truth object of an image and for as
many absent objects, drawn three ways: `random` (uniform over the absent objects), `popular` (the
absent objects most frequent in the training ground truth) and `adversarial` (the absent objects
that co-occur most with the image's objects in training). In the world, objects are drawn
independently, so plain co-occurrence is nearly flat; the adversarial pool is therefore first
ranked with absent objects sharing a colour or a shape with a present one first (a binding
error, the world's hardest confusion), then by co-occurrence. Objects are (colour, shape) pairs;
the pool is every pair seen in training or in the evaluated split, so the world's held-out pairs
are never asked about on `test`. A reply counts as "yes" when its normalised first word is yes.
`read_pope` reads POPE's own question files (JSON lines of question_id, image, text, label).

CHAIR (Rohrbach et al. 2018): CHAIR-i = hallucinated object mentions / all mentions (unique
objects per caption), CHAIR-s = captions with at least one hallucinated object / all captions.
Mentions are found by longest match against an `ObjectVocabulary` (surface phrase -> object);
the world's has "red circle(s)" -> "red circle" and the bare shapes "circle(s)" -> "circle", and
`ObjectVocabulary.from_synonyms` takes COCO-style lists ({"person": ["man", "woman", ...]}).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polysense.errors import PolysenseError
from polysense.eval.captioning import tokenize

SAMPLINGS = ("random", "popular", "adversarial")


def _pair(o: dict[str, Any]) -> tuple[str, str]:
    return (str(o["color"]), str(o["shape"]))


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def pope_question(color: str, shape: str) -> str:
    """The world's own existence question."""
    return f"is there {_article(f'{color} {shape}')}?"


def build_pope(
    objects: Sequence[Sequence[dict[str, Any]]],
    train_objects: Sequence[Sequence[dict[str, Any]]],
    *,
    sampling: str,
    seed: int = 0,
) -> list[tuple[int, tuple[str, str], bool]]:
    """Probes (image index, (colour, shape), present?) for one sampling: every object of an
    image, and as many absent objects (fewer when the pool runs out)."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling={sampling!r}; use one of {SAMPLINGS}")
    freq: Counter = Counter(_pair(o) for objs in train_objects for o in objs)
    cooc: Counter = Counter()
    for objs in train_objects:
        for a, b in combinations(sorted({_pair(o) for o in objs}), 2):
            cooc[(a, b)] += 1
            cooc[(b, a)] += 1
    pool = sorted(set(freq) | {_pair(o) for objs in objects for o in objs})
    rng = np.random.default_rng(seed)
    probes = []
    for i, objs in enumerate(objects):
        present = sorted({_pair(o) for o in objs})
        absent = [p for p in pool if p not in present]
        if sampling == "random":
            order = [absent[j] for j in rng.permutation(len(absent))]
        elif sampling == "popular":
            order = sorted(absent, key=lambda p: (-freq[p], p))
        else:
            tie = {p: float(rng.random()) for p in absent}
            near = {p for p in absent if any(p[0] == q[0] or p[1] == q[1] for q in present)}
            order = sorted(
                absent,
                key=lambda p: (p not in near, -sum(cooc[(p, q)] for q in present), tie[p]),
            )
        probes += [(i, p, True) for p in present]
        probes += [(i, p, False) for p in order[: len(present)]]
    return probes


def pope_scores(predicted_yes: Sequence[bool], truth: Sequence[bool]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive = "yes") and the fraction of yes replies."""
    tp = sum(p and t for p, t in zip(predicted_yes, truth, strict=True))
    fp = sum(p and not t for p, t in zip(predicted_yes, truth, strict=True))
    fn = sum(not p and t for p, t in zip(predicted_yes, truth, strict=True))
    n = len(truth)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    correct = sum(p == t for p, t in zip(predicted_yes, truth, strict=True))
    return {
        "accuracy": correct / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(predicted_yes) / n,
    }


def is_yes(reply: str) -> bool:
    words = tokenize(reply).split()
    return bool(words) and words[0] == "yes"


def evaluate_pope(
    model: Any,
    data: Any,
    *,
    train: Any,
    batch_size: int = 256,
    seed: int = 0,
    max_images: int = 500,
) -> dict[str, Any]:
    """POPE on the first `max_images` scenes of a split (data.instruct.SplitData; 500 images as in
    the POPE paper) for the three samplings; `pope_accuracy`, `pope_f1` and `pope_yes_ratio` are
    their means, `pope_<sampling>_<metric>` each one."""
    from polysense.eval.captioning import scene_pixels
    from polysense.eval.vqa import answer_questions

    objects = data.objects[:max_images]
    pix = scene_pixels(model.cfg.vision, data.images[:max_images])
    metrics: dict[str, Any] = {"pope_n_images": len(objects)}
    for sampling in SAMPLINGS:
        probes = build_pope(objects, train.objects, sampling=sampling, seed=seed)
        replies = answer_questions(
            model,
            [pix[i] for i, _, _ in probes],
            [pope_question(*p) for _, p, _ in probes],
            batch_size=batch_size,
            max_new_tokens=2,
        )
        scores = pope_scores([is_yes(r) for r in replies], [t for _, _, t in probes])
        metrics |= {f"pope_{sampling}_{k}": v for k, v in scores.items()}
        metrics[f"pope_{sampling}_n"] = len(probes)
    for k in ("accuracy", "f1", "yes_ratio", "precision", "recall"):
        metrics[f"pope_{k}"] = float(np.mean([metrics[f"pope_{s}_{k}"] for s in SAMPLINGS]))
    return metrics


# ---------------------------------------------------------------------------------------------
# CHAIR


@dataclass(frozen=True)
class ObjectVocabulary:
    """Surface phrases (tokenised, lower case) -> canonical object names."""

    phrases: dict[str, str]

    @classmethod
    def from_synonyms(cls, synonyms: dict[str, Iterable[str]]) -> ObjectVocabulary:
        """{object: [synonym, ...]} (COCO style) -> a vocabulary (the object's own name included)."""
        phrases = {}
        for obj, words in synonyms.items():
            for w in [obj, *words]:
                phrases[tokenize(w)] = obj
        return cls(phrases=phrases)

    @classmethod
    def world(cls) -> ObjectVocabulary:
        """(colour, shape) pairs and bare shapes of the world, singular and plural."""
        from polysense.data.world import COLORS, SHAPES

        phrases = {}
        for s in SHAPES:
            phrases[s] = phrases[s + "s"] = s
            for c in COLORS:
                phrases[f"{c} {s}"] = phrases[f"{c} {s}s"] = f"{c} {s}"
        return cls(phrases=phrases)

    def mentions(self, caption: str) -> set[str]:
        """Objects named in a caption, by longest phrase match left to right."""
        words = tokenize(caption).split()
        longest = max(len(p.split()) for p in self.phrases)
        found, i = set(), 0
        while i < len(words):
            for n in range(min(longest, len(words) - i), 0, -1):
                obj = self.phrases.get(" ".join(words[i : i + n]))
                if obj is not None:
                    found.add(obj)
                    i += n
                    break
            else:
                i += 1
        return found


def world_truth(objects: Sequence[dict[str, Any]]) -> set[str]:
    """Ground-truth names of a world scene: 'red circle' and 'circle' for each object."""
    return {f"{o['color']} {o['shape']}" for o in objects} | {str(o["shape"]) for o in objects}


def chair(
    captions: Sequence[str], truths: Sequence[set[str]], vocab: ObjectVocabulary
) -> dict[str, float]:
    """CHAIR-i and CHAIR-s of captions against each image's set of true object names."""
    mentioned = hallucinated = bad_captions = 0
    for caption, truth in zip(captions, truths, strict=True):
        objs = vocab.mentions(caption)
        wrong = objs - truth
        mentioned += len(objs)
        hallucinated += len(wrong)
        bad_captions += bool(wrong)
    return {
        "chair_i": hallucinated / mentioned if mentioned else 0.0,
        "chair_s": bad_captions / len(captions) if captions else 0.0,
        "chair_n_mentions": float(mentioned),
    }


def chair_metrics(
    captions: Sequence[str], objects: Sequence[Sequence[dict[str, Any]]]
) -> dict[str, float]:
    """CHAIR of generated captions of world scenes (the world vocabulary)."""
    return chair(captions, [world_truth(o) for o in objects], ObjectVocabulary.world())


# ---------------------------------------------------------------------------------------------
# eval tasks


def _load(ckpt: Path, data: str, split: str | None, limit: int | None) -> tuple[Any, Any]:
    from polysense.data.instruct import load_split
    from polysense.models.checkpoint import load_vlm

    model = load_vlm(ckpt)
    return model, load_split(data, split, image_size=model.cfg.vision.image_size, limit=limit)


def read_pope(path: str | Path, *, limit: int | None = None) -> list[dict[str, Any]]:
    """A POPE question file: JSON lines (or a JSON list) of {question_id, image, text, label},
    the label "yes" or "no"; one-line errors name the file, the line and the field."""
    from polysense.eval.formats import field, read_json

    fix = 'a POPE line is {"question_id", "image", "text", "label": "yes"|"no"}'
    rows = read_json(path, "a POPE question file (JSON lines of question_id, image, text, label)")
    if not isinstance(rows, list):
        rows = [rows]
    out = []
    for n, row in enumerate(rows[:limit] if limit else rows, 1):
        where = f"{path}: line {n}"
        label = str(field(row, "label", where, fix)).strip().lower()
        if label not in ("yes", "no"):
            raise PolysenseError(
                f"{where}: label {row['label']!r} is neither 'yes' nor 'no'; {fix}"
            )
        out.append(
            {
                "question_id": row.get("question_id", n),
                "image": str(field(row, "image", where, fix)),
                "text": str(field(row, "text", where, fix)),
                "label": label == "yes",
            }
        )
    return out


def is_pope_file(data: str | Path) -> bool:
    """A JSON/JSONL file whose first entry has POPE's `text` and `label` fields."""
    from polysense.eval.formats import first_entry_has

    return first_entry_has(data, "text", "label")


def evaluate_pope_file(
    model: Any, items: Sequence[dict[str, Any]], image_root: Path | None, *, batch_size: int = 256
) -> dict[str, Any]:
    """`read_pope`'s questions asked of the model (its image, the question as written): accuracy,
    precision, recall, F1 and yes-ratio, a reply counting as yes when its first word is."""
    from polysense.eval.formats import open_images
    from polysense.eval.vqa import answer_questions

    named = [(q["image"], f"question {q['question_id']}") for q in items]
    replies = answer_questions(
        model, open_images(image_root, named), [q["text"] for q in items],
        batch_size=batch_size, max_new_tokens=2,
    )  # fmt: skip
    scores = pope_scores([is_yes(r) for r in replies], [q["label"] for q in items])
    return {f"pope_{k}": v for k, v in scores.items()} | {"pope_n": len(items)}


def eval_pope_task(
    *,
    ckpt: Path,
    data: str,
    split: str | None,
    batch_size: int,
    limit: int | None,
    clip: Path | None,
    image_root: Path | None = None,
) -> dict[str, Any]:
    """`polysense eval pope`: on a world, POPE with random, popular and adversarial negatives;
    on a POPE question file, its questions as written."""
    from polysense.data.instruct import load_split
    from polysense.data.readers import detect_format
    from polysense.eval.formats import no_split
    from polysense.models.checkpoint import load_vlm

    if is_pope_file(data):
        no_split(split, data, "a POPE question file")
        items = read_pope(data, limit=limit)
        with torch.no_grad():
            metrics = evaluate_pope_file(load_vlm(ckpt), items, image_root, batch_size=batch_size)
        return metrics | {"n_samples": len(items), "split": "all"}
    if detect_format(data) != "world":
        raise PolysenseError(
            f"{data}: eval pope reads a world or a POPE question file (JSON lines of "
            '{"question_id", "image", "text", "label": "yes"|"no"}); pass one of them'
        )
    if image_root is not None:
        raise PolysenseError(
            "--image-root goes with a POPE question file; a world holds its images"
        )
    model, split_data = _load(ckpt, data, split, limit)
    train = load_split(data, "train", image_size=model.cfg.vision.image_size)
    with torch.no_grad():
        metrics = evaluate_pope(model, split_data, train=train, batch_size=batch_size)
    return metrics | {"n_samples": len(split_data), "split": split or "all"}


def eval_chair_task(
    *,
    ckpt: Path,
    data: str,
    split: str | None,
    batch_size: int,
    limit: int | None,
    clip: Path | None,
) -> dict[str, Any]:
    """`polysense eval chair`: CHAIR-i / CHAIR-s of the captions of a split (decoded as for
    `polysense eval caption`: `captioning.CAPTION_DECODING`)."""
    from polysense.eval.captioning import generate_captions

    model, split_data = _load(ckpt, data, split, limit)
    with torch.no_grad():
        captions = generate_captions(model, split_data.images, batch_size=batch_size)
    return chair_metrics(captions, split_data.objects) | {
        "n_samples": len(split_data),
        "split": split or "all",
    }
