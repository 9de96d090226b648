"""Judge-verdict parsing, LongRM truncation and the reward request models (no engine)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.reward import prompts
from server.reward.parsing import parse_pairwise, parse_ranking, parse_verdict
from server.reward.schemas import RewardItem, RewardRequest
from server.reward.truncation import PromptTooLong, head_tail_sizes, truncate


@pytest.mark.parametrize("text, ranking", [
    ("Assistant A is more accurate.\n\n[[A]]", (0, 1)),
    ("explanation ... final verdict: [[B]]", (1, 0)),
    ("[[ b ]]", (1, 0)),
    ("verdict:[[a]] (A cites the right clause)", (0, 1)),
    ("[[B]]\n[[B]]", (1, 0)),  # the same verdict twice is still one verdict
])
def test_pairwise_verdicts(text: str, ranking: tuple[int, ...]) -> None:
    verdict = parse_pairwise(text)
    assert verdict.ranking == ranking and verdict.error is None


@pytest.mark.parametrize("text, reason", [
    ("", "no verdict"),
    ("Assistant A is better.", "no verdict"),
    ("[A] is better", "no verdict"),
    ("[[C]]", "no verdict"),
    ('Output "[[A]]" if A is better, "[[B]]" if B is better. I pick [[A]].', "conflicting"),
])
def test_pairwise_failures(text: str, reason: str) -> None:
    verdict = parse_pairwise(text)
    assert verdict.ranking is None and reason in verdict.error


@pytest.mark.parametrize("text, n, ranking", [
    ("[Analysis]\nC is best.\n[Ranking]\n[[C>A>B]]", 3, (2, 0, 1)),
    ("[Ranking]\n[[ b > a ]]", 2, (1, 0)),
    ("[ranking] [Assistant D > Assistant A > Assistant C > Assistant B]", 4, (3, 0, 2, 1)),
    # The analysis quotes the format; only the text after the last [Ranking] counts.
    ("[Analysis]\nI will answer as [[A>B>C]].\n[Ranking]\n[[B>C>A]]", 3, (1, 2, 0)),
    ("no marker, just [[A>C>B]] at the end", 3, (0, 2, 1)),
])
def test_rankings(text: str, n: int, ranking: tuple[int, ...]) -> None:
    verdict = parse_ranking(text, n)
    assert verdict.ranking == ranking and verdict.error is None


@pytest.mark.parametrize("text, n, reason", [
    ("[Analysis] all fine", 3, "no ranking"),
    ("[Ranking]\n[[A>B]]", 3, "invalid ranking A>B"),
    ("[Ranking]\n[[A>A>B]]", 3, "invalid ranking"),
    ("[Ranking]\n[[A>B>D]]", 3, "invalid ranking"),
    ("[Ranking]\n[[A>B>C]] or maybe [[C>B>A]]", 3, "conflicting rankings"),
])
def test_ranking_failures(text: str, n: int, reason: str) -> None:
    verdict = parse_ranking(text, n)
    assert verdict.ranking is None and reason in verdict.error


def test_parse_verdict_dispatch() -> None:
    assert parse_verdict("[[B]]", "pairwise", 2).ranking == (1, 0)
    assert parse_verdict("[Ranking][[B>A]]", "ranking", 2).ranking == (1, 0)
    assert parse_verdict("[[B]]", "ranking", 2).ranking is None


def test_prompts_follow_longrm() -> None:
    messages = prompts.judge_messages("ranking", "Q?", ["x", "y", "z"])
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "rank 3 responses" in messages[0]["content"]
    assert messages[0]["content"].count("[[A>B>C]]") == 3
    assert messages[1]["content"] == (
        "[User Question]\nQ?\n\n"
        "[The Start of Assistant A's Answer]\nx\n[The End of Assistant A's Answer]\n\n"
        "[The Start of Assistant B's Answer]\ny\n[The End of Assistant B's Answer]\n\n"
        "[The Start of Assistant C's Answer]\nz\n[The End of Assistant C's Answer]")
    pair = prompts.judge_messages("pairwise", "Q?", ["x", "y"])[0]["content"]
    assert pair.endswith('"[[A]]" if assistant A is better, "[[B]]" if assistant B is better.')
    assert prompts.context_text(["sys", "doc", "q"]) == "sys\n\ndoc\n\nq"


def test_head_tail_sizes_scale_longrm() -> None:
    assert head_tail_sizes(131_072) == (65_536, 65_531)
    assert head_tail_sizes(2048) == (1024, 1023)


def test_truncate_keeps_head_and_tail() -> None:
    prefix, middle, suffix = [1, 2], list(range(100, 200)), [7, 8, 9]
    ids, info = truncate(prefix, middle, suffix, 20)
    whole = prefix + middle + suffix
    assert ids == whole[:10] + whole[-9:]
    assert (info.original_tokens, info.kept_tokens, info.head_tokens, info.tail_tokens) == \
        (105, 19, 10, 9)
    assert info.truncated


def test_truncate_leaves_short_prompts() -> None:
    ids, info = truncate([1], [2, 3], [4], 4)
    assert ids == [1, 2, 3, 4] and not info.truncated


@pytest.mark.parametrize("prefix, suffix", [([0] * 11, [1]), ([0], [1] * 10)])
def test_truncate_refuses_to_cut_kept_parts(prefix: list[int], suffix: list[int]) -> None:
    with pytest.raises(PromptTooLong, match="cut into the candidates"):
        truncate(prefix, [5] * 50, suffix, 20)


def _item(**kw) -> dict:
    return {"messages": [{"role": "user", "content": "q"}], "candidates": ["a", "b"],
            "mode": "judge", **kw}


@pytest.mark.parametrize("bad, match", [
    (_item(candidates=["a"]), "at least 2"),
    (_item(candidates=["a", "  "]), "candidates\\[1\\] must not be empty"),
    (_item(messages=[{"role": "user", "content": ""}]), "message content must not be empty"),
    (_item(messages=[]), "at least 1"),
    (_item(mode="vote"), "scalar"),
    (_item(mode="scalar", swap=True), "swap only apply to mode='judge'"),
    (_item(mode="scalar", flux={"mode": "sparse"}), "flux only apply"),
    (_item(candidates=["a", "b", "c"], judge_prompt="pairwise"), "exactly 2"),
    (_item(max_tokens=0), "greater than or equal to 1"),
])
def test_invalid_items(bad: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        RewardRequest(items=[bad])


def test_default_judge_prompt() -> None:
    assert RewardItem(**_item()).resolved_judge_prompt == "pairwise"
    assert RewardItem(**_item(candidates=["a", "b", "c"])).resolved_judge_prompt == "ranking"
    assert RewardItem(**_item(judge_prompt="ranking")).resolved_judge_prompt == "ranking"
