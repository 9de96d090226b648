"""`fluxserve eval heads` on a tiny random Llama checkpoint made here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evaluation import heads
from tests.eval.conftest import save_tiny_llama

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), layers=3, heads=4, kv_heads=2,
                           max_position_embeddings=4096)


def test_profile_scores_every_head(checkpoint):
    result = heads.profile(checkpoint, ["niah_single_1", "niah_multikey_2"], [1024], 2,
                           progress=False)
    assert result.samples == 4
    scores = torch.tensor(result.scores)
    assert scores.shape == (3, 4)
    # a mass on part of the context: strictly between 0 and 1 for a random model
    assert bool(((scores > 0) & (scores < 1)).all())
    ranked = result.ranked()
    assert len(ranked) == 12
    assert [h["retrieval_score"] for h in ranked] == sorted(
        (h["retrieval_score"] for h in ranked), reverse=True)


def test_needle_tokens_follow_character_spans():
    offsets = [(0, 0), (0, 3), (3, 4), (4, 9), (9, 12)]
    assert heads._spans(offsets, [(3, 9)]) == [2, 3]
    assert heads._spans(offsets, [(10, 11)]) == [4]


def test_refuses_tasks_without_needles(checkpoint):
    with pytest.raises(ValueError, match="needle tasks"):
        heads.profile(checkpoint, ["cwe"], [1024], 1, progress=False)


def test_heads_command_writes_json_and_heatmap(checkpoint, tmp_path):
    out = tmp_path / "heads"
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "eval", "heads", str(checkpoint), "--lengths",
         "1024", "--samples", "1", "--tasks", "niah_single_2", "--out", str(out), "--top", "5"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "heads.json").read_text())
    assert (report["num_layers"], report["num_heads"], report["samples"]) == (3, 4, 1)
    assert len(report["ranked"]) == 12 and report["ranked"][0]["retrieval_score"] > 0
    assert (out / "heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "retrieval_score" in proc.stdout
