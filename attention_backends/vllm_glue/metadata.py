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

import operator
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
    # Both parts may be shared by consecutive steps of one batch (``build_step_metadata``):
    # read-only, apart from ``RoutingStep.set_decisions`` on a step that routes rows (never
    # shared).
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
    metrics).

    A step over the same requests as the step before, in the same order, reuses that step's
    routing and eviction parts (and their device copies) when it would build equal ones
    (``_StepReuse``): a run of decode steps of one batch builds them once."""
    global _REUSE
    runtime = runtime if runtime is not None else get_runtime()
    qsl = query_start_loc_cpu.tolist()
    qsl_np = query_start_loc_cpu.numpy()
    q_len = qsl_np[1:num_rows + 1] - qsl_np[:num_rows]
    # the rows' request keys and computed tokens, or None with a padding row
    head = rows[:num_rows]
    row_keys: list[tuple] | None = None
    computed: np.ndarray | None = None
    if num_rows and len(head) == num_rows:
        try:
            row_keys = list(map(_ROW_KEY, head))
            computed = np.fromiter(map(_COMPUTED, head), dtype=np.int64, count=num_rows)
        except AttributeError:  # None: a padding row
            row_keys = None
    reuse = _REUSE
    if row_keys is not None and reuse is not None and reuse.holds_for(
            registry, runtime, (num_layers, block_size, none_when_dense), row_keys, computed,
            q_len):
        if reuse.parts is None:
            return None
        return StepMetadata(*reuse.parts, reuse.bounds.max_kv_tokens(computed + q_len, q_len),
                            qsl)

    routing = build_routing_step(num_rows, qsl, rows, registry, num_layers,
                                 none_when_full=none_when_dense)
    eviction = build_eviction_step(num_rows, qsl, rows, block_size, runtime)
    step = bounds = None
    if routing is None and eviction.active:  # a compressed row, nothing sparse
        routing = build_routing_step(num_rows, qsl, rows, registry, num_layers)
    if routing is not None:  # else: dense (e.g. a planned request's prompt before its last chunk)
        if computed is None:
            computed = np.fromiter((rows[i].num_computed if i < len(rows) and rows[i] is not None
                                    else -1 for i in range(num_rows)),
                                   dtype=np.int64, count=num_rows)
            seq = np.where(computed >= 0, computed + q_len, 0)  # padding rows see nothing
        else:
            seq = computed + q_len
        bounds = _KVBounds(routing, eviction)
        step = StepMetadata(routing, eviction, bounds.max_kv_tokens(seq, q_len), qsl)
    _REUSE = None
    if row_keys is not None:
        _REUSE = _StepReuse.after(step, bounds, registry, runtime,
                                  (num_layers, block_size, none_when_dense), row_keys, computed,
                                  q_len)
    return step


class _KVBounds:
    """What ``max_kv_tokens`` needs from a step's routing and eviction parts, as numpy."""

    def __init__(self, routing: RoutingStep, eviction: EvictionStep) -> None:
        self.sparse = routing.sparse.numpy()  # [L, R] bool
        self.sink_window = routing.sink.numpy().astype(np.int64) + routing.window.numpy()
        # keys a compressed row does not see: its gap [kept_end, gap_end)
        self.gap = None
        if eviction.kept_end is not None:
            kept_end, gap_end = eviction.kept_end.numpy(), eviction.gap_end.numpy()
            self.gap = np.where(kept_end > 0, np.maximum(gap_end - kept_end, 0),
                                0).astype(np.int64)

    def max_kv_tokens(self, seq: np.ndarray, q_len: np.ndarray) -> list[int]:
        """Per layer, the most keys any row can see, from each row's ``seq`` (its sequence
        length after this step; 0 on padding) and ``q_len`` ([R] int64 each): ``seq``, or at
        most ``sink + window + q_len`` on sparse rows, less the gap on compressed rows. Rows
        still to be routed count as full, so the bound holds whatever the routers decide.
        Returns ``L`` host ints."""
        # numpy on these few-element arrays: a microsecond an operation, torch's are ten
        if not seq.shape[0]:
            return [0] * self.sparse.shape[0]
        # q_len may be int32 (the host query_start_loc's dtype): the sums below are int64
        full = seq - self.gap if self.gap is not None else seq
        sa = np.minimum(full, self.sink_window + q_len)
        return np.maximum.reduce(np.where(self.sparse, sa, full), axis=1).tolist()


_ROW_KEY = operator.attrgetter("req_id", "prompt_len", "extra_args")
_COMPUTED = operator.attrgetter("num_computed")


class _StepReuse:
    """A step's routing and eviction parts, kept for the next steps of the same batch.

    ``build_routing_step`` and ``build_eviction_step`` depend on a row's tokens only through
    whether its prompt is done before the step and whether it completes in the step, given the
    registry and the runtime's plans (their docstrings; ``registry.version`` and
    ``runtime.plan_version`` say when those change). So a step whose rows are the same requests
    in the same order (equal request ids, prompt lengths and ``extra_args``), each with its
    prompt done or not as before, builds parts equal to the kept ones when neither step
    completes a prompt or has a row still to be routed. Only ``max_kv_tokens`` and
    ``query_start_loc`` are then the step's own."""

    def __init__(self, parts: tuple[RoutingStep, EvictionStep] | None,
                 bounds: _KVBounds | None, registry: FluxRegistry, runtime: KVPolicyRuntime,
                 key: tuple, row_keys: list[tuple], prompt_len: np.ndarray,
                 prefilling: np.ndarray) -> None:
        self.parts, self.bounds, self.key, self.row_keys = parts, bounds, key, row_keys
        # held, not just compared by id: a new registry could take a dropped one's id
        self.registry, self.runtime = registry, runtime
        self.prompt_len = prompt_len
        self.prefilling = prefilling.tobytes()
        self.any_prefilling = bool(np.count_nonzero(prefilling))

    @classmethod
    def after(cls, step: StepMetadata | None, bounds: _KVBounds | None,
              registry: FluxRegistry, runtime: KVPolicyRuntime, config: tuple,
              row_keys: list[tuple], computed: np.ndarray,
              q_len: np.ndarray) -> _StepReuse | None:
        """What the steps after ``step`` (just built from the rows ``row_keys`` / ``computed``,
        no padding) may reuse, or None when they may not reuse it."""
        states = registry.states
        if any(states[k[0]].sparse is None for k in row_keys):  # a row still to be routed
            return None
        prompt_len = np.fromiter((k[1] for k in row_keys), dtype=np.int64,
                                 count=len(row_keys))
        prefilling = computed < prompt_len
        if np.count_nonzero(prefilling & (computed + q_len >= prompt_len)):  # a prompt completes
            return None
        key = (registry.version, runtime.plan_version, *config)
        return cls((step.routing, step.eviction) if step is not None else None, bounds,
                   registry, runtime, key, row_keys, prompt_len, prefilling)

    def holds_for(self, registry: FluxRegistry, runtime: KVPolicyRuntime, config: tuple,
                  row_keys: list[tuple], computed: np.ndarray, q_len: np.ndarray) -> bool:
        """Whether the step of these rows (no padding) builds parts equal to the kept ones."""
        if registry is not self.registry or runtime is not self.runtime \
                or self.key != (registry.version, runtime.plan_version, *config) \
                or row_keys != self.row_keys:
            return False
        prefilling = computed < self.prompt_len
        if not self.any_prefilling:
            return not np.count_nonzero(prefilling)
        return prefilling.tobytes() == self.prefilling and not np.count_nonzero(
            prefilling & (computed + q_len >= self.prompt_len))  # no prompt completes


_REUSE: _StepReuse | None = None


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


# -- CUDA graph modes. vLLM's FULL graphs replay the kernels they captured, which were dense
# ones (their capture runs with no request rows): a step that needs our kernels must not replay
# one. Our own FULL graphs (``graph_inputs``: uniform decode batches, captured with our kernel
# reading persistent buffers) may replay such a step, unless a row compresses its KV in it
# (compression runs Python after the layer's attention). And a step that routes ``auto``
# requests must run no graph at all, since the router runs Python inside the graph pieces
# (``routing_hooks``). The model runner hook (``vllm_private``) asks ``graph_constraint``
# before vLLM picks the step's graph mode.

EAGER = "eager"  # no CUDA graph: an ``auto`` request is routed in this step
NO_FULL = "no_full"  # piecewise graphs at most: our attention runs between the pieces
OUR_FULL = "our_full"  # our FULL graph where the batch has one (uniform decode), else NO_FULL


def graph_constraint(rows: Sequence[BatchRow | None], num_layers: int,
                     block_size: int | None, registry: FluxRegistry | None = None,
                     runtime: KVPolicyRuntime | None = None,
                     q_lens: Sequence[int] | None = None) -> str | None:
    """What the step whose rows are ``rows`` (batch order; None: padding) allows: ``EAGER``,
    ``NO_FULL``, ``OUR_FULL`` or None (any mode). Not None for a superset of the steps whose
    ``build_step_metadata`` is not None: every row of a mode other than ``full`` (``auto``
    routing still to come: ``EAGER``) or with an eviction plan whose prompt is complete or
    completes in this step (``q_lens``: the rows' scheduled tokens; None: any planned row
    counts, and counts as compressing). ``NO_FULL`` when a row compresses its KV in this step
    (its prompt completes), else ``OUR_FULL``. Requests without options cost a few dict
    lookups each."""
    registry = registry if registry is not None else get_registry()
    runtime = runtime if runtime is not None else get_runtime()
    needs_ours = compresses = False
    for i, r in enumerate(rows):
        if r is None:
            continue
        st = registry.resolve(r.req_id, r.extra_args, r.prompt_len, num_layers)
        if st.sparse is None:
            return EAGER
        if st.mode != "full":  # as build_routing_step: any non-full request keeps the metadata
            needs_ours = True
        policy = (r.extra_args or {}).get(KV_KEY) if block_size else None
        if policy and runtime.plan_for(r.req_id, policy, r.prompt_len, block_size) is not None:
            q_len = q_lens[i] if q_lens is not None and i < len(q_lens) else None
            if q_len is None:
                needs_ours = compresses = True
            elif r.num_computed + int(q_len) >= r.prompt_len:
                needs_ours = True
                compresses = compresses or r.num_computed < r.prompt_len
    if not needs_ours:
        return None
    return NO_FULL if compresses else OUR_FULL


# the graph the step being built replays: None (piecewise or none), VLLM_FULL (vLLM's FULL
# graph: dense kernels) or OUR_FULL (ours, also while it is warmed up and captured)
VLLM_FULL = "vllm_full"
_GRAPH: str | None = None


def note_graph(kind: str | None) -> None:
    """Record which FULL graph the step about to be built replays (the runner hook): None,
    ``VLLM_FULL`` or ``OUR_FULL``."""
    global _GRAPH
    _GRAPH = kind


def graph_kind() -> str | None:
    """What ``note_graph`` recorded for the step being built."""
    return _GRAPH


def check_graph_mode(step: StepMetadata | None) -> None:
    """Raise ``RuntimeError`` if a step with our metadata is about to replay one of vLLM's FULL
    graphs: its captured dense kernels would ignore every mask and eviction bound (a bug of
    ``graph_constraint``: fail the step rather than return wrong tokens)."""
    if step is not None and _GRAPH == VLLM_FULL:
        raise RuntimeError("fluxserve: a step with Flux or KV-policy rows was dispatched to a "
                           "FULL CUDA graph; graph_constraint missed a row")
