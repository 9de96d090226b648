"""Full CUDA graphs for decode steps with Flux or KV-policy rows: the graph-safe inputs of our
decode kernel.

A FULL CUDA graph replays the kernels of its capture with the same arguments: the same tensor
addresses, grid and constants, and no Python. vLLM keeps its own per-step inputs
(``query_start_loc``, ``seq_lens``, the block table, the slot mapping) in persistent buffers for
that; ``GraphInputs`` does the same for ours:

- ``masks [2 L + 2, R]`` int32: per layer and row ``sink`` (rows ``0..L-1``) and ``window``
  (rows ``L..2L-1``; 0 = full attention), then per row ``kept_end`` and ``gap_end``
  (``0, 0``: nothing evicted);
- per layer and row the CaliDrop calibration (``ops.Calibration``): ``q_ref [L, R, Hq, D]``
  (the model's dtype), ``o_e [L, R, Hq, D]`` and ``lse_e [L, R, Hq]`` float32, ``enabled
  [L, R]`` bool, ``tau [L, R]`` float32;
- ``hits [L, R, Hq]`` int8, where the kernel writes its calibration hits.

``R`` is ``max_rows``, the largest decode batch that takes these graphs. The metadata builder
writes a step's values into the first rows (``write_step``) before the graph replays; the
captured attention call (``attention.attend_graph``) reads its layer's views (``layer``) with
every option on (sink/window, gap, calibration: one kernel variant for every mix of modes), a
split count fixed by the block table's width (the longest sequence the engine takes) and no
host value of the step. Rows past the step's own (the graph's padding) have no query: the
kernel skips them.

A replayed step runs no Python in the attention layers, so its calibration hits are counted
after the fact: ``write_step`` of the next step (or ``flush_hits``) adds the last graph step's
hits, summed on the device, to the KV-policy runtime's counters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attention_backends.kernels import ops
from attention_backends.kernels.host import to_device
from attention_backends.vllm_glue.metadata import StepMetadata
from kv_policies.eviction.runtime import KVPolicyRuntime

# The largest decode batch that replays a FULL graph with our kernel (vLLM's capture sizes up
# to it get a second graph each): it bounds the calibration buffers (about 1.5 MB per layer at
# 64 rows for Llama-3.1-8B's 32 q heads of 128) and the start-up capture time. Larger decode
# batches keep piecewise graphs with our attention run eagerly.
MAX_GRAPH_ROWS = 64


@dataclass(frozen=True)
class LayerInputs:
    """One layer's views of the buffers for a graph of ``S`` rows (what the captured call
    reads): ``sink``, ``window``, ``kept_end``, ``gap_end`` ``[S]`` int32, the calibration
    (``ops.Calibration`` of ``S`` rows) and ``hits [S, Hq]`` int8."""

    sink: torch.Tensor
    window: torch.Tensor
    kept_end: torch.Tensor
    gap_end: torch.Tensor
    calibration: ops.Calibration
    hits: torch.Tensor


class GraphInputs:
    """Persistent per-step inputs of our decode kernel under FULL CUDA graphs (module
    docstring). Allocated once per metadata builder, before vLLM captures its graphs.

    ``num_layers``: the model's decoder layers; ``max_rows``: the largest batch (rows, one
    query token each); ``num_q_heads`` / ``head_size``: the attention layers' (per rank);
    ``q_dtype``: the queries' dtype (``q_ref``'s)."""

    def __init__(self, num_layers: int, max_rows: int, num_q_heads: int, head_size: int,
                 q_dtype: torch.dtype, device: torch.device | str) -> None:
        L, R, hq, d = num_layers, max_rows, num_q_heads, head_size  # noqa: N806
        self.num_layers, self.max_rows = L, R
        self.device = torch.device(device)
        f32 = dict(dtype=torch.float32, device=self.device)
        self.masks = torch.zeros(2 * L + 2, R, dtype=torch.int32, device=self.device)
        self.q_ref = torch.zeros(L, R, hq, d, dtype=q_dtype, device=self.device)
        self.o_e = torch.zeros(L, R, hq, d, **f32)
        self.lse_e = torch.full((L, R, hq), float("-inf"), **f32)
        self.enabled = torch.zeros(L, R, dtype=torch.bool, device=self.device)
        self.tau = torch.ones(L, R, **f32)
        self.hits = torch.zeros(L, R, hq, dtype=torch.int8, device=self.device)
        # what the buffers hold: the step parts last written (held, so their ids stay unique)
        # and, per layer, the runtime's ops.Calibration last copied (None: enabled is 0)
        self._masks_of: tuple | None = None
        self._calib_of: list[ops.Calibration | None] = [None] * L
        self._checks_of = [0] * L  # per layer, the checks of a step with _calib_of's rows
        self._pending_rows = 0  # query tokens of the last written step, hits still unread
        self._pending_checks = 0

    # ------------------------------------------------------------------ the captured call

    def layer(self, layer: int, num_rows: int) -> LayerInputs:
        """Views of ``layer``'s inputs for a graph of ``num_rows`` rows."""
        L, S = self.num_layers, num_rows  # noqa: N806
        calib = ops.Calibration(q_ref=self.q_ref[layer, :S], o_e=self.o_e[layer, :S],
                                lse_e=self.lse_e[layer, :S], enabled=self.enabled[layer, :S],
                                tau=self.tau[layer, :S])
        return LayerInputs(sink=self.masks[layer, :S], window=self.masks[L + layer, :S],
                           kept_end=self.masks[2 * L, :S], gap_end=self.masks[2 * L + 1, :S],
                           calibration=calib, hits=self.hits[layer, :S])

    # ------------------------------------------------------------------ each step

    def write_step(self, step: StepMetadata | None, num_rows: int,
                   runtime: KVPolicyRuntime) -> None:
        """Write the step's inputs for its ``num_rows`` rows (padding included; at most
        ``max_rows``) before its graph replays. ``step`` None (capture, warm-up, or a step of
        full-attention rows only): every row full attention, nothing evicted, no calibration.
        Copies only what changed since the last write: a run of decode steps of one batch
        copies nothing. Raises ``ValueError`` for more rows than the buffers hold."""
        if num_rows > self.max_rows:
            raise ValueError(f"{num_rows} rows > the graph buffers' {self.max_rows}")
        self.flush_hits(runtime)
        S, L = num_rows, self.num_layers  # noqa: N806
        routing = eviction = None
        if step is not None:
            routing, eviction = step.routing, step.eviction
        held = self._masks_of
        if held is None or held[0] is not routing or held[1] is not eviction or held[2] != S:
            host = torch.zeros(2 * L + 2, S, dtype=torch.int32)
            if routing is not None:
                sp = routing.sparse[:, :S]
                host[:L] = torch.where(sp, routing.sink[None, :S], 0)
                host[L:2 * L] = torch.where(sp, routing.window[None, :S], 0)
            if eviction is not None and eviction.kept_end is not None:
                host[2 * L] = eviction.kept_end[:S]
                host[2 * L + 1] = eviction.gap_end[:S]
            self.masks[:, :S].copy_(to_device(host, self.device))
            self._masks_of = (routing, eviction, S)
        self._write_calibration(step, S, runtime)

    def _write_calibration(self, step: StepMetadata | None, num_rows: int,
                           runtime: KVPolicyRuntime) -> None:
        S = num_rows  # noqa: N806
        if step is None or not step.eviction.has_plans:
            if any(c is not None for c in self._calib_of):
                self.enabled.zero_()
                self._calib_of = [None] * self.num_layers
                self._checks_of = [0] * self.num_layers
            return
        ids = step.routing.req_ids
        live: Sequence[str] = tuple((ids[r] if r < len(ids) else None) or "" for r in range(S))
        for li in range(self.num_layers):
            # the runtime keeps one ops.Calibration per layer while the batch and its summaries
            # are the same: the same object, already in the buffers
            calib = runtime.calibration_for(li, live, self.device)
            if calib is self._calib_of[li]:
                continue
            if calib is None:
                self.enabled[li, :S].zero_()
                self._checks_of[li] = 0
            else:
                self.q_ref[li, :S].copy_(calib.q_ref)
                self.o_e[li, :S].copy_(calib.o_e)
                self.lse_e[li, :S].copy_(calib.lse_e)
                self.enabled[li, :S].copy_(calib.enabled)
                if isinstance(calib.tau, torch.Tensor):
                    self.tau[li, :S].copy_(calib.tau)
                else:
                    self.tau[li, :S].fill_(float(calib.tau))
                # checks: (token, q head) pairs of calibrated rows (one token each)
                self._checks_of[li] = int(calib.q_ref.shape[1]) * runtime.calibrated_rows(
                    li, live)
            self._calib_of[li] = calib
        checks = sum(self._checks_of)
        if checks:
            # the step's query tokens come first; the graph's padding tokens belong to no row,
            # and their hits hold whatever an earlier step left there
            self._pending_rows = int(step.query_start_loc[S])
            self._pending_checks = checks

    def flush_hits(self, runtime: KVPolicyRuntime) -> None:
        """Add the hits of the last written step (if it had calibration) to ``runtime``'s
        counters: one device sum, no host sync. Call before the buffers are written again,
        after the step's graph was enqueued."""
        if not self._pending_rows:
            return
        total = self.hits[:, :self._pending_rows].sum(dtype=torch.int64)
        runtime.record_hit_count(total, self._pending_checks)
        self._pending_rows = self._pending_checks = 0

