"""The routing part of a step's attention metadata, built and updated by the Flux code only.

``build_routing_step`` turns the step's rows (request ids in batch order, prompt lengths, tokens
computed so far, ``extra_args``) and the request registry into a ``RoutingStep``:

- ``sparse [num_layers, num_rows]`` bool: the decision of every (layer, request) pair; rows of
  ``auto`` requests being routed in this step start False and get their decision from
  ``flux.routing.route_layer`` during the forward, each layer before its attention runs
  (``set_decisions``).
- ``sink`` / ``window [num_rows]`` int32: the request's SA shape (used where ``sparse``).
- ``route_rows``: the rows routed in this step, with their query-token span in the batch.

A row beyond the given rows (padding, dummy/profile runs) is full attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from attention_backends.flux.request_state import BatchRow, FluxRegistry
from attention_backends.kernels.host import to_device


@dataclass
class RouteRow:
    row: int
    req_id: str
    q_start: int
    q_len: int


@dataclass
class RoutingStep:
    req_ids: list[str | None]
    sparse: torch.Tensor  # [L, R] bool, CPU
    sink: torch.Tensor  # [R] int32, CPU
    window: torch.Tensor  # [R] int32, CPU
    route_rows: list[RouteRow]
    num_layers: int
    prompt_done: list[bool] = field(default_factory=list)  # prompt completes in this step
    _device_windows: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _any_sparse: list[bool] | None = field(default=None, repr=False)
    _device_layers: list[tuple[torch.Tensor, torch.Tensor]] | None = field(default=None,
                                                                           repr=False)

    def any_sparse(self, layer: int) -> bool:
        if self.route_rows:  # decisions still to come during the forward
            return bool(self.sparse[layer].any())
        # every decision is known: one reduction for the step (and the steps sharing it)
        if self._any_sparse is None:
            self._any_sparse = self.sparse.any(1).tolist()
        return self._any_sparse[layer]

    def layer_window(self, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sink, window)`` int32 on ``device`` for this layer: window 0 (= full) on FA rows."""
        if not self.route_rows:
            # Every decision is known before the forward: copy all layers' masks to the device
            # once per step rather than once per layer (a host-to-device copy each).
            if self._device_windows is None or self._device_windows[0].device != device:
                self._device_windows = tuple(
                    to_device(torch.where(self.sparse, t[None], torch.zeros_like(t)[None]),
                              device) for t in (self.sink, self.window))
                # each layer's views at once, rather than two new views per layer and step
                self._device_layers = list(zip(self._device_windows[0].unbind(0),
                                               self._device_windows[1].unbind(0), strict=True))
            return self._device_layers[layer]
        # Rows routed in this step get their decision layer by layer during the forward.
        w = torch.where(self.sparse[layer], self.window, torch.zeros_like(self.window))
        s = torch.where(self.sparse[layer], self.sink, torch.zeros_like(self.sink))
        return to_device(s, device), to_device(w, device)

    def layer_window_host(self, layer: int) -> tuple[list[int], list[int]]:
        """``layer_window`` as host lists (sink, window per row; window 0 on FA rows)."""
        sp = self.sparse[layer]
        return (torch.where(sp, self.sink, torch.zeros_like(self.sink)).tolist(),
                torch.where(sp, self.window, torch.zeros_like(self.window)).tolist())

    def set_decisions(self, layer: int, sparse: Sequence[bool]) -> None:
        """Record the router's decisions for ``route_rows`` (in order) at ``layer``, so that this
        layer's attention, later in the same forward, already uses them."""
        for rr, sp in zip(self.route_rows, sparse, strict=True):
            self.sparse[layer, rr.row] = sp


def build_routing_step(num_rows: int, query_start_loc: Sequence[int],
                       rows: Sequence[BatchRow | None], registry: FluxRegistry,
                       num_layers: int, *, none_when_full: bool = False) -> RoutingStep | None:
    """The step's routing metadata. ``query_start_loc [num_rows + 1]`` host ints; ``rows`` in
    batch order (None or missing: padding). Creates the registry entry of a request the first
    time it is seen (from ``extra_args["flux"]``) and marks the requests whose prompt completes.

    ``none_when_full``: return None, after that bookkeeping, when every row runs full attention
    at every layer (no sparse decision, no request to route): the step needs no routing.

    Given the registry (``registry.version``), a row's part depends on its tokens only through
    whether its request is still to be routed and whether its prompt completes in the step
    (``vllm_glue.metadata`` reuses a step on that basis)."""
    qsl = query_start_loc
    req_ids: list[str | None] = []
    # Python lists, turned into tensors once at the end: per-element tensor writes cost
    # microseconds each, and this runs every step for every request.
    sink_l = [0] * num_rows
    window_l = [0] * num_rows
    known: list[tuple[int, torch.Tensor]] = []  # rows whose per-layer decisions are fixed
    route_rows: list[RouteRow] = []
    prompt_done: list[bool] = []
    states = registry.states
    for i in range(num_rows):
        r = rows[i] if i < len(rows) else None
        if r is None:
            req_ids.append(None)
            prompt_done.append(False)
            continue
        st = states.get(r.req_id)
        if st is None:
            st = registry.resolve(r.req_id, r.extra_args, r.prompt_len, num_layers)
        req_ids.append(r.req_id)
        q_len = qsl[i + 1] - qsl[i]
        done = r.num_computed < r.prompt_len <= r.num_computed + q_len
        prompt_done.append(done)
        if done and st.prefill_done_at is None:
            st.prompt_done_pending = True
        sink_l[i] = st.sink
        window_l[i] = st.window
        if st.sparse is None:
            if q_len > 0:
                route_rows.append(RouteRow(i, r.req_id, qsl[i], q_len))
        elif st.mode != "full":  # a full request's column stays all False
            known.append((i, st.sparse))
    if none_when_full and not known and not route_rows:
        return None
    global _LAST
    # A run of decode steps over the same requests has the same decisions, sinks and windows:
    # reuse the last step's tensors (nothing writes them unless rows are routed in the step).
    key = (num_layers, num_rows, tuple(known_ids(known)), tuple(sink_l), tuple(window_l))
    if not route_rows and _LAST is not None and _LAST[0] == key:
        sparse, sink, window = _LAST[1]
    else:
        # one stack of the columns, then a transposed copy: a few microseconds, where an
        # indexed assignment into a zero tensor costs twice that
        cols = [torch.zeros(num_layers, dtype=torch.bool)] * num_rows
        for i, col in known:
            cols[i] = col
        sparse = (torch.stack(cols).T.contiguous() if num_rows
                  else torch.zeros(num_layers, 0, dtype=torch.bool))
        # through numpy: torch.tensor(list) costs three times as much
        sink = torch.from_numpy(np.array(sink_l, dtype=np.int32))
        window = torch.from_numpy(np.array(window_l, dtype=np.int32))
        # the decision tensors are held with the key, so their ids stay unique while cached
        _LAST = (key, (sparse, sink, window), [col for _, col in known]) if not route_rows \
            else None
    return RoutingStep(req_ids, sparse, sink, window, route_rows, num_layers, prompt_done)


def known_ids(known: list[tuple[int, torch.Tensor]]):
    return [(i, id(col)) for i, col in known]


# (key, (sparse, sink, window), decision tensors) of the last step built without routed rows
_LAST: tuple | None = None
