"""`usage.fluxserve` and the per-request speedup metrics, through the HTTP API of the shared
server: the numbers equal the accounting of the routing and eviction the engine reported."""

from __future__ import annotations

import json

import httpx
import pytest

from attention_backends.flux.accounting import (
    AttentionShape,
    EngineReport,
    EvictionReport,
    RoutingReport,
    sequence_work,
)
from server.default_model import HEAD_DIM, NUM_HEADS, NUM_KV_HEADS, NUM_LAYERS
from tests.e2e.conftest import MODEL

pytestmark = pytest.mark.e2e

SHAPE = AttentionShape(NUM_LAYERS, NUM_HEADS, HEAD_DIM)
LONG_PROMPT = " ".join(f"item{i}" for i in range(400))  # ~1,300 tokens with the smoke model
KV_BYTES_PER_TOKEN = NUM_LAYERS * 2 * NUM_KV_HEADS * HEAD_DIM * 2  # K and V, bf16, all layers


def _chat(server, max_tokens: int = 8, **extra):
    return server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": LONG_PROMPT}], max_tokens=max_tokens,
        temperature=0, extra_body=extra)


def _fluxserve(response) -> dict:
    return response.usage.model_extra["fluxserve"]


def test_a_plain_request_saves_nothing(server):
    r = _chat(server)
    acct = _fluxserve(r)
    expected = sequence_work(SHAPE, r.usage.prompt_tokens, r.usage.completion_tokens)
    assert acct == expected.to_usage()
    assert acct["sparse_layers"] == 0 and acct["total_layers"] == NUM_LAYERS
    assert acct["kv_tokens_kept"] == acct["prompt_tokens"] == r.usage.prompt_tokens
    assert acct["attention_flops_saved"] == 0 and acct["kv_bytes_saved"] == 0
    assert acct["attention_work_saved"] == 0.0


def test_a_sparse_request_runs_every_layer_sparse_and_saves_its_exact_flops(server):
    r = _chat(server, max_tokens=6, flux={"mode": "sparse", "sink": 4, "window": 64})
    acct = _fluxserve(r)
    assert acct["sparse_layers"] == acct["total_layers"] == NUM_LAYERS
    routing = RoutingReport((True,) * NUM_LAYERS, sink=4, window=64)
    expected = sequence_work(SHAPE, r.usage.prompt_tokens, r.usage.completion_tokens,
                             EngineReport(routing))
    assert acct == expected.to_usage()
    assert acct["attention_flops_saved"] > 0.9 * acct["attention_flops_dense"]
    assert acct["kv_bytes_saved"] == 0  # sparse layers keep their KV


def test_a_calidrop_request_keeps_its_budget_and_reports_what_it_freed(server):
    freed_before = server.metric('fluxserve:kv_blocks_freed_total{policy="calidrop"}')
    r = _chat(server, max_tokens=10, kv_policy={"name": "calidrop", "budget": 256})
    acct = _fluxserve(r)
    prompt = r.usage.prompt_tokens
    assert acct["kv_tokens_kept"] == 256 <= prompt == acct["prompt_tokens"]
    assert acct["sparse_layers"] == 0
    assert acct["attention_flops_saved"] > 0
    # the bytes of the blocks the scheduler freed: whole blocks of the gap [256, prompt)
    blocks = server.metric('fluxserve:kv_blocks_freed_total{policy="calidrop"}') - freed_before
    assert blocks > 0 and acct["kv_bytes_saved"] % (blocks * KV_BYTES_PER_TOKEN) == 0
    block_size = acct["kv_bytes_saved"] // (blocks * KV_BYTES_PER_TOKEN)
    assert blocks == prompt // block_size - -(-256 // block_size)
    eviction = EvictionReport(256, prompt, acct["kv_bytes_saved"])
    assert acct == sequence_work(SHAPE, prompt, r.usage.completion_tokens,
                                 EngineReport(None, eviction)).to_usage()


def test_the_final_stream_chunk_carries_it_and_the_metrics_add_up(server):
    labels = {"flux_mode": "sparse", "kv_policy": "calidrop"}
    names = ("fluxserve:request_prefill_seconds_count",
             "fluxserve:request_decode_seconds_per_token_count",
             "fluxserve:attention_flops_dense_total", "fluxserve:attention_flops_saved_total",
             "fluxserve:kv_bytes_saved_total")
    before = {n: server.metric(n, **labels) for n in names}
    body = {"model": MODEL, "messages": [{"role": "user", "content": LONG_PROMPT}],
            "max_tokens": 8, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "flux": {"mode": "sparse", "sink": 8, "window": 128},
            "kv_policy": {"name": "calidrop", "budget": 200, "window": 16}}
    chunks = []
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body,
                      headers=server.auth, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[len("data: "):]))
    final = chunks[-1]
    assert final["choices"] == [] and all("fluxserve" not in (c.get("usage") or {})
                                          for c in chunks[:-1])
    usage = final["usage"]
    acct = usage["fluxserve"]
    assert acct["sparse_layers"] == NUM_LAYERS and acct["kv_tokens_kept"] == 200
    expected = sequence_work(
        SHAPE, usage["prompt_tokens"], usage["completion_tokens"],
        EngineReport(RoutingReport((True,) * NUM_LAYERS, 8, 128),
                     EvictionReport(200, usage["prompt_tokens"], acct["kv_bytes_saved"])))
    assert acct == expected.to_usage()
    after = {n: server.metric(n, **labels) for n in names}
    assert after["fluxserve:request_prefill_seconds_count"] == before[
        "fluxserve:request_prefill_seconds_count"] + 1
    assert after["fluxserve:request_decode_seconds_per_token_count"] == before[
        "fluxserve:request_decode_seconds_per_token_count"] + 1
    for name, key in (("fluxserve:attention_flops_dense_total", "attention_flops_dense"),
                      ("fluxserve:attention_flops_saved_total", "attention_flops_saved"),
                      ("fluxserve:kv_bytes_saved_total", "kv_bytes_saved")):
        assert after[name] - before[name] == pytest.approx(acct[key], rel=1e-12), name


def test_completions_with_n_sum_over_the_sequences(server):
    r = server.client().completions.create(
        model=MODEL, prompt=LONG_PROMPT, max_tokens=4, n=2, temperature=0.8, seed=1,
        extra_body={"flux": {"mode": "layers", "sparse_layers": [0, 2], "window": 32}})
    acct = r.usage.model_extra["fluxserve"]
    assert acct["total_layers"] == 2 * NUM_LAYERS and acct["sparse_layers"] == 4
    assert acct["prompt_tokens"] == 2 * r.usage.prompt_tokens
    assert acct["attention_flops_saved"] > 0


def test_metrics_expose_the_time_histograms_by_mode_and_policy(server):
    _chat(server, max_tokens=3, flux={"mode": "layers", "sparse_layers": [1]})
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    for name in ("fluxserve:request_prefill_seconds_bucket",
                 "fluxserve:request_decode_seconds_per_token_bucket"):
        lines = [ln for ln in text.splitlines() if ln.startswith(name + "{")]
        assert any('flux_mode="layers"' in ln and 'kv_policy="none"' in ln for ln in lines), name
        assert any('flux_mode="full"' in ln for ln in lines), name
    assert server.metric("fluxserve:attention_flops_saved_total", flux_mode="layers") > 0
