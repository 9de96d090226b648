"""`fluxserve bench` end to end against the real server (embedded smoke-test model on CPU): the
sweep runs, every request has the exact prompt length and output length asked, no request hits
the prefix cache, and the table, CSVs and plots hold one row per (length, policy)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
LENGTHS = [256, 512]
POLICIES = ["full", "sparse+snapkv:128"]


def test_bench_end_to_end(server: Server, tmp_path: Path):
    out = tmp_path / "bench"
    hits_before = server.metric("vllm:prefix_cache_hits_total")
    queries_before = server.metric("vllm:prefix_cache_queries_total")
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "bench", "--url", server.base_url, "--api-key",
         server.api_key, "--lengths", *map(str, LENGTHS), "--policies", *POLICIES,
         "--output-tokens", "4", "--concurrency", "2", "--repeats", "2", "--warmup", "1",
         "--no-progress", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "prompts from the server's tokenizer (POST /tokenize)" in proc.stderr

    # the printed table: one line per (length, policy)
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("length"))
    assert [line.split()[:4] for line in lines[start + 2:start + 6]] == [
        [str(n), p, "4", "0"] for n in LENGTHS for p in POLICIES]

    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["length"]), r["policy"]) for r in rows] == [
        (n, p) for n in LENGTHS for p in POLICIES]
    for r in rows:
        assert float(r["prompt_tokens"]) == int(r["length"])  # exact lengths, per the server
        assert float(r["output_tokens"]) == 4  # ignore_eos: every request makes 4 tokens
        for column in ("ttft_ms_p50", "ttft_ms_p95", "tpot_ms_p50", "latency_ms_p50",
                       "ttft_speedup", "tpot_speedup"):
            assert float(r[column]) > 0, (r["length"], r["policy"], column)
    assert {float(r["ttft_speedup"]) for r in rows if r["policy"] == "full"} == {1.0}
    # read from each response's usage.fluxserve: dense saves nothing; SnapKV's 128-token budget
    # saves decode attention on these longer prompts
    assert {float(r["attention_work_saved"]) for r in rows if r["policy"] == "full"} == {0.0}
    assert all(float(r["attention_work_saved"]) > 0 for r in rows if r["policy"] != "full")

    with (out / "requests.csv").open() as f:
        requests = list(csv.DictReader(f))
    assert len(requests) == 2 * 2 * 3 * 2 and not any(r["error"] for r in requests)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fixed_output_length"] == ["ignore_eos", "min_tokens"]
    assert summary["policies"]["sparse+snapkv:128"] == {
        "flux": {"mode": "sparse"}, "kv_policy": {"name": "snapkv", "budget": 128}}
    for name in ("ttft_vs_length.png", "tpot_vs_length.png", "speedup.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name

    # prefix caching is on (queried by the `full` requests: a request with a KV policy does
    # not read the prefix cache), and distinct prompts never hit it
    full_tokens = 3 * 2 * sum(LENGTHS)  # (warm-up + 2 rounds) x 2 streams per length
    assert server.metric("vllm:prefix_cache_queries_total") - queries_before >= full_tokens
    assert server.metric("vllm:prefix_cache_hits_total") == hits_before
