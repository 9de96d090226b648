"""Per-step Flux routing metadata, shared by the CPU and the GPU attention backends.

``build_flux_batch`` turns the batch the model runner published (request ids in batch order,
prompt lengths, tokens computed so far) and the request registry into a ``FluxBatch``:

- ``sparse [num_layers, num_rows]`` bool: the decision of every (layer, request) pair; rows of
  ``auto`` requests being routed in this step start False and are filled by the routers during
  the forward, each layer before its attention runs.
- ``sink`` / ``window [num_rows]`` int32: the request's SA shape (used where ``sparse``).
- ``route_rows``: the rows routed in this step, with their query-token span in the batch.

A row beyond the published batch (padding, dummy/profile runs) is full attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attention_backends.request_state import FluxRegistry, FluxRequestState, get_registry


@dataclass
class RouteRow:
    row: int
    req_id: str
    q_start: int
    q_len: int


@dataclass
class FluxBatch:
    req_ids: list[str | None]
    sparse: torch.Tensor  # [L, R] bool, CPU
    sink: torch.Tensor  # [R] int32, CPU
    window: torch.Tensor  # [R] int32, CPU
    route_rows: list[RouteRow]
    num_layers: int
    prompt_done: list[bool] = field(default_factory=list)  # prompt completes in this step
    # KV eviction (kv_policies): per row, the plan (None: untouched) and the policy dict;
    # kept_end/gap_end [R] int32 are set on rows compressed in an earlier step (else 0, 0).
    kv_plans: list = field(default_factory=list)
    kv_policies: list = field(default_factory=list)
    kept_end: torch.Tensor | None = None
    gap_end: torch.Tensor | None = None
    # rows whose prompt completes in this step and that have a plan:
    # (row, first token, end token in the batch, rows of the chunk up to the last prompt query)
    compress_rows: list[tuple[int, int, int, int]] = field(default_factory=list)
    # per layer, an upper bound on the keys any row sees (host ints): sizes the split-KV grid
    max_kv_tokens: list[int] = field(default_factory=list)
    # the step's query_start_loc as host ints (reading the device tensor would sync)
    query_start_loc: list[int] = field(default_factory=list)
    _device_windows: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _device_gaps: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def any_sparse(self, layer: int) -> bool:
        return bool(self.sparse[layer].any())

    def layer_window(self, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sink, window)`` int32 on ``device`` for this layer: window 0 (= full) on FA rows."""
        if not self.route_rows:
            # Every decision is known before the forward: copy all layers' masks to the device
            # once per step rather than once per layer (a host-to-device copy each).
            if self._device_windows is None or self._device_windows[0].device != device:
                self._device_windows = tuple(
                    torch.where(self.sparse, t[None], torch.zeros_like(t)[None]).to(device)
                    for t in (self.sink, self.window))
            return self._device_windows[0][layer], self._device_windows[1][layer]
        # Rows routed in this step get their decision layer by layer during the forward.
        w = torch.where(self.sparse[layer], self.window, torch.zeros_like(self.window))
        s = torch.where(self.sparse[layer], self.sink, torch.zeros_like(self.sink))
        return s.to(device), w.to(device)

    def eviction_bounds(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kept_end, gap_end)`` on ``device``, copied once per step."""
        if self._device_gaps is None or self._device_gaps[0].device != device:
            self._device_gaps = (self.kept_end.to(device), self.gap_end.to(device))
        return self._device_gaps


def build_flux_batch(num_rows: int, query_start_loc_cpu: torch.Tensor,
                     registry: FluxRegistry, num_layers: int,
                     extra_args_of=None, block_size: int | None = None) -> FluxBatch:
    """Build the step's routing metadata.

    ``extra_args_of(req_id) -> dict | None`` returns a request's ``SamplingParams.extra_args``
    (the runner's request table); it is asked once per request, the first time it is seen.
    """
    rows = registry.batch or []
    qsl = query_start_loc_cpu.tolist()
    req_ids: list[str | None] = []
    # Python lists, turned into tensors once at the end: per-element tensor writes cost
    # microseconds each, and this runs every step for every request.
    sink_l = [0] * num_rows
    window_l = [0] * num_rows
    kept_l = [0] * num_rows
    gap_l = [0] * num_rows
    known: list[tuple[int, torch.Tensor]] = []  # rows whose per-layer decisions are fixed
    route_rows: list[RouteRow] = []
    prompt_done: list[bool] = []
    kv_plans: list = [None] * num_rows
    kv_pols: list = [None] * num_rows
    compress_rows: list[tuple[int, int, int, int]] = []
    for i in range(num_rows):
        if i >= len(rows) or rows[i] is None:
            req_ids.append(None)
            prompt_done.append(False)
            continue
        r = rows[i]
        extra = extra_args_of(r.req_id) if extra_args_of else None
        st = registry.resolve(r.req_id, extra, r.prompt_len, num_layers)
        req_ids.append(r.req_id)
        q_len = qsl[i + 1] - qsl[i]
        done = r.num_computed < r.prompt_len <= r.num_computed + q_len
        prompt_done.append(done)
        if done and st.prefill_done_at is None:
            st.prompt_done_pending = True
        if block_size and extra and extra.get("kv_policy"):
            plan = _cached_plan(st, extra["kv_policy"], r.prompt_len, block_size)
            if plan is not None:
                kv_plans[i], kv_pols[i] = plan, extra["kv_policy"]
                if r.num_computed >= r.prompt_len:
                    kept_l[i], gap_l[i] = plan.kept_end, plan.gap_end
                elif done:
                    compress_rows.append((i, qsl[i], qsl[i + 1], r.prompt_len - r.num_computed))
        sink_l[i] = st.sink
        window_l[i] = st.window
        if st.sparse is not None:
            known.append((i, st.sparse))
        elif q_len > 0:
            route_rows.append(RouteRow(i, r.req_id, qsl[i], q_len))
    sparse = torch.zeros(num_layers, num_rows, dtype=torch.bool)
    if known:
        sparse[:, [i for i, _ in known]] = torch.stack([col for _, col in known], 1)
    sink = torch.tensor(sink_l, dtype=torch.int32)
    window = torch.tensor(window_l, dtype=torch.int32)
    kept_end = torch.tensor(kept_l, dtype=torch.int32)
    gap_end = torch.tensor(gap_l, dtype=torch.int32)
    has_kv = any(p is not None for p in kv_plans)
    max_kv = _max_kv_tokens(rows, qsl, num_rows, sparse, sink, window,
                            kept_end if has_kv else None, gap_end)
    return FluxBatch(req_ids, sparse, sink, window, route_rows, num_layers, prompt_done,
                     kv_plans, kv_pols, kept_end if has_kv else None,
                     gap_end if has_kv else None, compress_rows, max_kv, qsl)


def _max_kv_tokens(rows, qsl: list[int], num_rows: int, sparse: torch.Tensor,
                   sink: torch.Tensor, window: torch.Tensor, kept_end: torch.Tensor | None,
                   gap_end: torch.Tensor) -> list[int]:
    """Per layer, the most keys any row can see: seq_len, or sink + window + q_len on sparse
    rows, or kept + tail on compressed rows. Rows still to be routed count as full, so the bound
    holds whatever the routers decide."""
    q_lens = [qsl[i + 1] - qsl[i] for i in range(num_rows)]
    seq = torch.tensor([rows[i].num_computed + q_lens[i]
                        if i < len(rows) and rows[i] is not None else 0
                        for i in range(num_rows)], dtype=torch.int64)
    q_len = torch.tensor(q_lens, dtype=torch.int64)
    full = seq
    if kept_end is not None:
        full = torch.where(kept_end > 0, torch.minimum(seq, kept_end + seq - gap_end), seq)
    sa = torch.minimum(full, sink.long() + window.long() + q_len)
    bounds = torch.where(sparse, sa[None], full[None])  # [layers, rows]
    return bounds.amax(1).tolist() if num_rows else [0] * sparse.shape[0]


def _cached_plan(st: FluxRequestState, policy: dict, prompt_len: int, block_size: int):
    """The request's eviction plan, computed once: it depends only on what the request fixed."""
    key = (prompt_len, block_size)
    if st.kv_plan_key != key:
        st.kv_plan, st.kv_plan_key = _eviction_plan(policy, prompt_len, block_size), key
    return st.kv_plan


def _eviction_plan(policy: dict, prompt_len: int, block_size: int):
    try:
        from kv_policies.plan import eviction_plan
    except ImportError:
        return None
    return eviction_plan(policy, prompt_len, block_size)


def flux_batch_for_step(cm, vllm_config) -> FluxBatch:
    """The step's ``FluxBatch`` from vLLM's ``CommonAttentionMetadata`` (both backends)."""
    reg = get_registry()
    layers = int(vllm_config.model_config.hf_text_config.num_hidden_layers)
    return build_flux_batch(cm.num_reqs, cm.query_start_loc_cpu, reg, layers, reg.extra_args_of,
                            vllm_config.cache_config.block_size)
