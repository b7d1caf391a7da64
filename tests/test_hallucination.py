"""POPE probe construction and scores, CHAIR-i / CHAIR-s, on hand-made scenes."""

from __future__ import annotations

import pytest

from polysense.eval.hallucination import (
    ObjectVocabulary,
    build_pope,
    chair,
    chair_metrics,
    is_yes,
    pope_question,
    pope_scores,
)


def _o(color: str, shape: str) -> dict:
    return {"color": color, "shape": shape}


TRAIN = [
    [_o("red", "circle"), _o("blue", "square")],
    [_o("red", "circle"), _o("yellow", "star")],
    [_o("red", "circle"), _o("blue", "square")],
    [_o("blue", "square")],
    [_o("green", "triangle")],
    [_o("yellow", "star"), _o("green", "square")],
]
SCENES = [[_o("yellow", "star")], [_o("blue", "square"), _o("green", "triangle")]]


def test_pope_has_one_negative_per_object_and_negatives_are_absent() -> None:
    for sampling in ("random", "popular", "adversarial"):
        probes = build_pope(SCENES, TRAIN, sampling=sampling, seed=0)
        for i, scene in enumerate(SCENES):
            present = {(o["color"], o["shape"]) for o in scene}
            mine = [(p, t) for j, p, t in probes if j == i]
            assert {p for p, t in mine if t} == present
            negatives = [p for p, t in mine if not t]
            assert len(negatives) == len(present)
            assert not set(negatives) & present


def test_popular_negatives_are_the_most_frequent_absent_objects() -> None:
    probes = build_pope(SCENES, TRAIN, sampling="popular")
    # frequencies: red circle 3, blue square 3, yellow star 2, green triangle 1, green square 1
    neg = {i: [p for j, p, t in probes if j == i and not t] for i in range(2)}
    assert neg[0] == [("blue", "square")]  # ties by name: ("blue", ..) < ("red", ..)
    assert neg[1] == [("red", "circle"), ("yellow", "star")]


def test_adversarial_negatives_share_an_attribute_first_then_co_occur() -> None:
    probes = build_pope(SCENES, TRAIN, sampling="adversarial")
    neg = [p for j, p, t in probes if j == 1 and not t]
    present = {("blue", "square"), ("green", "triangle")}
    assert any(neg[0][0] == q[0] or neg[0][1] == q[1] for q in present)
    # green square is the only absent object sharing an attribute; then the most co-occurring
    # one: red circle (twice with the blue square in training)
    assert neg == [("green", "square"), ("red", "circle")]


def test_pope_scores_by_hand() -> None:
    pred = [True, True, False, True, False, False]
    truth = [True, False, True, True, False, False]
    s = pope_scores(pred, truth)
    # tp 2, fp 1, fn 1, tn 2
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["yes_ratio"] == pytest.approx(0.5)
    assert is_yes("Yes.") and not is_yes("no") and not is_yes("")
    assert pope_question("orange", "star") == "is there an orange star?"


def test_chair_by_hand() -> None:
    captions = [
        "a red circle and a blue square",  # both right
        "two shapes: a red circle and a green star",  # green star hallucinated
        "three circles",  # bare shape, right
    ]
    objects = [
        [_o("red", "circle"), _o("blue", "square")],
        [_o("red", "circle"), _o("yellow", "star")],
        [_o("red", "circle"), _o("blue", "circle"), _o("green", "circle")],
    ]
    m = chair_metrics(captions, objects)
    assert m["chair_n_mentions"] == 5  # 2 + 2 + 1 unique mentions
    assert m["chair_i"] == pytest.approx(1 / 5)
    assert m["chair_s"] == pytest.approx(1 / 3)


def test_coco_style_synonyms() -> None:
    vocab = ObjectVocabulary.from_synonyms(
        {"person": ["man", "woman", "men"], "dining table": ["table"], "dog": ["puppy"]}
    )
    assert vocab.mentions("A man and two women at a dining table.") == {"person", "dining table"}
    m = chair(["a man with a puppy", "a table"], [{"person"}, {"dining table"}], vocab)
    assert m["chair_i"] == pytest.approx(1 / 3) and m["chair_s"] == pytest.approx(1 / 2)
