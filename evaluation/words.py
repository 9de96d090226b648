"""English word lists for needle keys, random-word haystacks and common-words extraction.

RULER draws these from the `wonderwords` package's noun, adjective and verb lists; so do we, so
that keys and words look alike. Nothing is downloaded: the lists ship inside the package.
"""

from __future__ import annotations

import functools
from importlib import resources


def _word_list(name: str) -> list[str]:
    text = resources.files("wonderwords").joinpath("assets", name).read_text(encoding="utf-8")
    return [w.strip() for w in text.splitlines() if w.strip()]


@functools.cache
def nouns() -> tuple[str, ...]:
    return tuple(_word_list("nounlist.txt"))


@functools.cache
def adjectives() -> tuple[str, ...]:
    return tuple(_word_list("adjectivelist.txt"))


@functools.cache
def verbs() -> tuple[str, ...]:
    return tuple(_word_list("verblist.txt"))


@functools.cache
def vocabulary() -> tuple[str, ...]:
    """Sorted, de-duplicated single words (nouns, adjectives and verbs without spaces)."""
    words = {w for w in (*nouns(), *adjectives(), *verbs()) if w.isalpha() and w.islower()}
    return tuple(sorted(words))


def key_word(rng) -> str:
    """A needle key as RULER makes them, an ``adjective-noun`` pair, uniform over the pairs.

    `rng` is a `random.Random`."""
    return f"{rng.choice(adjectives())}-{rng.choice(nouns())}"
