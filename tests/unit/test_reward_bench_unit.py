"""The reward-bench evaluator's pieces that need no server: loading, buckets, scoring, output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from evaluation import reward_bench as rb


def test_length_buckets() -> None:
    assert rb.length_bucket("8k") == "8K"
    assert rb.length_bucket("128K") == "128K"
    assert rb.length_bucket(4096) == "4K"
    assert rb.length_bucket(4097) == "8K"
    assert rb.length_bucket(500_000) == "128K"
    with pytest.raises(ValueError):
        rb.length_bucket("12k")


def test_load_records(tmp_path: Path) -> None:
    path = tmp_path / "LongQA.jsonl"
    ctx = [{"role": "user", "content": "q"}]
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt_template": ctx, "chosen": "good", "rejected": "bad", "tasktype": "PairWise",
         "subtype": "same", "ctx_length_for_length": "4k"},
        {"prompt_template": ctx, "candidates": ["1", "2", "3"], "tasktype": "BestOfN",
         "subtype": "3", "ctx_length_for_length": "16k", "task": "Rank"},
    ]) + "\n\n")
    pair, rank = rb.load_records([path])
    assert (pair.task, pair.answers, pair.length) == ("LongQA", ["good", "bad"], "4K")
    assert (rank.task, rank.answers, rank.subtype) == ("Rank", ["1", "2", "3"], "3")
    path.write_text(json.dumps({"prompt_template": ctx, "tasktype": "PairWise"}) + "\n")
    with pytest.raises(ValueError, match="LongQA.jsonl:1"):
        rb.load_records([path])


def test_shuffle_is_seeded() -> None:
    recs = [rb.Record("t", "BestOfN", "4", "4K", [], ["a", "b", "c", "d"]) for _ in range(5)]
    assert rb.shuffled_orders(recs, 42) == rb.shuffled_orders(recs, 42)
    assert all(sorted(o) == [0, 1, 2, 3] for o in rb.shuffled_orders(recs, 7))


def test_scores_follow_longrm() -> None:
    # Shown order: answer 2 first, then 0 (the best), then 1.
    order = [2, 0, 1]
    judge = {"candidates": [{"index": 0, "rank": 3}, {"index": 1, "rank": 1},
                            {"index": 2, "rank": 2}]}
    assert rb.record_score(order, rb.predicted_ranks(judge, "judge")) == 1.0
    swapped = {"candidates": [{"index": 0, "rank": 2}, {"index": 1, "rank": 1},
                              {"index": 2, "rank": 3}]}
    assert rb.record_score(order, rb.predicted_ranks(swapped, "judge")) == pytest.approx(1 / 3)
    failed = {"candidates": [{"index": i, "rank": None} for i in range(3)]}
    assert rb.predicted_ranks(failed, "judge") is None
    assert rb.record_score(order, None) == 0.0
    scalar = {"candidates": [{"index": 0, "score": -1.0}, {"index": 1, "score": 2.5},
                             {"index": 2, "score": 0.3}]}
    assert rb.predicted_ranks(scalar, "scalar") == [2, 0, 1]


def test_summary_csv_and_chart(tmp_path: Path) -> None:
    pair = rb.Record("LongQA", "PairWise", "same", "8K", [], ["a", "b"])
    rank = rb.Record("Rank", "BestOfN", "3", "4K", [], ["a", "b", "c"])
    outcomes = [rb.Outcome(pair, 1.0), rb.Outcome(pair, 0.0, unparsed=True),
                rb.Outcome(rank, 1 / 3), rb.Outcome(rank, error="HTTP 400: too long")]
    rows = rb.summarize(outcomes)
    by = {(r.group, r.name, r.tasktype): r for r in rows}
    assert by[("task", "LongQA", "PairWise")].accuracy == 0.5
    assert by[("task", "LongQA", "PairWise")].unparsed == 1
    assert by[("length", "4K", "BestOfN")].errors == 1
    assert by[("overall", "all", "all")].accuracy == pytest.approx((1 + 0 + 1 / 3) / 3)
    assert [r.group for r in rows] == sorted((r.group for r in rows),
                                             key=["task", "length", "format", "overall"].index)
    assert "LongQA" in rb.format_table(rows)
    rb.write_csv(rows, tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text().splitlines()[0] == \
        "group,name,format,n,accuracy,unparsed,errors"
    rb.plot(rows, tmp_path / "r.png", "test")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert math.isnan(rb.Row("task", "x", "PairWise").accuracy)
