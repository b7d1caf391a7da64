"""BLEU-1..4 and CIDEr-D against pycocoevalcap (the reference) on a fixed fixture, baselines."""

from __future__ import annotations

import random

import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from polysense.eval.captioning import (
    bleu,
    caption_metrics,
    cider_d,
    most_frequent_caption,
    nearest_neighbour_captions,
    tokenize,
)

# A fixed fixture of world-like captions: several references per image, hypotheses that are
# exact, partial, reordered, too short (brevity penalty) and too long (length penalty).
REFS = [
    [
        "a large red square and a small yellow square",
        "there are two shapes a red square and a yellow square",
        "a red square in the top right and a yellow square in the middle left",
        "a red square right of a yellow square",
    ],
    ["a small blue circle", "one shape a blue circle", "a picture of a small blue circle"],
    [
        "a small green star and a large purple triangle",
        "two shapes a green star and a purple triangle",
        "a green star above a purple triangle",
    ],
    ["a large orange circle", "an image of a large orange circle"],
    ["a small red triangle on a plain background", "one shape a red triangle"],
]
HYPS = [
    "a large red square and a small yellow square",
    "a blue circle",
    "a purple star above a green triangle",
    "two shapes a large orange circle and a small orange circle in the top left",
    "red",
]


def _reference(refs, hyps):
    gts = {i: list(r) for i, r in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}
    b, _ = Bleu(4).compute_score(gts, res, verbose=0)
    c, per_image = Cider().compute_score(gts, res)
    return b, c, per_image


def test_bleu_and_cider_equal_pycocoevalcap_on_the_fixture() -> None:
    b_ref, c_ref, per_ref = _reference(REFS, HYPS)
    assert bleu(REFS, HYPS) == pytest.approx(b_ref, abs=1e-6)
    mean, per_image = cider_d(REFS, HYPS)
    assert mean == pytest.approx(c_ref, abs=1e-6)
    assert per_image.tolist() == pytest.approx(per_ref.tolist(), abs=1e-6)
    metrics = caption_metrics(REFS, HYPS)
    assert [metrics[f"bleu{k}"] for k in range(1, 5)] == pytest.approx(b_ref, abs=1e-6)
    assert metrics["cider"] == pytest.approx(c_ref, abs=1e-6)


def test_metrics_equal_pycocoevalcap_on_random_corpora() -> None:
    rng = random.Random(7)
    words = [
        "a",
        "red",
        "blue",
        "green",
        "circle",
        "square",
        "star",
        "left",
        "of",
        "above",
        "two",
        "shapes",
        "and",
        "the",
        "in",
        "top",
    ]
    for _ in range(5):
        n = rng.randint(2, 25)
        refs = [
            [" ".join(rng.choices(words, k=rng.randint(2, 12))) for _ in range(rng.randint(1, 5))]
            for _ in range(n)
        ]
        hyps = [" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(n)]
        b_ref, c_ref, _ = _reference(refs, hyps)
        assert bleu(refs, hyps) == pytest.approx(b_ref, abs=1e-6)
        assert cider_d(refs, hyps)[0] == pytest.approx(c_ref, abs=1e-6)


def test_perfect_and_disjoint_captions() -> None:
    refs = [["a red circle"], ["a blue square"]]
    assert bleu(refs, ["a red circle", "a blue square"])[:3] == pytest.approx([1.0, 1.0, 1.0])
    assert bleu(refs, ["green", "green"])[0] == pytest.approx(0.0, abs=1e-6)
    assert cider_d(refs, ["green", "green"])[0] == 0.0


def test_tokenize_matches_what_the_coco_tokenizer_removes() -> None:
    assert tokenize("Two shapes: a Red circle, and a star.") == "two shapes a red circle and a star"


def test_baselines() -> None:
    train = [["a red circle", "one red circle"], ["a red circle"], ["a blue square"]]
    assert most_frequent_caption(train) == "a red circle"
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    caps = [["a red circle", "a red circle left"], ["a red circle"], ["a blue square"]]
    # query near the first two: their captions agree on "a red circle"
    assert nearest_neighbour_captions(torch.tensor([[1.0, 0.05]]), bank, caps, k=2) == [
        "a red circle"
    ]
    assert nearest_neighbour_captions(torch.tensor([[0.0, 1.0]]), bank, caps, k=1) == [
        "a blue square"
    ]
