"""Flux metrics (Prometheus, ``fluxserve:`` prefix), recorded in the worker process.

They are plain prometheus_client objects: with PROMETHEUS_MULTIPROC_DIR set before the engine
starts (the server does), samples from every process reach the API process's /metrics. Only
tensor-parallel rank 0 records, so a request counts once.

Prefill time runs from the first step that schedules the request to the start of the step after
the one that completed its prompt; decode time from there to the step that sees it finished.
Both are measured at worker step boundaries and labelled with the request's flux mode.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from attention_backends.flux.parallel import is_first_rank

_TIME_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                 60.0, 120.0, 300.0)

SPARSE_LAYER_FRACTION = Histogram(
    "fluxserve:sparse_layer_fraction",
    "Per request: fraction of layers running sparse (sink + window) attention.",
    ["mode"], buckets=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
)
ROUTER_SECONDS = Histogram(
    "fluxserve:router_time_seconds",
    "Per routed layer and step: pooling, TP all-reduce and router MLPs of the pending requests.",
    buckets=(1e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5),
)
PREFILL_SECONDS = Histogram(
    "fluxserve:request_prefill_time_seconds",
    "Per request: prefill time measured in the worker, by flux mode.", ["mode"],
    buckets=_TIME_BUCKETS,
)
DECODE_SECONDS = Histogram(
    "fluxserve:request_decode_time_seconds",
    "Per request: decode time measured in the worker, by flux mode.", ["mode"],
    buckets=_TIME_BUCKETS,
)
REQUESTS = Counter("fluxserve:flux_requests", "Requests seen by the Flux backend, by mode.",
                   ["mode"])
OPTION_STEPS = Counter(
    "fluxserve:steps_with_options",
    "Engine steps with Flux or KV-policy rows, by the CUDA graph they ran in: full (our FULL "
    "graph of the decode batch), piecewise (our attention eager between vLLM's piecewise "
    "graphs) or none (no graph: routing steps). Engines with CUDA graphs only.",
    ["cuda_graph"])


def observe_option_step(cuda_graph: str) -> None:
    """Count a step with our rows by its graph: ``full``, ``piecewise`` or ``none``."""
    if is_first_rank():
        OPTION_STEPS.labels(cuda_graph).inc()


def observe_router_step(seconds: float) -> None:
    if is_first_rank():
        ROUTER_SECONDS.observe(seconds)


def observe_prefill(st, seconds: float) -> None:
    if not is_first_rank():
        return
    PREFILL_SECONDS.labels(st.mode).observe(seconds)
    REQUESTS.labels(st.mode).inc()
    if st.sparse is not None and st.sparse.numel():
        SPARSE_LAYER_FRACTION.labels(st.mode).observe(float(st.sparse.float().mean()))


def observe_finished(st, now: float) -> None:
    if not is_first_rank() or st.prefill_done_at is None:
        return
    DECODE_SECONDS.labels(st.mode).observe(max(0.0, now - st.prefill_done_at))
