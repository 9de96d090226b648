"""Prometheus metrics: vLLM's registry (all processes, via multiprocess mode) plus fluxserve's."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

# The CLI points PROMETHEUS_MULTIPROC_DIR at a fresh directory before this module (or vLLM) is
# imported, so every process (API, engine core, workers) writes samples where /metrics reads them.

# Counters of what the front end saw; engine-side metrics (routing, eviction) are defined next to
# the code that measures them and reach /metrics through the same multiprocess registry.
REQUESTS = Counter(
    "fluxserve:requests_total",
    "Generation requests accepted by the front end, by endpoint and policy.",
    ["endpoint", "flux_mode", "kv_policy"],
)
REJECTED = Counter(
    "fluxserve:requests_rejected_total",
    "Generation and reward requests answered with an error status, whichever layer answered "
    "(body limit, auth, admission, validation, the engine), by endpoint and status.",
    ["endpoint", "status"],
)
DISCONNECTED = Counter(
    "fluxserve:requests_disconnected_total",
    "Generation and reward requests whose client went away before the response was complete "
    "(their engine requests are aborted), by endpoint (chat, completions, reward) and whether "
    "they streamed.",
    ["endpoint", "stream"],
)

# Per request, recorded when it finishes (server.accounting), labelled by its `flux.mode` and
# `kv_policy.name` (bounded: the mode and policy names, or "other").
_LABELS = ["flux_mode", "kv_policy"]
PREFILL_SECONDS = Histogram(
    "fluxserve:request_prefill_seconds",
    "Per request: from its first scheduled step to its first token (vLLM's engine-core "
    "timestamps, as vllm:request_prefill_time_seconds), by flux mode and KV policy.",
    _LABELS,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
             300.0),
)
DECODE_SECONDS_PER_TOKEN = Histogram(
    "fluxserve:request_decode_seconds_per_token",
    "Per request with at least two tokens: from its first to its last token, divided by the "
    "tokens after the first, by flux mode and KV policy.",
    _LABELS,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
# FLOPs as in attention_backends/flux/accounting.py: 4 * query heads * head_dim per visible
# (query, key) pair and layer (FlashAttention-2, Dao 2023, sec. 4.1, with exact causal counts).
ATTENTION_FLOPS_DENSE = Counter(
    "fluxserve:attention_flops_dense",
    "Attention FLOPs that dense attention without eviction would have spent on the finished "
    "requests (4 * heads * head_dim per visible query-key pair and layer; prefill and decode).",
    _LABELS,
)
ATTENTION_FLOPS_SAVED = Counter(
    "fluxserve:attention_flops_saved",
    "Attention FLOPs the finished requests' sparse layers and KV eviction saved against dense "
    "attention (spent = dense - saved).",
    _LABELS,
)
KV_BYTES_SAVED = Counter(
    "fluxserve:kv_bytes_saved",
    "KV-cache bytes the finished requests' eviction gave back to vLLM's pool (whole blocks in "
    "the evicted gap, all layers).",
    _LABELS,
)


def render_latest() -> tuple[bytes, str]:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    return generate_latest(get_prometheus_registry()), CONTENT_TYPE_LATEST
