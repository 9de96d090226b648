"""The attention step shared by the CPU and GPU backends.

One ``ops.paged_attention`` call per layer covers the whole batch: full-attention rows pass
``window = 0``, sparse rows their request's ``sink``/``window``, compressed rows (KV eviction)
their ``kept_end``/``gap_end`` and calibration. After the attention of the step in which a
request's prompt completes, the KV-policy runtime compresses that layer's KV in place.

KV layout (CPU and GPU alike): ``kv_cache[num_blocks, num_kv_heads, block_size, 2 * head_size]``
with slot ``j``'s K in ``[..., :D]`` and V in ``[..., D:]``. vLLM's own CPU kernels use an
ISA-specific layout inside the same tensor shape (K transposed per block, V after it), which our
ops and the KV compaction cannot read, so our backends write K/V themselves (``write_kv``).
"""

from __future__ import annotations

import torch

from attention_backends.kernels import ops
from attention_backends.vllm_glue.metadata import StepMetadata
from kv_policies.eviction.runtime import get_runtime


def layer_index(layer) -> int:
    idx = getattr(layer, "_flux_layer_idx", None)
    if idx is None:
        from vllm.model_executor.models.utils import extract_layer_index

        idx = extract_layer_index(layer.layer_name)
        layer._flux_layer_idx = idx
    return idx


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter this step's K/V into the paged cache (slot = block * block_size + offset)."""
    n = slot_mapping.shape[0]
    if n == 0:
        return
    if kv_cache.is_cuda:  # one kernel that skips padding slots itself: no host sync per layer
        ops.write_kv(key, value, kv_cache, slot_mapping)
        return
    block_size, d = kv_cache.shape[2], kv_cache.shape[3] // 2
    slots = slot_mapping.to(torch.int64)
    k, v = key[:n], value[:n]
    valid = slots >= 0  # padding tokens carry slot -1
    if not bool(valid.all()):
        slots, k, v = slots[valid], k[valid], v[valid]
    blk, off = slots // block_size, slots % block_size
    kv_cache[blk, :, off, :d] = k.to(kv_cache.dtype)
    kv_cache[blk, :, off, d:] = v.to(kv_cache.dtype)


def run_attention(layer, query: torch.Tensor, kv_cache: torch.Tensor, md, scale: float,
                  output: torch.Tensor, key: torch.Tensor | None = None,
                  value: torch.Tensor | None = None) -> torch.Tensor:
    """One layer's decoder attention for the whole batch, written into ``output``.

    ``md``: the backend's metadata (CPU or GPU), with ``num_actual_tokens``, ``max_query_len``,
    ``max_seq_len``, ``query_start_loc [S+1]``, ``seq_lens [S]``, ``block_table [S, max_blocks]``
    (int32, on the query's device) and ``step`` (``StepMetadata``, None: full attention without
    eviction). ``query [T, Hq, D]``, ``output`` likewise; ``kv_cache`` as in the module docstring.
    Optional (GPU metadata): ``md.query_start_loc_cpu`` / ``md.seq_lens_cpu`` host lists, and
    this step's ``key``/``value [T, Hkv, D]`` (already written to the cache), which spare the
    dense-prefill path a device sync and a K/V gather; in a prefill step the layer's sink and
    window go along as host lists too (the sparse prefill dispatch reads them).
    """
    step: StepMetadata | None = md.step
    seq_lens, block_table = md.seq_lens, md.block_table
    n = seq_lens.shape[0]
    dev = query.device
    q = query[:md.num_actual_tokens]
    out = output[:md.num_actual_tokens]
    sink = window = kept_end = gap_end = calib = host_sink = host_window = None
    li = layer_index(layer)
    rt = None
    live_ids: list[str] = []
    if step is not None:
        routing, eviction = step.routing, step.eviction
        if routing.any_sparse(li):
            sink, window = routing.layer_window(li, dev)
            sink, window = sink[:n], window[:n]
            if q.is_cuda and md.max_query_len > 1:  # a prefill: host copies for its dispatch
                host_sink, host_window = (x[:n] for x in routing.layer_window_host(li))
        if eviction.kept_end is not None:
            kept_end, gap_end = (t[:n] for t in eviction.bounds(dev))
        if eviction.has_plans:
            rt = get_runtime()
            live_ids = [r or "" for r in routing.req_ids[:n]]
            if kept_end is not None:
                calib = rt.calibration_for(li, live_ids, dev)
    max_kv = step.max_kv_tokens[li] if step is not None and step.max_kv_tokens else None
    _, hits = ops.paged_attention(
        q, kv_cache, block_table[:n], seq_lens, md.query_start_loc[:n + 1], scale,
        sink=sink, window=window, kept_end=kept_end, gap_end=gap_end, calibration=calib,
        out=out, max_query_len=md.max_query_len, max_seq_len=md.max_seq_len,
        max_kv_tokens=max_kv, host_query_start_loc=getattr(md, "query_start_loc_cpu", None),
        host_seq_lens=getattr(md, "seq_lens_cpu", None),
        new_kv=(key, value) if key is not None and value is not None and q.is_cuda else None,
        host_sink=host_sink, host_window=host_window)
    if rt is not None:
        if hits is not None:
            rt.record_hits(li, live_ids, hits, step.query_start_loc[:n + 1])  # host: no sync
        for row, q0, q1, q_end in eviction.compress_rows:
            rt.compress_layer(routing.req_ids[row], li, eviction.plans[row],
                              eviction.policies[row], q[q0:q1], kv_cache, block_table[row],
                              scale, q_end=q_end)
    return output
