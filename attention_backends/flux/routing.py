"""Routing one layer of a step: pooled pre-RoPE queries -> the layer's router -> FA or SA.

``route_layer`` is called from inside the model's forward, before the layer's attention (the
vLLM glue's ``RoutedRotary`` hands it the pre-RoPE queries and the step's ``RoutingStep``). It
decides for every request of the step still waiting for its decision, writes the decisions into
the ``RoutingStep`` (so this layer's attention already uses them) and into the request registry
(so later chunks and decode steps reuse them).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from attention_backends.flux import metrics
from attention_backends.flux.parallel import tp_all_reduce_sum, tp_world_size
from attention_backends.flux.request_state import FluxRegistry, get_registry
from attention_backends.flux.router import pooled_sum
from attention_backends.flux.step import RoutingStep


def route_layer(step: RoutingStep | None, q: Tensor, layer_idx: int, head_dim: int,
                registry: FluxRegistry | None = None) -> None:
    """Route ``layer_idx`` for the step's pending rows. ``q [num_tokens, Hq_local * head_dim]``
    (this rank's heads, pre-RoPE); a no-op without pending rows or without a router there."""
    if step is None or not step.route_rows:
        return
    reg = registry if registry is not None else get_registry()
    router = reg.routers.get(layer_idx)
    if router is None:
        return
    t0 = time.perf_counter()
    q3 = q.view(q.shape[0], -1, head_dim)
    feats, counts = [], []
    for rr in step.route_rows:
        s, c = pooled_sum(q3[rr.q_start:rr.q_start + rr.q_len], reg.spec.pool_size)
        feats.append(s)
        counts.append(c)
    feat = torch.stack(feats)  # [R, D], sums over this rank's heads
    # Every rank holds num_heads / tp of the heads: one all-reduce of the sums gives every
    # rank the same full-head feature, hence the same decision.
    feat = tp_all_reduce_sum(feat)
    denom = torch.tensor(counts, dtype=torch.float32, device=feat.device) * tp_world_size()
    sparse = router.decide_sparse(feat / denom[:, None]).cpu().tolist()
    step.set_decisions(layer_idx, sparse)
    for rr, sp in zip(step.route_rows, sparse, strict=True):
        reg.record_decision(rr.req_id, layer_idx, sp, step.num_layers)
    metrics.observe_router_step(time.perf_counter() - t0)
