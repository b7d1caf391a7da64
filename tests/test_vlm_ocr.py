"""OCR scores: Levenshtein distance and CER by hand."""

from __future__ import annotations

import pytest

from polysense.eval.ocr import edit_distance, ocr_scores


@pytest.mark.parametrize(
    ("a", "b", "d"),
    [
        ("", "", 0),
        ("RED 16", "RED 16", 0),
        ("RED 16", "RED 18", 1),
        ("kitten", "sitting", 3),
        ("", "STAR", 4),
        ("BLUE 7", "BLUE 77", 1),
        ("abc", "cab", 2),
    ],
)
def test_edit_distance(a, b, d) -> None:
    assert edit_distance(a, b) == d == edit_distance(b, a)


def test_ocr_scores_by_hand() -> None:
    s = ocr_scores(["RED 16", "BLUE 7", " STAR 3 "], ["RED 16", "BLUE 77", "STAR 3"])
    assert s["ocr_exact_match"] == pytest.approx(2 / 3)
    assert s["ocr_cer"] == pytest.approx(1 / (6 + 7 + 6))
