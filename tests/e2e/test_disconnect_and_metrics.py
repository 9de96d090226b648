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


MAX_TOKENS = 1900  # as long as the shared server's 2048-token context allows
ATTEMPTS = 5


def _drop_stream_after_five_chunks(server) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count forever."}],
            "max_tokens": MAX_TOKENS, "min_tokens": MAX_TOKENS, "temperature": 0,
            "stream": True}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{server.base_url}/v1/chat/completions", json=body,
                           headers=server.auth) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()  # kept open: breaking out of it would close the stream
            received = 0
            while received < 5:
                received += next(lines).startswith("data: ")
        # leaving the block closes the connection mid-stream


def test_dropped_stream_is_aborted_in_the_engine(server):
    def drained() -> bool:
        ready = httpx.get(f"{server.base_url}/ready", timeout=10).json()
        return ready["unfinished_requests"] == 0

    def counts() -> tuple[float, float, float]:
        return (server.metric("fluxserve:requests_disconnected_total", endpoint="chat",
                              stream="true"),
                server.metric("vllm:request_success_total", finished_reason="length"),
                server.metric("vllm:generation_tokens_total"))

    # On a busy 2-core machine the engine can occasionally finish all its tokens before the
    # client is scheduled to hang up; such a run completes normally and says nothing about
    # aborts, so it is repeated (a bounded number of times).
    for _ in range(ATTEMPTS):
        assert _wait_until(drained, 60)
        disconnected_before, completed_before, tokens_before = counts()

        _drop_stream_after_five_chunks(server)

        assert _wait_until(drained, 60), "engine request not aborted after the client left"
        assert _wait_until(lambda: server.metric("vllm:num_requests_running") == 0, 60)
        disconnected, completed, tokens = counts()
        if disconnected == disconnected_before and completed - completed_before == 1:
            continue  # it ran to the end before the hang-up reached the server
        assert disconnected - disconnected_before == 1
        assert completed == completed_before
        # it stopped before its last token: the abort, not completion, ended it
        assert tokens - tokens_before < MAX_TOKENS
        return
    pytest.fail(f"the engine finished all {MAX_TOKENS} tokens before the client hung up, "
                f"{ATTEMPTS} times out of {ATTEMPTS}")


def test_client_that_gives_up_on_a_non_streamed_reply_aborts_it(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count forever."}],
            "max_tokens": MAX_TOKENS, "min_tokens": MAX_TOKENS, "temperature": 0}

    def aborted_count() -> float:
        return server.metric("fluxserve:requests_disconnected_total", endpoint="chat",
                             stream="false")

    for _ in range(ATTEMPTS):
        before = aborted_count()
        tokens_before = server.metric("vllm:generation_tokens_total")
        rejected_before = server.metric("fluxserve:requests_rejected_total")
        # 1900 tokens take seconds; the client stops waiting after one. A client starved of
        # CPU for longer than the whole generation gets its reply instead: try again.
        try:
            reply = httpx.post(f"{server.base_url}/v1/chat/completions", json=body,
                               headers=server.auth, timeout=httpx.Timeout(10, read=0.3))
        except httpx.ReadTimeout:
            pass
        else:
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["finish_reason"] == "length"
            continue

        def aborted(before: float = before) -> bool:
            ready = httpx.get(f"{server.base_url}/ready", timeout=10).json()
            return ready["unfinished_requests"] == 0 and aborted_count() == before + 1

        assert _wait_until(aborted, 60), "the engine request outlived its client"
        assert server.metric("vllm:generation_tokens_total") - tokens_before < MAX_TOKENS
        # vLLM answers the vanished client with an error body; that is not a rejected request
        assert server.metric("fluxserve:requests_rejected_total") == rejected_before
        return
    pytest.fail(f"the reply arrived before the client's 0.3 s read timeout, {ATTEMPTS} times "
                f"out of {ATTEMPTS}")


def test_metrics_export_vllm_and_fluxserve_series(server):
    server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    for name in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:kv_cache_usage_perc", "vllm:num_requests_running",
                 "fluxserve:requests_total"):
        assert name in text, name
    assert server.metric("fluxserve:requests_total") >= 1


def test_vllm_series_are_the_chat_engines(server):
    """The reward engine shares the process: vLLM's process-wide Prometheus series must stay the
    chat engine's (the reward engine logs none; a second vLLM logger would replace them)."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    names = {line.split('model_name="', 1)[1].split('"', 1)[0]
             for line in text.splitlines()
             if line.startswith("vllm:") and 'model_name="' in line}
    assert names == {MODEL}
    before = server.metric("vllm:request_success_total", model_name=MODEL)
    resp = httpx.post(f"{server.base_url}/v1/completions", headers=server.auth, timeout=60,
                      json={"model": MODEL, "prompt": "Hello", "max_tokens": 2})
    assert resp.status_code == 200
    assert _wait_until(lambda: server.metric("vllm:request_success_total",
                                             model_name=MODEL) == before + 1, 10)
