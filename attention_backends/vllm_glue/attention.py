"""The attention step shared by the CPU and GPU backends.

``attend`` makes one ``ops.paged_attention`` call per layer for the rows it is given (all of the
batch on the GPU; on the CPU only the rows that need a mask, the others going through vLLM's own
CPU kernel): full-attention rows pass ``window = 0``, sparse rows their request's
``sink``/``window``, compressed rows (KV eviction) their ``kept_end``/``gap_end`` and
calibration. After the attention of the step in which a request's prompt completes,
``compress_completed`` compresses that layer's KV in place (``run_attention``: both).

KV layout: ``kv_cache[num_blocks, num_kv_heads, block_size, 2 * head_size]``. The GPU backend
keeps it slot-major (slot ``j``'s K in ``[..., :D]``, V in ``[..., D:]``: vLLM's FlashAttention
layout, written by vLLM's cache op; ``write_kv`` writes it outside vLLM); the CPU backend
leaves writing to vLLM's CPU op, in vLLM's ISA-specific layout, and passes that layout
(``kernels.kv_layout.KVLayout``) to our ops as ``kv_layout``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attention_backends.kernels import ops
from attention_backends.kernels.kv_layout import KVLayout
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
    """Scatter this step's K/V into the slot-major paged cache (slot = block * block_size +
    offset)."""
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


def token_index(query_start_loc: Sequence[int], rows: Sequence[int]) -> torch.Tensor:
    """The batch's token positions of ``rows`` (in that order), int64 on the host."""
    spans = [torch.arange(query_start_loc[r], query_start_loc[r + 1]) for r in rows]
    return torch.cat(spans) if spans else torch.zeros(0, dtype=torch.int64)


def _head(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t[:n]``, without a new view when ``t`` has ``n`` rows (a view is a microsecond, and
    each layer takes several)."""
    return t if t.shape[0] == n else t[:n]


# (the step's req_ids list, n, its first n ids with "" for padding): the same for every layer
# of a step and for the decode steps sharing its RoutingStep
_LIVE_IDS: tuple[list, int, tuple[str, ...]] | None = None


def _live_ids(req_ids: list[str | None], n: int) -> tuple[str, ...]:
    global _LIVE_IDS
    kept = _LIVE_IDS
    if kept is not None and kept[0] is req_ids and kept[1] == n:
        return kept[2]
    live = tuple(req_ids[r] or "" for r in range(n))
    _LIVE_IDS = (req_ids, n, live)  # holds the list, so its id stays unique while kept
    return live


def attend(layer, query: torch.Tensor, kv_cache: torch.Tensor, md, scale: float,
           output: torch.Tensor, rows: Sequence[int] | None = None,
           kv_layout: KVLayout | None = None, key: torch.Tensor | None = None,
           value: torch.Tensor | None = None) -> None:
    """One layer's decoder attention for ``rows`` of the batch (None: all), written into
    ``output``; other rows' outputs are left as they are.

    ``md``: the backend's metadata (CPU or GPU), with ``num_actual_tokens``, ``max_query_len``,
    ``max_seq_len``, ``query_start_loc [S+1]``, ``seq_lens [S]``, ``block_table [S, max_blocks]``
    (int32, on the query's device) and ``step`` (``StepMetadata``, None: full attention without
    eviction). ``query [T, Hq, D]``, ``output`` likewise; ``kv_cache`` as in the module docstring,
    ``kv_layout`` where K/V lie in it (None: slot-major).
    Optional (GPU metadata): ``md.query_start_loc_cpu`` / ``md.seq_lens_cpu`` host lists, and
    this step's ``key``/``value [T, Hkv, D]`` (already written to the cache), which spare the
    dense-prefill path a device sync and a K/V gather; in a prefill step the layer's sink and
    window go along as host lists too (the sparse prefill dispatch reads them).
    """
    step: StepMetadata | None = md.step
    seq_lens, block_table = md.seq_lens, md.block_table
    n = seq_lens.shape[0]
    dev = query.device
    q = _head(query, md.num_actual_tokens)
    out = _head(output, md.num_actual_tokens)
    qsl = _head(md.query_start_loc, n + 1)
    qsl_host = step.query_start_loc[:n + 1] if step is not None else None
    sink = window = kept_end = gap_end = calib = host_sink = host_window = None
    li = layer_index(layer)
    rt = None
    live_ids: Sequence[str] = ()
    if step is not None:
        routing, eviction = step.routing, step.eviction
        if routing.any_sparse(li):
            sink, window = routing.layer_window(li, dev)
            sink, window = _head(sink, n), _head(window, n)
            if q.is_cuda and md.max_query_len > 1:  # a prefill: host copies for its dispatch
                host_sink, host_window = (x[:n] for x in routing.layer_window_host(li))
        if eviction.kept_end is not None:
            kept_end, gap_end = eviction.bounds(dev)
            kept_end, gap_end = _head(kept_end, n), _head(gap_end, n)
    tokens = None
    if rows is not None and len(rows) != n:
        # a sub-batch: its rows' tokens, lengths, blocks and per-row masks
        if qsl_host is None:
            qsl_host = qsl.tolist()
        tokens = token_index(qsl_host, rows).to(dev)
        sel = torch.tensor(rows, dtype=torch.int64, device=dev)
        q_lens = [qsl_host[r + 1] - qsl_host[r] for r in rows]
        qsl_host = [0, *torch.tensor(q_lens, dtype=torch.int64).cumsum(0).tolist()]
        qsl = torch.tensor(qsl_host, dtype=torch.int32, device=dev)
        seq_lens, block_table = seq_lens[sel], block_table[sel]
        sink, window, kept_end, gap_end = (t[sel] if t is not None else None
                                           for t in (sink, window, kept_end, gap_end))
        q, n = q.index_select(0, tokens), len(rows)
    if step is not None and step.eviction.has_plans:
        rt = get_runtime()
        ids = step.routing.req_ids
        live_ids = ([ids[r] or "" for r in rows] if tokens is not None
                    else _live_ids(ids, n))
        if kept_end is not None:
            calib = rt.calibration_for(li, live_ids, dev)
    max_kv = step.max_kv_tokens[li] if step is not None and step.max_kv_tokens else None
    # host copies and this step's K/V describe the whole batch (GPU), not a sub-batch
    whole = tokens is None
    res, hits = ops.paged_attention(
        q, kv_cache, _head(block_table, n), seq_lens, qsl, scale,
        sink=sink, window=window, kept_end=kept_end, gap_end=gap_end, calibration=calib,
        out=out if whole else None, max_query_len=md.max_query_len,
        max_seq_len=md.max_seq_len, max_kv_tokens=max_kv, kv_layout=kv_layout,
        host_query_start_loc=getattr(md, "query_start_loc_cpu", None) if whole else None,
        host_seq_lens=getattr(md, "seq_lens_cpu", None) if whole else None,
        new_kv=((key, value) if whole and key is not None and value is not None and q.is_cuda
                else None),
        host_sink=host_sink if whole else None, host_window=host_window if whole else None)
    if tokens is not None:
        out.index_copy_(0, tokens, res)
    if rt is not None and hits is not None:
        rt.record_hits(li, live_ids, hits, qsl_host)  # host: no sync


def compress_completed(layer, query: torch.Tensor, kv_cache: torch.Tensor, md, scale: float,
                       kv_layout: KVLayout | None = None) -> None:
    """Compress this layer's KV of the rows whose prompt completes in this step (after their
    attention, which read the uncompressed KV). Arguments as in ``attend``."""
    step: StepMetadata | None = md.step
    if step is None or not step.eviction.compress_rows:
        return
    rt, eviction, req_ids = get_runtime(), step.eviction, step.routing.req_ids
    q = query[:md.num_actual_tokens]
    li = layer_index(layer)
    for row, q0, q1, q_end in eviction.compress_rows:
        rt.compress_layer(req_ids[row], li, eviction.plans[row], eviction.policies[row],
                          q[q0:q1], kv_cache, md.block_table[row], scale, q_end=q_end,
                          kv_layout=kv_layout)


def run_attention(layer, query: torch.Tensor, kv_cache: torch.Tensor, md, scale: float,
                  output: torch.Tensor, key: torch.Tensor | None = None,
                  value: torch.Tensor | None = None) -> torch.Tensor:
    """One layer's decoder attention for the whole batch (slot-major KV), written into
    ``output``, then the compression of the rows whose prompt completes (``attend``,
    ``compress_completed``)."""
    attend(layer, query, kv_cache, md, scale, output, key=key, value=value)
    compress_completed(layer, query, kv_cache, md, scale)
    return output


def attend_graph(layer, query: torch.Tensor, kv_cache: torch.Tensor, md, scale: float,
                 output: torch.Tensor) -> torch.Tensor:
    """One layer's attention in our FULL CUDA graph of a uniform decode batch (one query token
    per row, padding rows with none), written into ``output``: a call with nothing of the step
    but tensor addresses, so its capture replays right for every step of the batch size.

    Every option is on, whatever the step's rows ask (``md.graph``'s views of the layer:
    per-row ``sink``/``window``, ``kept_end``/``gap_end``, calibration and its hits buffer),
    and the split count follows from the block table's width, not from the step's lengths.
    ``query``/``output [T, Hq, D]`` with ``T`` the graph's rows; ``md`` as in ``attend``."""
    n = md.seq_lens.shape[0]
    if query.shape[0] != n:
        raise RuntimeError(f"fluxserve: our FULL graphs take one query token per row, not "
                           f"{query.shape[0]} tokens for {n} rows")
    inputs = md.graph.layer(layer_index(layer), n)
    ops.paged_attention(
        query, kv_cache, md.block_table, md.seq_lens, md.query_start_loc, scale,
        sink=inputs.sink, window=inputs.window, kept_end=inputs.kept_end,
        gap_end=inputs.gap_end, calibration=inputs.calibration, out=output, max_query_len=1,
        hits_out=inputs.hits)
    return output
