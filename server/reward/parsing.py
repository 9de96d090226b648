"""Reading a judge's verdict back from its text, without guessing.

- Pairwise: the verdict is ``[[A]]`` or ``[[B]]`` (case and inner whitespace are ignored). No
  verdict, or both, is a failure.
- Ranking: ``[[A>B>C]]`` (also ``[A > B > C]``, ``[[Assistant A > Assistant B]]``), read from the
  text after the last ``[Ranking]`` marker when there is one, since the analysis before it may
  quote the format. It must name every shown candidate exactly once; no ranking, or several
  different ones, is a failure.

Every function returns a :class:`Verdict`: ``ranking`` (display slots, best first) or ``error``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from server.reward.prompts import JudgePrompt, letter

_PAIRWISE = re.compile(r"\[\[\s*([AB])\s*\]\]", re.IGNORECASE)
_SLOT = r"(?:assistant\s*)?[A-Z]"
_RANKING = re.compile(rf"\[\[?\s*({_SLOT}\s*(?:>\s*{_SLOT}\s*)+)\]\]?", re.IGNORECASE)
_RANKING_MARKER = re.compile(r"\[\s*ranking\s*\]", re.IGNORECASE)
_ASSISTANT = re.compile(r"assistant", re.IGNORECASE)


@dataclass(frozen=True)
class Verdict:
    """A parsed judgment: ``ranking`` lists display slots best first (0 = the candidate shown as
    A), or it is None and ``error`` says why."""

    ranking: tuple[int, ...] | None
    error: str | None = None


def parse_pairwise(text: str) -> Verdict:
    letters = {m.upper() for m in _PAIRWISE.findall(text)}
    if not letters:
        return Verdict(None, "no verdict: expected [[A]] or [[B]] in the judge output")
    if len(letters) > 1:
        return Verdict(None, "conflicting verdicts: the judge output contains both [[A]] and [[B]]")
    best = ord(letters.pop()) - ord("A")
    return Verdict((best, 1 - best))


def parse_ranking(text: str, n: int) -> Verdict:
    markers = list(_RANKING_MARKER.finditer(text))
    section = text[markers[-1].end():] if markers else text
    rankings = set()
    for match in _RANKING.finditer(section):
        slots = _ASSISTANT.sub("", match.group(1)).split(">")
        rankings.add(tuple(ord(s.strip().upper()) - ord("A") for s in slots))
    expected = ", ".join(letter(i) for i in range(n))
    if not rankings:
        return Verdict(None, f"no ranking: expected [[{'>'.join(letter(i) for i in range(n))}]]-"
                             "style output after [Ranking]")
    if len(rankings) > 1:
        return Verdict(None, "conflicting rankings: the judge output contains "
                             f"{len(rankings)} different rankings")
    ranking = rankings.pop()
    if sorted(ranking) != list(range(n)):
        shown = ">".join(letter(s) if 0 <= s < 26 else "?" for s in ranking)
        return Verdict(None, f"invalid ranking {shown}: it must name each of {expected} "
                             "exactly once")
    return Verdict(ranking)


def parse_verdict(text: str, prompt: JudgePrompt, n: int) -> Verdict:
    """Parse ``text`` produced for the ``prompt`` judge prompt over ``n`` shown candidates."""
    return parse_pairwise(text) if prompt == "pairwise" else parse_ranking(text, n)
