"""evaluation.quality_run: the context length and default policies of a serve-and-eval run, and
the combined summary of a working folder that a timeout left incomplete."""

from __future__ import annotations

import csv
import json

import pytest

from evaluation.policies import parse_policies
from evaluation.quality_run import (
    default_policies,
    main,
    model_max_position_embeddings,
    serve_max_model_len,
    summarize_folder,
)
from evaluation.results import JsonlStore


def test_max_model_len_is_the_longest_length_capped_by_the_model():
    assert serve_max_model_len([4096, 16384, 8192], 32768) == 16384
    assert serve_max_model_len([4096, 16384], 8192) == 8192
    assert serve_max_model_len([512], None) == 512
    with pytest.raises(ValueError):
        serve_max_model_len([], 4096)
    with pytest.raises(ValueError):
        serve_max_model_len([0], 4096)


def test_max_position_embeddings_from_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    assert model_max_position_embeddings(tmp_path) == 4096
    (tmp_path / "config.json").write_text(json.dumps({"text_config":
                                                      {"max_position_embeddings": 8192}}))
    assert model_max_position_embeddings(tmp_path) == 8192
    (tmp_path / "config.json").write_text("{}")
    assert model_max_position_embeddings(tmp_path) is None


def test_default_policies_parse_and_include_auto_only_with_a_router():
    with_router = [p.name for p in parse_policies(default_policies(auto=True))]
    without = [p.name for p in parse_policies(default_policies(auto=False))]
    assert with_router[:3] == ["full", "auto", "sparse"]
    assert "auto" not in without and without[:2] == ["full", "sparse"]
    for kind in ("streaming", "snapkv", "calidrop"):
        assert [n for n in with_router if n.startswith(kind)] == [
            f"{kind}:{b}" for b in (256, 512, 1024, 2048)]
    assert len(with_router) == 3 + 12


def _record(task, length, policy, index, score):
    return {"task": task, "length": length, "policy": policy, "index": index,
            "error": None, "score": score, "prompt_tokens": length - 128,
            "attention_work_saved": None, "references": ["1"], "prediction": "1"}


def test_summarize_folder_keeps_this_runs_items_and_lists_incomplete_cells(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    store = JsonlStore(work / "results.jsonl",
                       lambda r: (r["task"], r["length"], r["policy"], r["index"]))
    for i in range(2):  # length 512 complete for both policies
        store.append(_record("niah_single_1", 512, "full", i, 1.0))
        store.append(_record("niah_single_1", 512, "snapkv:256", i, float(i == 0)))
    store.append(_record("niah_single_1", 1024, "full", 0, 1.0))  # 1024: cut by a timeout
    store.append(_record("niah_single_1", 512, "full", 5, 0.0))  # another run's sample
    store.append(_record("local_copy", 512, "full", 0, 0.0))  # a task not asked for
    store.append(_record("niah_single_1", 512, "streaming:256", 0, 0.0))  # a policy not asked

    rows, table = summarize_folder(work, out, ["niah_single_1"], [512, 1024], 2,
                                   ["full", "snapkv:256"], ["length 1K: stopped"])
    acc = {(r["task"], r["length"], r["policy"]): (r["accuracy"], r["samples"]) for r in rows}
    assert acc[("niah_single_1", 512, "full")] == (100.0, 2)
    assert acc[("niah_single_1", 512, "snapkv:256")] == (50.0, 2)
    assert acc[("niah_single_1", 1024, "full")] == (100.0, 1)
    assert ("niah_single_1", 1024, "snapkv:256") not in acc
    assert not any(task == "local_copy" or policy.startswith("streaming")
                   for task, _, policy in acc)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["incomplete_cells"] == ["niah_single_1 1024 full: 1 of 2"]
    assert summary["policies_measured"] == ["full", "snapkv:256"]
    assert "length 1K: stopped" in summary["notes"]
    with (out / "summary.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (out / "accuracy_vs_length.png").stat().st_size > 0
    assert (out / "results.jsonl").read_text() == (work / "results.jsonl").read_text()
    assert "snapkv:256" in table.splitlines()[0]


def test_cli_summarize_with_nothing_finished(tmp_path, capsys):
    assert main(["summarize", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o"),
                 "--tasks", "local", "--lengths", "1K", "--samples", "2",
                 "--policies", "full"]) == 0
    assert "no finished items" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["rows"] == []
