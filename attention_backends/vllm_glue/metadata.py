"""Per-step metadata of the fluxserve backends (CPU and GPU alike), composed from its owners' parts.

- ``routing``: a ``flux.step.RoutingStep``, built by the Flux code (and updated by it during the
  forward, when ``auto`` requests are routed);
- ``eviction``: a ``kv_policies.eviction.step.EvictionStep``, built by the KV-policy code;
- what the attention kernel needs from both: ``max_kv_tokens`` and the host ``query_start_loc``.

The model runner's hook (``vllm_private``) publishes the step's rows (``publish_batch``) just
before vLLM builds the attention metadata, because vLLM's metadata builders only see
``CommonAttentionMetadata``, which has no request ids; the builders read them back
(``step_metadata_for``). Both run in the worker, one step at a time, so a module-level slot is
enough.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from attention_backends.flux.request_state import BatchRow, FluxRegistry, get_registry
from attention_backends.flux.step import RoutingStep, build_routing_step
from kv_policies.eviction.options import EXTRA_ARGS_KEY as KV_KEY
from kv_policies.eviction.runtime import KVPolicyRuntime, get_runtime
from kv_policies.eviction.step import EvictionStep, build_eviction_step


@dataclass
class StepMetadata:
    routing: RoutingStep
    eviction: EvictionStep
    # per layer, an upper bound on the keys any row sees (host ints): sizes the split-KV grid
    max_kv_tokens: list[int]
    # the step's query_start_loc as host ints (reading the device tensor would sync)
    query_start_loc: list[int]


def build_step_metadata(num_rows: int, query_start_loc_cpu: torch.Tensor,
                        rows: Sequence[BatchRow | None], registry: FluxRegistry,
                        num_layers: int, block_size: int | None = None,
                        runtime: KVPolicyRuntime | None = None, *,
                        none_when_dense: bool = False) -> StepMetadata | None:
    """The step's metadata. ``query_start_loc_cpu [num_rows + 1]`` int32 on the host; ``rows``
    in batch order (None or missing: padding); ``block_size`` None: no KV eviction.

    ``none_when_dense``: None when every row runs full attention at every layer and none reads
    or writes compressed KV in this step (the requests are still registered, for their
    metrics)."""
    qsl = query_start_loc_cpu.tolist()
    routing = build_routing_step(num_rows, qsl, rows, registry, num_layers,
                                 none_when_full=none_when_dense)
    eviction = build_eviction_step(num_rows, qsl, rows, block_size,
                                   runtime if runtime is not None else get_runtime())
    if routing is None:
        if not eviction.active:  # e.g. a planned request's prompt chunks before its last
            return None
        routing = build_routing_step(num_rows, qsl, rows, registry, num_layers)
    return StepMetadata(routing, eviction, _max_kv_tokens(rows, qsl, num_rows, routing, eviction),
                        qsl)


def _max_kv_tokens(rows: Sequence[BatchRow | None], qsl: list[int], num_rows: int,
                   routing: RoutingStep, eviction: EvictionStep) -> list[int]:
    """Per layer, the most keys any row can see: seq_len, or sink + window + q_len on sparse
    rows, or kept + tail on compressed rows. Rows still to be routed count as full, so the bound
    holds whatever the routers decide."""
    # numpy on these few-element arrays: a microsecond an operation, torch's are ten
    q_len = np.diff(np.asarray(qsl[:num_rows + 1], dtype=np.int64))
    seq = np.fromiter((rows[i].num_computed if i < len(rows) and rows[i] is not None else -1
                       for i in range(num_rows)), dtype=np.int64, count=num_rows)
    seq = np.where(seq >= 0, seq + q_len, 0)
    full = seq
    if eviction.kept_end is not None:
        kept_end, gap_end = eviction.kept_end.numpy(), eviction.gap_end.numpy()
        full = np.where(kept_end > 0, np.minimum(seq, kept_end + seq - gap_end), seq)
    sa = np.minimum(full, routing.sink.numpy() + routing.window.numpy().astype(np.int64) + q_len)
    if not num_rows:
        return [0] * routing.sparse.shape[0]
    return np.where(routing.sparse.numpy(), sa[None], full[None]).max(1).tolist()


_BATCH: list[BatchRow | None] | None = None


def publish_batch(rows: list[BatchRow | None] | None) -> None:
    """Set (or clear, with None) the rows of the step whose metadata is being built."""
    global _BATCH
    _BATCH = rows


def num_layers(vllm_config) -> int:
    return int(vllm_config.model_config.hf_text_config.num_hidden_layers)


def step_metadata_for(cm, vllm_config, *, none_when_dense: bool = False,
                      layers: int | None = None) -> StepMetadata | None:
    """The step's ``StepMetadata`` from vLLM's ``CommonAttentionMetadata`` (both backends);
    ``none_when_dense`` as in ``build_step_metadata``; ``layers``: the model's layer count
    (``num_layers``, microseconds a step when read from the config each time)."""
    layers = num_layers(vllm_config) if layers is None else layers
    return build_step_metadata(cm.num_reqs, cm.query_start_loc_cpu, _BATCH or [], get_registry(),
                               layers, vllm_config.cache_config.block_size,
                               none_when_dense=none_when_dense)


# -- CUDA graph modes. A FULL graph replays the kernels it captured, which were dense ones (its
# capture runs with no request rows): a step that needs our kernels must not replay one. And a
# step that routes ``auto`` requests must run no graph at all, since the router runs Python
# inside the graph pieces (``routing_hooks``). The model runner hook (``vllm_private``) asks
# ``graph_constraint`` before vLLM picks the step's graph mode.

EAGER = "eager"  # no CUDA graph: an ``auto`` request is routed in this step
NO_FULL = "no_full"  # piecewise graphs at most: our attention runs between the pieces


def graph_constraint(rows: Sequence[BatchRow | None], num_layers: int,
                     block_size: int | None, registry: FluxRegistry | None = None,
                     runtime: KVPolicyRuntime | None = None,
                     q_lens: Sequence[int] | None = None) -> str | None:
    """What the step whose rows are ``rows`` (batch order; None: padding) allows: ``EAGER``,
    ``NO_FULL`` or None (any mode). A superset of the steps whose ``build_step_metadata`` is not
    None: every row of a mode other than ``full`` (``auto`` routing still to come: ``EAGER``) or
    with an eviction plan whose prompt is complete or completes in this step (``q_lens``: the
    rows' scheduled tokens; None: any planned row counts). Requests without options cost a few
    dict lookups each."""
    registry = registry if registry is not None else get_registry()
    runtime = runtime if runtime is not None else get_runtime()
    needs_ours = False
    for i, r in enumerate(rows):
        if r is None:
            continue
        st = registry.resolve(r.req_id, r.extra_args, r.prompt_len, num_layers)
        if st.sparse is None:
            return EAGER
        if needs_ours:
            continue
        if st.mode != "full":  # as build_routing_step: any non-full request keeps the metadata
            needs_ours = True
            continue
        policy = (r.extra_args or {}).get(KV_KEY) if block_size else None
        if policy and runtime.plan_for(r.req_id, policy, r.prompt_len, block_size) is not None:
            q_len = q_lens[i] if q_lens is not None and i < len(q_lens) else None
            needs_ours = q_len is None or r.num_computed + int(q_len) >= r.prompt_len
    return NO_FULL if needs_ours else None


_FULL_GRAPH = False


def note_full_graph(full: bool) -> None:
    """Record whether the step about to be built replays a FULL CUDA graph (the runner hook)."""
    global _FULL_GRAPH
    _FULL_GRAPH = full


def check_graph_mode(step: StepMetadata | None) -> None:
    """Raise ``RuntimeError`` if a step with our metadata is about to replay a FULL graph: its
    captured dense kernels would ignore every mask and eviction bound (a bug of
    ``graph_constraint``: fail the step rather than return wrong tokens)."""
    if step is not None and _FULL_GRAPH:
        raise RuntimeError("fluxserve: a step with Flux or KV-policy rows was dispatched to a "
                           "FULL CUDA graph; graph_constraint missed a row")
