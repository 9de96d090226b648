"""Prometheus metrics of KV eviction.

Plain prometheus_client objects at module level: under the server's multiprocess mode
(PROMETHEUS_MULTIPROC_DIR) they are written from the engine-core process (blocks freed, tokens
evicted, bytes per request) and the worker (calibration checks and hits) and collected by the API
process's /metrics.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

KV_TOKENS_EVICTED = Counter(
    "fluxserve:kv_tokens_evicted",
    "Prompt tokens evicted per layer and KV head, summed over compressed requests.",
    ["policy"],
)
KV_BLOCKS_FREED = Counter(
    "fluxserve:kv_blocks_freed",
    "KV-cache blocks returned to vLLM's pool by eviction (before the request finished).",
    ["policy"],
)
KV_COMPRESSED_REQUESTS = Counter(
    "fluxserve:kv_compressed_requests",
    "Requests whose prompt KV was compressed (counted when their blocks are freed).",
    ["policy"],
)
CALIBRATION_CHECKS = Counter(
    "fluxserve:calibration_checks",
    "Decode (query token, layer, query head) triples that tested cos(q, q_ref) >= tau.",
)
CALIBRATION_HITS = Counter(
    "fluxserve:calibration_hits",
    "Calibration checks that passed, so the evicted set's (o_E, lse_E) was merged.",
)
KV_BYTES_PER_REQUEST = Histogram(
    "fluxserve:kv_bytes_per_request",
    "KV-cache bytes a request held when it finished (all layers; whole blocks).",
    ["policy"],
    buckets=tuple(float(1 << k) for k in range(14, 38, 2)),
)
