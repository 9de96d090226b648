"""`fluxserve eval` end to end against the real server (embedded smoke-test model, whose random
weights score about zero: this checks the pipeline and its files, not the score), and the
`POST /tokenize` endpoint it uses for exact lengths."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import MODEL, Server

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_tokenize_endpoint(server: Server):
    url = f"{server.base_url}/tokenize"
    assert httpx.post(url, json={"model": MODEL, "prompt": "hi"}, timeout=30).status_code == 401
    reply = httpx.post(url, json={"model": MODEL, "prompt": "hello world"}, headers=server.auth,
                       timeout=30).json()
    assert reply["count"] == len(reply["tokens"]) > 1 and reply["max_model_len"] == 2048
    chat = httpx.post(url, headers=server.auth, timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hello world"}]}).json()
    assert chat["count"] > reply["count"]  # the chat template's tokens
    bad = httpx.post(url, json={"model": "nope", "prompt": "x"}, headers=server.auth, timeout=30)
    assert bad.status_code == 404 and "error" in bad.json()


def _eval(server: Server, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "server.cli", "eval", "--url", server.base_url,
           "--api-key", server.api_key, "--tasks", "niah_single_1", "vt", "local_copy",
           "--lengths", "1K", "4K", "--samples", "1", "--concurrency", "8", "--no-progress",
           "--policies", "full", "sparse", "calidrop:256", "sparse+snapkv:512", "auto",
           "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_eval_end_to_end_and_resume(server: Server, tmp_path: Path):
    out = tmp_path / "eval"
    first = _eval(server, out)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "lengths counted with the server's tokenizer (POST /tokenize)" in first.stderr
    # the table: one row per task and length, a column per policy that the server accepts
    header = next(line for line in first.stdout.splitlines() if line.startswith("task"))
    assert header.split() == ["task", "length", "full", "sparse", "calidrop:256",
                              "sparse+snapkv:512"]
    assert "skipped policy auto" in first.stdout  # no Flux router on this server
    assert "skipped lengths [4096]" in first.stdout  # over --max-model-len 2048

    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 4
    assert all(r["error"] is None and 0.0 <= r["score"] <= 1.0 for r in records)
    assert all(0.98 * 1024 <= r["prompt_tokens"] + tokens <= 1024 for r in records
               for tokens in [{"niah_single_1": 128, "vt": 30, "local_copy": 32}[r["task"]]])
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["task"], r["policy"]) for r in rows} >= {("vt", "calidrop:256"),
                                                       ("average", "full")}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["policies"]["sparse+snapkv:512"] == {
        "flux": {"mode": "sparse"}, "kv_policy": {"name": "snapkv", "budget": 512}}
    assert (out / "accuracy_vs_length.png").read_bytes()[:4] == b"\x89PNG"

    # an interrupted run: drop the last 5 finished items, rerun, only those are sent again
    kept = (out / "results.jsonl").read_text().splitlines()[:-5]
    (out / "results.jsonl").write_text("\n".join(kept) + "\n")
    second = _eval(server, out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "7 of 12 items already done" in second.stderr
    assert len((out / "results.jsonl").read_text().splitlines()) == 12
