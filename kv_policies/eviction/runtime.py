"""Worker-side eviction: selection, calibration state and in-place compaction.

The attention backend owns when things happen; it calls, per worker process
(``get_runtime()``):

- ``plan_for`` while building each step's metadata (``kv_policies.eviction.step``), for the
  request's eviction plan (computed once per request).
- ``compress_layer`` once per (request, layer), right after that layer's attention for the step
  in which the request's prompt completes. The policy selects the kept slots and, if it
  calibrates (CaliDrop, ``policies.calidrop``), summarises the evicted ones; then the runtime
  compacts the kept KV into slots ``[0, budget)``. From then on the backend masks slots
  ``[plan.kept_end, plan.gap_end)``.
- ``calibration_for`` before a layer's attention, to get the batched calibration inputs for
  ``ops.paged_attention`` (``calidrop.batched_calibration``; None when no request of the batch
  is calibrated at that layer).
- ``record_hits`` after it, with the ``calib_hits`` the kernel returned (counts for metrics).
- ``release`` when a request finishes, is aborted or is preempted (a preempted request
  recomputes its prompt and is compressed again, so nothing must survive it). ``retain_only``
  drops the state of every request not in a given set (a safety net against leaks).

All of it is deterministic: the selection depends only on the request's KV, its queries and its
``kv_policy`` dict, the same inputs the PyTorch reference uses.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attention_backends.kernels import ops
from attention_backends.kernels.kv_layout import KVLayout
from kv_policies.eviction.base import PolicyOptions, SelectionInputs
from kv_policies.eviction.options import parse_kv_policy
from kv_policies.eviction.plan import EvictionPlan, checked_options, plan_for_options
from kv_policies.eviction.policies.calidrop import LayerCalibration, batched_calibration
from kv_policies.eviction.registry import get_policy

# Flush the on-device hit counters to Prometheus every this many record_hits calls, so decode
# steps do not synchronise with the device once per layer just to count.
_FLUSH_EVERY = 512
# Sum the hit tensors of this many record_hits calls in one reduction (a layer's call on the
# GPU would otherwise cost two small kernel launches: a sum and an add).
_REDUCE_EVERY = 32


@dataclass
class RequestKVState:
    plan: EvictionPlan
    policy: str
    # layer -> the policy's summary of its evicted slots (``KVPolicy.summarize_evicted``)
    layers: dict[int, LayerCalibration] = field(default_factory=dict)
    compressed_layers: set[int] = field(default_factory=set)


class KVPolicyRuntime:
    """Per-worker eviction state of the running requests (see the module docstring)."""

    def __init__(self) -> None:
        self._states: dict[str, RequestKVState] = {}
        self._checks = 0
        self._hits: Tensor | None = None
        self._pending_hits: list[Tensor] = []  # not yet summed into _hits
        self._hit_calls = 0
        # req_id -> (prompt_len, block_size, kv_policy, options, plan): a plan depends only on
        # what the request fixed, and the step metadata asks for it every step.
        self._plans: dict[str, tuple[int, int, dict, PolicyOptions | None,
                                     EvictionPlan | None]] = {}
        # Changes whenever a cached plan is added, replaced or dropped: a step's metadata built
        # at one version holds for the same rows at that version.
        self.plan_version = 0
        # layer -> ((device, request ids, layer version), its ops.Calibration, the batch rows
        # that have a summary): what calibration_for and record_hits need for a batch
        self._calib_cache: dict[int, tuple] = {}
        # layer -> changes whenever compress_layer writes a summary of that layer (release
        # clears the cache instead): a kept calibration holds while its version is unchanged
        self._layer_versions: dict[int, int] = {}

    # ------------------------------------------------------------------ eviction

    def plan_for(self, req_id: str, kv_policy: dict, prompt_len: int,
                 block_size: int) -> EvictionPlan | None:
        """``plan.eviction_plan`` of a running request, computed once per request."""
        return self._cached(req_id, kv_policy, prompt_len, block_size)[4]

    def options_for(self, req_id: str, kv_policy: dict, prompt_len: int,
                    block_size: int) -> PolicyOptions | None:
        """The request's validated options (``plan.checked_options``), computed once."""
        return self._cached(req_id, kv_policy, prompt_len, block_size)[3]

    def planned(self, req_id: str, kv_policy: dict, prompt_len: int,
                block_size: int) -> tuple[EvictionPlan | None, PolicyOptions | None]:
        """``(plan_for(...), options_for(...))`` in one look-up."""
        cached = self._cached(req_id, kv_policy, prompt_len, block_size)
        return cached[4], cached[3]

    def _cached(self, req_id: str, kv_policy: dict, prompt_len: int, block_size: int):
        cached = self._plans.get(req_id)
        if cached is None or cached[0] != prompt_len or cached[1] != block_size \
                or cached[2] != kv_policy:
            opts = checked_options(kv_policy)
            cached = (prompt_len, block_size, kv_policy, opts,
                      plan_for_options(opts, prompt_len, block_size))
            self._plans[req_id] = cached
            self.plan_version += 1
        return cached

    def compress_layer(self, req_id: str, layer_idx: int, plan: EvictionPlan,
                       policy: PolicyOptions | dict,
                       q_chunk: Tensor, kv_cache: Tensor, block_row: Tensor, scale: float,
                       q_end: int | None = None, kv_layout: KVLayout | None = None) -> None:
        """Evict one layer of one request in place.

        ``q_chunk [n, Hq, D]``: the queries (RoPE applied) of this request's tokens in the step
        that completed its prompt; row ``q_end - 1`` (default: the last row) must be the query
        of prompt position ``plan.gap_end - 1`` (a recompute after preemption may carry output
        tokens after it). The observation window is the last ``min(window, q_end)`` of those
        rows: when a chunk boundary falls inside the window, fewer observation queries are used.
        ``kv_cache [num_blocks, Hkv, block_size, 2*D]`` is this layer's cache (``kv_layout``:
        where K/V lie in its blocks, None: slot-major) and ``block_row`` the request's
        block-table row, both already holding the whole prompt's KV. ``policy``
        is the request's options model (a ``kv_policy`` dict is validated first: raises
        ``pydantic.ValidationError`` if invalid).
        """
        opts = policy if isinstance(policy, PolicyOptions) else parse_kv_policy(policy)
        impl = get_policy(opts.name)
        if not impl.evicts:
            return
        prompt_len = plan.gap_end
        q_end = q_chunk.shape[0] if q_end is None else q_end
        n_obs = min(impl.observation_window(opts), q_end)
        q_obs = q_chunk[q_end - n_obs:q_end]
        inputs = SelectionInputs(q_obs=q_obs, kv_cache=kv_cache, block_row=block_row,
                                 prompt_len=prompt_len, scale=scale, options=opts,
                                 kv_layout=kv_layout)
        kept = impl.select(inputs)

        state = self._states.get(req_id)
        if state is not None and layer_idx in state.compressed_layers:
            # This layer is compressed again: a recompute after preemption whose release we
            # did not see. Start over rather than mix two evictions.
            state = None
        if state is None or state.plan != plan:
            state = RequestKVState(plan=plan, policy=impl.name)
            self._states[req_id] = state
        # Must run before compaction overwrites the slots it reads.
        summary = impl.summarize_evicted(inputs, kept, q_chunk[q_end - 1])
        # the request's state or summary of this layer changes: rebuild its calibration
        self._layer_versions[layer_idx] = self._layer_versions.get(layer_idx, 0) + 1
        if summary is not None:
            state.layers[layer_idx] = summary
        ops.compact_kv(kv_cache, block_row, kept, kv_layout)
        state.compressed_layers.add(layer_idx)

    def is_compressed(self, req_id: str, layer_idx: int) -> bool:
        state = self._states.get(req_id)
        return state is not None and layer_idx in state.compressed_layers

    # ------------------------------------------------------------------ decode-time calibration

    def calibration_for(self, layer_idx: int, req_ids: Sequence[str], device):
        """Batched ``ops.Calibration`` for the requests of a batch, in batch order, or None
        (``calidrop.batched_calibration``).

        Kept per layer while the batch's requests and their summaries of the layer are the
        same (a run of decode steps of the same requests): the layer's tensors are built once
        for the run, not once per layer and step, and a step looks no request up."""
        key = (str(device), tuple(req_ids), self._layer_versions.get(layer_idx, 0))
        cached = self._calib_cache.get(layer_idx)
        if cached is not None and cached[0] == key:
            return cached[1]
        rows = [self._layer_state(r, layer_idx) for r in req_ids]
        calib = batched_calibration(rows, device)
        self._calib_cache[layer_idx] = (key, calib, [i for i, c in enumerate(rows)
                                                     if c is not None])
        return calib

    def calibrated_rows(self, layer_idx: int, req_ids: Sequence[str]) -> int:
        """How many of the batch's requests (``req_ids``, batch order) have a calibration
        summary of the layer (host only: from ``calibration_for``'s cache when it holds)."""
        cached = self._calib_cache.get(layer_idx)
        if cached is not None and cached[0][1:] == (tuple(req_ids),
                                                    self._layer_versions.get(layer_idx, 0)):
            return len(cached[2])
        return sum(self._layer_state(r, layer_idx) is not None for r in req_ids)

    def record_hit_count(self, hits: Tensor, checks: int) -> None:
        """Add ``hits`` (an int64 device scalar, read later without a host sync) calibration
        hits out of ``checks`` (token, q head) checks: the hits of a decode step replayed from a
        CUDA graph, summed over its layers on the device (``vllm_glue.graph_inputs``)."""
        self._checks += checks
        self._hits = hits if self._hits is None else self._hits + hits
        self._hit_calls += 1
        if self._hit_calls >= _FLUSH_EVERY:
            self.flush_metrics()

    def record_hits(self, layer_idx: int, req_ids: Sequence[str], hits: Tensor | None,
                    query_start_loc: Sequence[int] | Tensor | None = None) -> None:
        """Count calibration checks and hits of one layer's attention call.

        ``hits [T, Hq]`` bool as returned by ``ops.paged_attention``; ``query_start_loc``
        (``[S+1]``, host-side preferred) maps tokens to requests (default: one token each).
        Only calibrated requests' tokens count as checks. ``hits`` is read later (summed with
        other calls' on the device, without a host sync): the caller must not write it again.
        """
        if hits is None:
            return
        # the batch rows with a summary of this layer: kept by calibration_for for this batch
        cached = self._calib_cache.get(layer_idx)
        if cached is not None and cached[0][1:] == (tuple(req_ids),
                                                    self._layer_versions.get(layer_idx, 0)):
            calibrated = cached[2]
        else:
            calibrated = [i for i, r in enumerate(req_ids)
                          if self._layer_state(r, layer_idx) is not None]
        if query_start_loc is None:
            tokens = len(calibrated)
        else:
            qsl = (query_start_loc.tolist() if isinstance(query_start_loc, Tensor)
                   else query_start_loc)
            tokens = sum(int(qsl[i + 1]) - int(qsl[i]) for i in calibrated)
        hq = int(hits.shape[1])
        self._checks += hq * tokens
        if self._pending_hits and self._pending_hits[0].shape[1] != hq:
            self._reduce_hits()  # one concatenation takes one width
        self._pending_hits.append(hits)
        if len(self._pending_hits) >= _REDUCE_EVERY:
            self._reduce_hits()
        self._hit_calls += 1
        if self._hit_calls >= _FLUSH_EVERY:
            self.flush_metrics()

    def _reduce_hits(self) -> None:
        pending, self._pending_hits = self._pending_hits, []
        if not pending:
            return
        total = torch.cat(pending).sum()
        self._hits = total if self._hits is None else self._hits + total

    def flush_metrics(self) -> None:
        from kv_policies.eviction import metrics

        self._reduce_hits()
        if self._checks:
            metrics.CALIBRATION_CHECKS.inc(self._checks)
        if self._hits is not None:
            hits = int(self._hits.item())
            if hits:
                metrics.CALIBRATION_HITS.inc(hits)
        self._checks, self._hits, self._hit_calls = 0, None, 0

    # ------------------------------------------------------------------ lifetime

    def release(self, req_id: str) -> None:
        """Drop a finished, aborted or preempted request's state (a no-op if it has none)."""
        if self._plans.pop(req_id, None) is not None:
            self.plan_version += 1
        if req_id in self._states:
            self._calib_cache.clear()
        if self._states.pop(req_id, None) is not None:
            self.flush_metrics()

    def retain_only(self, req_ids: Iterable[str]) -> None:
        keep = set(req_ids)
        for r in [r for r in {*self._states, *self._plans} if r not in keep]:
            self.release(r)

    def state_of(self, req_id: str) -> RequestKVState | None:
        return self._states.get(req_id)

    def num_requests(self) -> int:
        return len(self._states)

    def _layer_state(self, req_id: str, layer_idx: int) -> LayerCalibration | None:
        state = self._states.get(req_id)
        return None if state is None else state.layers.get(layer_idx)


_RUNTIME: KVPolicyRuntime | None = None
_LOCK = threading.Lock()


def get_runtime() -> KVPolicyRuntime:
    """The worker process's runtime (created on first use)."""
    global _RUNTIME
    if _RUNTIME is None:
        with _LOCK:
            if _RUNTIME is None:
                _RUNTIME = KVPolicyRuntime()
    return _RUNTIME
