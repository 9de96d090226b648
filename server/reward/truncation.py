"""LongRM's head-and-tail truncation, scaled to the model's length.

LongRM cuts a prompt of 131,072 tokens or more to its first 65,536 and last 65,531 tokens. We
keep the same fractions of the budget ``B`` a prompt may use (the model's maximum length, less the
judge's output tokens): ``head = B * 65536 // 131072`` and ``tail = B * 65531 // 131072``.

Only the context may be cut: a prompt comes in three token segments, ``prefix`` (kept whole: the
judge's instructions before the context), ``middle`` (the context) and ``suffix`` (kept whole:
the candidates). A prompt whose prefix does not fit in the head or whose suffix does not fit in
the tail cannot be truncated without cutting into a candidate: :class:`PromptTooLong`.
"""

from __future__ import annotations

from dataclasses import dataclass

LONGRM_BUDGET = 131_072
LONGRM_HEAD = 65_536
LONGRM_TAIL = 65_531


class PromptTooLong(ValueError):
    """The kept parts (instructions, candidates) alone exceed what truncation may keep."""


@dataclass(frozen=True)
class Truncation:
    """What happened to one prompt (all counts in tokens)."""

    original_tokens: int
    kept_tokens: int
    head_tokens: int
    tail_tokens: int
    budget_tokens: int

    @property
    def truncated(self) -> bool:
        return self.kept_tokens < self.original_tokens


def head_tail_sizes(budget: int) -> tuple[int, int]:
    """``(head, tail)`` token counts kept from a prompt over ``budget`` tokens."""
    return budget * LONGRM_HEAD // LONGRM_BUDGET, budget * LONGRM_TAIL // LONGRM_BUDGET


def truncate(prefix: list[int], middle: list[int], suffix: list[int], budget: int
             ) -> tuple[list[int], Truncation]:
    """Join the segments; over ``budget`` tokens keep LongRM's head and tail.

    Raises :class:`PromptTooLong` when the cut would reach into ``prefix`` or ``suffix``, and
    ``ValueError`` for a budget below 2 tokens.
    """
    if budget < 2:
        raise ValueError(f"token budget {budget} is too small")
    ids = prefix + middle + suffix
    if len(ids) <= budget:
        return ids, Truncation(len(ids), len(ids), len(ids), 0, budget)
    head, tail = head_tail_sizes(budget)
    if len(prefix) > head or len(suffix) > tail:
        raise PromptTooLong(
            f"the prompt has {len(ids)} tokens, over the {budget}-token budget, and truncating the "
            f"context (keeping its first {head} and last {tail} tokens) would cut into the "
            f"candidates or instructions ({len(prefix)} tokens before the context, {len(suffix)} "
            "after it): shorten the candidates")
    return ids[:head] + ids[len(ids) - tail:], Truncation(len(ids), head + tail, head, tail, budget)
