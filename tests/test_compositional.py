"""Winoground-style examples from world scenes, the text/image/group scores, chance levels."""

from __future__ import annotations

import pytest
import torch

from polysense.errors import PolysenseError
from polysense.eval.compositional import (
    CHANCE,
    build_examples,
    evaluate,
    winoground_scores,
)


def _o(color: str, shape: str, bbox: list[int]) -> dict:
    return {"color": color, "shape": shape, "bbox": bbox}


SCENES = [
    [_o("red", "circle", [0, 0, 10, 10]), _o("blue", "square", [20, 0, 30, 10])],  # 0
    [_o("blue", "circle", [0, 20, 10, 30]), _o("red", "square", [20, 20, 30, 30])],  # 1: swap
    [_o("green", "star", [0, 10, 10, 20]), _o("yellow", "triangle", [20, 10, 30, 20])],  # 2
    [_o("yellow", "triangle", [0, 12, 10, 22]), _o("green", "star", [20, 12, 30, 22])],  # 3
    [_o("red", "star", [0, 0, 10, 10])],  # one object: never used
]


def test_examples_are_minimal_pairs_true_of_their_own_image() -> None:
    examples = build_examples(SCENES)
    assert [(e.kind, e.image0, e.image1) for e in examples] == [
        ("binding", 0, 1),
        ("relation", 2, 3),
    ]
    binding, relation = examples
    assert binding.caption0 == "a red circle and a blue square"
    assert binding.caption1 == "a blue circle and a red square"
    assert relation.caption0 == "a green star left of a yellow triangle"
    assert relation.caption1 == "a yellow triangle left of a green star"
    for e in examples:  # same words, different order
        assert sorted(e.caption0.split()) == sorted(e.caption1.split())


def test_scores_by_hand() -> None:
    # [n, caption, image]; example 0 right both ways, 1 only the text score, 2 neither
    s = torch.tensor(
        [
            [[2.0, 0.0], [0.0, 2.0]],
            [[2.0, 3.0], [0.0, 4.0]],  # text: 2 > 0 and 4 > 3; image: 2 > 3 fails
            [[0.0, 1.0], [1.0, 0.0]],
        ]
    )
    got = winoground_scores(s)
    assert got["winoground_text"] == pytest.approx(2 / 3)
    assert got["winoground_image"] == pytest.approx(1 / 3)
    assert got["winoground_group"] == pytest.approx(1 / 3)


def test_an_oracle_scores_one_and_constant_scores_zero() -> None:
    examples = build_examples(SCENES)
    truth = {(e.image0, e.caption0) for e in examples} | {(e.image1, e.caption1) for e in examples}

    def oracle(idx, captions):
        return torch.tensor([float((i, c) in truth) for i, c in zip(idx, captions, strict=True)])

    result = evaluate(oracle, examples)
    assert result["winoground_group"] == 1.0 and result["winoground_n"] == 2
    assert result["winoground_group_binding"] == 1.0
    flat = evaluate(lambda idx, caps: torch.zeros(len(idx)), examples)
    assert flat["winoground_text"] == 0.0  # ties are not wins
    assert CHANCE["winoground_group"] == pytest.approx(1 / 6)


def test_random_scores_sit_at_the_chance_levels() -> None:
    g = torch.Generator().manual_seed(0)
    got = winoground_scores(torch.rand(40000, 2, 2, generator=g))
    for key, chance in CHANCE.items():
        assert got[key] == pytest.approx(chance, abs=0.01)


def test_no_pairs_is_a_clear_error() -> None:
    with pytest.raises(PolysenseError, match="no Winoground examples"):
        evaluate(lambda i, c: torch.zeros(len(i)), build_examples(SCENES[4:]))
