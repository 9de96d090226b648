"""A client that drops a stream aborts its engine request; metrics are exported."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.e2e.conftest import MODEL

pytestmark = pytest.mark.e2e


def _wait_until(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.25)
    return predicate()


def test_dropped_stream_is_aborted_in_the_engine(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count forever."}],
            "max_tokens": 1500, "min_tokens": 1500, "temperature": 0, "stream": True}
    tokens_before = server.metric("vllm:generation_tokens_total")
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{server.base_url}/v1/chat/completions", json=body,
                           headers=server.auth) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()  # kept open: breaking out of it would close the stream
            received = 0
            while received < 5:
                received += next(lines).startswith("data: ")
            running = httpx.get(f"{server.base_url}/ready", timeout=10).json()
            assert running["unfinished_requests"] >= 1  # ours, still generating
        # leaving the block closes the connection mid-stream

    def drained() -> bool:
        ready = httpx.get(f"{server.base_url}/ready", timeout=10).json()
        return ready["unfinished_requests"] == 0

    assert _wait_until(drained, 60), "engine request not aborted after the client disconnected"
    assert _wait_until(lambda: server.metric("vllm:num_requests_running") == 0, 60)
    # it stopped well before its 1500 tokens: the abort, not completion, ended it
    assert server.metric("vllm:generation_tokens_total") - tokens_before < 1500


def test_metrics_export_vllm_and_fluxserve_series(server):
    server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    for name in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:kv_cache_usage_perc", "vllm:num_requests_running",
                 "fluxserve:requests_total"):
        assert name in text, name
    assert server.metric("fluxserve:requests_total") >= 1
