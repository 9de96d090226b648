"""Flux routing and KV eviction through the HTTP API, visible in /metrics."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import MODEL

pytestmark = pytest.mark.e2e

LONG_PROMPT = " ".join(f"item{i}" for i in range(400))  # ~1,300 tokens with the smoke model


def _chat(server, max_tokens: int = 8, **extra):
    r = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": LONG_PROMPT}], max_tokens=max_tokens,
        temperature=0, extra_body=extra)
    return r


def test_calidrop_request_frees_kv_blocks_and_calibrates(server):
    freed = server.metric('fluxserve:kv_blocks_freed_total{policy="calidrop"}')
    evicted = server.metric('fluxserve:kv_tokens_evicted_total{policy="calidrop"}')
    checks = server.metric("fluxserve:calibration_checks_total")
    r = _chat(server, max_tokens=12, kv_policy={"name": "calidrop", "budget": 256})
    assert r.usage.prompt_tokens > 1000
    assert r.usage.completion_tokens == 12
    assert server.metric('fluxserve:kv_blocks_freed_total{policy="calidrop"}') > freed
    # every layer and KV head drops prompt_len - budget tokens
    assert server.metric('fluxserve:kv_tokens_evicted_total{policy="calidrop"}') - evicted >= (
        r.usage.prompt_tokens - 256)
    assert server.metric("fluxserve:calibration_checks_total") > checks


def test_budget_covering_the_prompt_changes_nothing(server):
    plain = _chat(server).choices[0].message.content
    roomy = _chat(server, kv_policy={"name": "calidrop", "budget": 2048}).choices[0].message.content
    assert roomy == plain


def test_sparse_with_window_covering_the_prompt_equals_full(server):
    full = _chat(server, flux={"mode": "full"}).choices[0].message.content
    sparse = _chat(server, flux={"mode": "sparse", "sink": 4, "window": 2048})
    assert sparse.choices[0].message.content == full


def test_sparse_routing_is_counted(server):
    before = server.metric('fluxserve:sparse_layer_fraction_count{mode="layers"}')
    _chat(server, max_tokens=2, flux={"mode": "layers", "sparse_layers": [0, 2], "window": 64})
    assert server.metric('fluxserve:sparse_layer_fraction_count{mode="layers"}') == before + 1
    # two of the smoke model's four layers ran sparse
    assert server.metric('fluxserve:sparse_layer_fraction_sum{mode="layers"}') >= 0.5
