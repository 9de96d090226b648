"""RULER's metrics: string match of the references in the model's prediction.

- ``all`` (RULER's ``string_match_all``, for every synthetic task): the fraction of the
  references found in the prediction, so a sample with four needles and three found scores 0.75;
- ``part`` (RULER's ``string_match_part``, for QA-like tasks): 1 when any reference is found.

Matching is case-insensitive substring matching after RULER's post-processing (surrounding
whitespace stripped, control characters turned into newlines). Scores are in [0, 1]; tables
report them as percentages, like RULER.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    """RULER's clean-up of a prediction before matching."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    """Fraction of `references` that occur in `prediction` (case-insensitive), in [0, 1].

    Raises ValueError when `references` is empty."""
    if not references:
        raise ValueError("no references to match")
    pred = postprocess(prediction).lower()
    return sum(ref.lower() in pred for ref in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """1.0 when any of `references` occurs in `prediction` (case-insensitive), else 0.0.

    Raises ValueError when `references` is empty."""
    if not references:
        raise ValueError("no references to match")
    pred = postprocess(prediction).lower()
    return float(any(ref.lower() in pred for ref in references))


METRICS = {"all": string_match_all, "part": string_match_part}


def score(metric: str, prediction: str, references: list[str]) -> float:
    """Score one prediction with the named metric (``all`` or ``part``)."""
    return METRICS[metric](prediction, references)
