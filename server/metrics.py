"""Prometheus metrics: vLLM's registry (all processes, via multiprocess mode) plus fluxserve's."""

from __future__ import annotations

from prometheus_client import Counter

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
    "Generation requests the serving layer answered with an error, by endpoint and status.",
    ["endpoint", "status"],
)
DISCONNECTED = Counter(
    "fluxserve:requests_disconnected_total",
    "Generation requests whose client went away before the response was complete (their engine "
    "requests are aborted), by endpoint and whether they streamed.",
    ["endpoint", "stream"],
)


def render_latest() -> tuple[bytes, str]:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    return generate_latest(get_prometheus_registry()), CONTENT_TYPE_LATEST
