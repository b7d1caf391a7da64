"""VQA answer normalisation and the consensus accuracy rule, with hand-computed values."""

from __future__ import annotations

import pytest

from polysense.eval.vqa import answer_accuracy, normalize_answer, vqa_accuracy


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Two.", "2"),
        ("two", "2"),
        ("a red circle", "red circle"),
        ("Yes!", "yes"),
        ("the dog's bone", "dog's bone"),
        ("dont know", "don't know"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("  Left\n", "left"),
        ("red, green", "red green"),
    ],
)
def test_normalisation_follows_the_vqa_script(raw, normalised) -> None:
    assert normalize_answer(raw) == normalised


def test_one_reference_is_exact_match_after_normalisation() -> None:
    assert answer_accuracy("Two", ["two"]) == 1.0
    assert answer_accuracy("three", ["two"]) == 0.0
    assert answer_accuracy("the circle", ["circle"]) == 1.0


def test_ten_references_use_min_matches_over_three_leave_one_out() -> None:
    # 2 of 10 annotators said "red": leaving out one of them leaves 1 match (1/3), leaving out
    # any of the other 8 leaves 2 matches (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    refs = ["red", "red"] + ["blue"] * 8
    assert answer_accuracy("red", refs) == pytest.approx(0.6)
    # 3 matches: leaving out a match -> 2/3 (3 times), else 1 (7 times): (2 + 7) / 10 = 0.9
    assert answer_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)
    # 4 or more matches: always >= 3 left -> 1
    assert answer_accuracy("red", ["red"] * 4 + ["blue"] * 6) == 1.0
    assert answer_accuracy("green", refs) == 0.0


def test_corpus_accuracy_is_the_mean() -> None:
    assert vqa_accuracy(["yes", "no", "two"], [["yes"], ["yes"], ["2"]]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 predictions for 1"):
        vqa_accuracy(["a", "b"], [["a"]])
