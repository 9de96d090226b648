"""RULER's metrics on hand-made predictions."""

from __future__ import annotations

import pytest

from evaluation import scoring


@pytest.mark.parametrize("prediction,references,expected", [
    (" 1234567.", ["1234567"], 1.0),
    ("The special magic number is 7654321", ["1234567"], 0.0),
    ("1234567 and 2345678", ["1234567", "2345678", "3456789", "4567890"], 0.5),
    ("XQZTR, ABCDE, FGHIJ", ["xqztr", "abcde", "fghij"], 1.0),  # case-insensitive
    ("Apple\x00banana", ["apple", "banana"], 1.0),  # control characters become newlines
    ("", ["1234567"], 0.0),
    ("12345678", ["1234567"], 1.0),  # RULER's substring match: a longer number contains it
])
def test_string_match_all(prediction, references, expected):
    assert scoring.string_match_all(prediction, references) == expected


@pytest.mark.parametrize("prediction,references,expected", [
    ("Paris is the capital", ["Paris", "City of Light"], 1.0),
    ("It is Lyon", ["Paris", "City of Light"], 0.0),
    ("the city of light", ["Paris", "City of Light"], 1.0),
])
def test_string_match_part(prediction, references, expected):
    assert scoring.string_match_part(prediction, references) == expected


def test_postprocess_and_dispatch():
    assert scoring.postprocess("  a\tb\n ") == "a\nb"
    assert scoring.score("all", "a b", ["a", "c"]) == 0.5
    assert scoring.score("part", "a b", ["a", "c"]) == 1.0
    with pytest.raises(ValueError):
        scoring.string_match_all("x", [])
