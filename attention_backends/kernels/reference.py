"""Float32 PyTorch references for the attention kernels.

These functions define what the Triton kernels compute and are also the CPU path of
``attention_backends.kernels.ops``. They are written for clarity first, but vectorised: loops run
over sequences, KV heads and chunks of queries, never over single tokens.

Paged KV cache: ``kv_cache[num_blocks, num_kv_heads, block_size, 2 * head_size]``. Slot ``j`` of
sequence ``s`` lives in physical block ``block_table[s, j // block_size]`` at offset
``j % block_size``; where its K and V lie inside the block is the ``kv_layout``
(``kernels.kv_layout``; None: slot-major, K ``[..., :D]`` and V ``[..., D:]``).

Visibility of key slot ``j`` for the query at slot ``p`` of sequence ``s``::

    j <= p
    and (j < kept_end[s] or j >= gap_end[s])
    and (window[s] <= 0 or j < sink[s] or j > p - window[s])

Slots in ``[kept_end, gap_end)`` belong to freed blocks: their block-table entries are stale and
nothing here ever reads them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attention_backends.kernels import kv_layout as kvl
from attention_backends.kernels.kv_layout import KVLayout

# Queries handled at once by the reference paged attention (bounds the score matrix size).
_REF_Q_CHUNK = 256


def _per_seq(x: Tensor | None, num_seqs: int) -> list[int]:
    if x is None:
        return [0] * num_seqs
    return [int(v) for v in x.tolist()]


def visible_mask(pos: Tensor, cols: Tensor, sink: int, window: int, kept_end: int,
                 gap_end: int) -> Tensor:
    """Boolean ``[len(pos), len(cols)]``: is key slot ``cols[c]`` visible to query ``pos[r]``."""
    p = pos[:, None]
    j = cols[None, :]
    m = j <= p
    m &= (j < kept_end) | (j >= gap_end)
    if window > 0:
        m &= (j < sink) | (j > p - window)
    return m


def visible_union(p_lo: int, p_hi: int, sink: int, window: int, kept_end: int,
                  gap_end: int) -> Tensor:
    """Slots visible to at least one query at slots ``p_lo .. p_hi - 1`` (int64, ascending)."""
    j = torch.arange(p_hi, dtype=torch.int64)
    keep = (j < kept_end) | (j >= gap_end)
    if window > 0:
        keep &= (j < sink) | (j > p_lo - window)
    return j[keep]


def gather_kv(kv_cache: Tensor, block_row: Tensor, slots: Tensor,
              kv_layout: KVLayout | None = None) -> tuple[Tensor, Tensor]:
    """K and V of the given slots as contiguous float32 ``[Hkv, n, D]`` each."""
    hkv, bs = kv_cache.shape[1], kv_cache.shape[2]
    d = kv_cache.shape[3] // 2
    slots = slots.to(torch.int64)
    # whole blocks first (one index_select), then the slots within them: much cheaper on the
    # CPU than indexing every slot of the paged cache by advanced indexing
    blocks, rank = torch.unique(torch.div(slots, bs, rounding_mode="floor"), return_inverse=True)
    if kv_layout is None or kv_layout.is_slot_major:  # K and V side by side: one copy
        kv = torch.index_select(kv_cache, 0, block_row.to(torch.int64)[blocks])
        kv = kv.transpose(0, 1).reshape(hkv, blocks.numel() * bs, 2 * d)
        kv = kv.index_select(1, rank * bs + slots % bs).to(torch.float32)
        return kv[..., :d].contiguous(), kv[..., d:].contiguous()
    k, v = kvl.gather_blocks(kv_cache, kv_layout, block_row.to(torch.int64)[blocks],
                             torch.float32)
    idx = rank * bs + slots % bs
    n = idx.numel()
    if n and int(idx[-1]) - int(idx[0]) == n - 1 and bool((idx[1:] > idx[:-1]).all()):
        # a run of consecutive slots (a whole prompt, a window): no second gather
        return tuple(t.narrow(1, int(idx[0]), n).contiguous() for t in (k, v))
    return tuple(t.index_select(1, idx) for t in (k, v))


def lse_merge(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor) -> Tensor:
    """Merge two softmax-normalised partial outputs by their log-sum-exps (natural log).

    ``o*`` are ``[..., D]``, ``lse*`` are ``[...]``. A side with ``lse = -inf`` contributes
    nothing; if both are ``-inf`` the result is 0.
    """
    m = torch.maximum(lse1, lse2)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w1 = torch.exp(lse1 - m)
    w2 = torch.exp(lse2 - m)
    den = w1 + w2
    num = o1 * w1[..., None] + o2 * w2[..., None]
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where((den > 0)[..., None], num / safe[..., None], torch.zeros_like(num))


def masked_softmax_attention(scores: Tensor, mask: Tensor | None, v: Tensor
                             ) -> tuple[Tensor, Tensor]:
    """``softmax(scores masked) @ v`` and the log-sum-exp of the visible scores.

    ``scores [..., n, k]``, ``mask`` broadcastable to it (None: every key visible),
    ``v [..., k, D]``. Rows with no visible key give output 0 and lse ``-inf``.
    """
    s = scores if mask is None else scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(s - safe_lse[..., None])  # exp(-inf) = 0 on masked keys and empty rows
    return p @ v, lse


def cosine(a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """Cosine similarity along the last dim, in float32."""
    a = a.to(torch.float32)
    b = b.to(torch.float32)
    num = (a * b).sum(-1)
    den = torch.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    return num / torch.clamp(den, min=eps)


def paged_attention_ref(q: Tensor, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                        query_start_loc: Tensor, scale: float, *, sink: Tensor | None = None,
                        window: Tensor | None = None, kept_end: Tensor | None = None,
                        gap_end: Tensor | None = None, calibration=None,
                        out: Tensor | None = None,
                        kv_layout: KVLayout | None = None) -> tuple[Tensor, Tensor | None]:
    """Paged varlen attention with sink/window/gap masks and optional calibration (float32).

    See ``attention_backends.kernels.ops.paged_attention`` for the contract.
    """
    t_total, hq, d = q.shape
    hkv = kv_cache.shape[1]
    g = hq // hkv
    num_seqs = seq_lens.shape[0]
    lens = _per_seq(seq_lens, num_seqs)
    qsl = [int(v) for v in query_start_loc.tolist()]
    sinks = _per_seq(sink, num_seqs)
    windows = _per_seq(window, num_seqs)
    kept_ends = _per_seq(kept_end, num_seqs)
    gap_ends = _per_seq(gap_end, num_seqs)

    res = torch.zeros(t_total, hq, d, dtype=torch.float32, device=q.device)
    hits = None
    if calibration is not None:
        hits = torch.zeros(t_total, hq, dtype=torch.bool, device=q.device)
        enabled = calibration.enabled.tolist()

    for s in range(num_seqs):
        q_len = qsl[s + 1] - qsl[s]
        if q_len <= 0:
            continue
        ctx = lens[s] - q_len
        row_table = block_table[s]
        for c0 in range(0, q_len, _REF_Q_CHUNK):
            c1 = min(q_len, c0 + _REF_Q_CHUNK)
            t0, t1 = qsl[s] + c0, qsl[s] + c1
            cols = visible_union(ctx + c0, ctx + c1, sinks[s], windows[s], kept_ends[s],
                                 gap_ends[s]).to(q.device)
            k, v = gather_kv(kv_cache, row_table, cols, kv_layout)  # [Hkv, n, D]
            n_q = c1 - c0
            if n_q == 1:  # a single query sees all of the union of what it can see
                mask = None
            else:
                pos = torch.arange(ctx + c0, ctx + c1, dtype=torch.int64, device=q.device)
                mask = visible_mask(pos, cols, sinks[s], windows[s], kept_ends[s], gap_ends[s])
                mask = mask.repeat(g, 1)  # rows ordered (G, n_q), as in qc below
            # the G query heads of a KV head as extra rows: one plain batched matmul per KV head
            qc = q[t0:t1].to(torch.float32).reshape(n_q, hkv, g, d).permute(1, 2, 0, 3)
            qc = qc.reshape(hkv, g * n_q, d)
            scores = (qc @ k.transpose(-1, -2)) * scale  # [Hkv, G * n_q, n_k]
            o, lse = masked_softmax_attention(scores, mask, v)
            o = o.reshape(hkv, g, n_q, d).permute(2, 0, 1, 3).reshape(n_q, hq, d)
            lse = lse.reshape(hkv, g, n_q).permute(2, 0, 1).reshape(n_q, hq)
            if calibration is not None and enabled[s]:
                cos = cosine(q[t0:t1], calibration.q_ref[s][None])  # [n_q, Hq]
                hit = cos >= float(calibration.tau_of(s))
                merged = lse_merge(o, lse, calibration.o_e[s][None].to(torch.float32),
                                   calibration.lse_e[s][None].to(torch.float32))
                o = torch.where(hit[..., None], merged, o)
                hits[t0:t1] = hit
            res[t0:t1] = o

    if out is None:
        out = torch.empty(t_total, hq, d, dtype=q.dtype, device=q.device)
    out.copy_(res)
    return out, hits


def flash_varlen_ref(*, q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                     max_seqlen_q: int, seqused_k: Tensor, max_seqlen_k: int,
                     softmax_scale: float, causal: bool, block_table: Tensor,
                     window_size: list[int] | None = None, out: Tensor | None = None,
                     return_softmax_lse: bool = False):
    """Float32 stand-in for FlashAttention's ``flash_attn_varlen_func`` over a paged cache, the
    subset of its contract ``kernels.flash_varlen`` uses (FlashAttention's docstring): ``k``/``v``
    ``[num_blocks, block_size, Hkv, D]``, keys of sequence ``s`` its first ``seqused_k[s]``
    slots; query ``i`` of ``q_len`` sits at ``p = seqused_k - q_len + i`` (bottom-right) and
    sees ``j <= p`` (``causal``) and ``j >= p - window_size[0]`` (``window_size[0] >= 0``).
    Writes ``out`` (q's dtype) and returns it, with ``lse [Hq, T]`` float32 (natural log;
    ``+inf`` for a row without keys, as FlashAttention's kernels write it) when
    ``return_softmax_lse``. Raises ``ValueError`` on inputs FlashAttention (2 and 3) refuses or
    would read wrongly: dtypes other than one 16-bit type for q, k, v and out, head sizes not a
    multiple of 8 or over 256, pages (blocks) not a multiple of 16 slots (vLLM's FlashAttention
    block sizes), non-int32 metadata, and ``max_seqlen_q`` / ``max_seqlen_k`` below the real
    lengths (FlashAttention sizes its grid by them)."""
    t_total, hq, d = q.shape
    hkv, page = k.shape[2], k.shape[1]
    g = hq // hkv
    left = window_size[0] if window_size is not None else -1
    if out is None:
        out = torch.empty_like(q)
    dtypes = {q.dtype, k.dtype, v.dtype, out.dtype}
    if len(dtypes) != 1 or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"FlashAttention takes one 16-bit dtype, got {dtypes}")
    if d % 8 or d > 256 or page % 16 or hq % hkv:
        raise ValueError(f"FlashAttention cannot take head size {d}, block size {page}, "
                         f"{hq} q heads over {hkv} KV heads")
    if any(t.dtype != torch.int32 for t in (cu_seqlens_q, seqused_k, block_table)):
        raise ValueError("cu_seqlens_q, seqused_k and block_table must be int32")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("FlashAttention needs a contiguous last dimension")
    lse_all = torch.full((hq, t_total), float("inf"), dtype=torch.float32, device=q.device)
    qsl = [int(x) for x in cu_seqlens_q.tolist()]
    for s, n_k in enumerate(int(x) for x in seqused_k.tolist()):
        t0, t1 = qsl[s], qsl[s + 1]
        if t1 <= t0:
            continue
        if t1 - t0 > max_seqlen_q or n_k > max_seqlen_k:
            raise ValueError(f"sequence {s}: {t1 - t0} queries over {n_k} keys exceed "
                             f"max_seqlen_q {max_seqlen_q} / max_seqlen_k {max_seqlen_k}")
        slots = torch.arange(n_k, device=q.device)
        blocks = block_table[s, slots // page].long()
        ks = k[blocks, slots % page].to(torch.float32).permute(1, 0, 2)  # [Hkv, n_k, D]
        vs = v[blocks, slots % page].to(torch.float32).permute(1, 0, 2)
        pos = torch.arange(n_k - (t1 - t0), n_k, device=q.device)
        vis = torch.ones(t1 - t0, n_k, dtype=torch.bool, device=q.device)
        if causal:
            vis &= slots[None, :] <= pos[:, None]
        if left >= 0:
            vis &= slots[None, :] >= pos[:, None] - left
        qs = q[t0:t1].to(torch.float32).permute(1, 0, 2)  # [Hq, n_q, D]
        sc = (qs @ ks.repeat_interleave(g, 0).transpose(1, 2)) * softmax_scale
        o, lse = masked_softmax_attention(sc, vis[None], vs.repeat_interleave(g, 0))
        out[t0:t1] = o.permute(1, 0, 2).to(out.dtype)
        lse_all[:, t0:t1] = torch.where(torch.isneginf(lse), float("inf"), lse)
    return (out, lse_all) if return_softmax_lse else out


# ----------------------------------------------------------------------------- SnapKV / CaliDrop


def snapkv_scores_ref(q_obs: Tensor, kv_cache: Tensor, block_row: Tensor, prompt_len: int,
                      scale: float, pool_kernel: int,
                      kv_layout: KVLayout | None = None) -> Tensor:
    """Per-KV-head SnapKV scores ``[Hkv, prompt_len]`` float32.

    Softmax (causal) of the observation queries over the prompt keys, summed over the queries,
    max-pooled along positions per query head, then summed over each GQA group.
    """
    w, hq, d = q_obs.shape
    hkv = kv_cache.shape[1]
    g = hq // hkv
    dev = q_obs.device
    slots = torch.arange(prompt_len, dtype=torch.int64, device=dev)
    # the observation queries sit at the last w slots: the causal mask only touches the last w
    # keys (key i of those after query i)
    after = torch.ones(w, w, dtype=torch.bool, device=dev).triu(1)
    k, _ = gather_kv(kv_cache, block_row, slots, kv_layout)  # [Hkv, L, D]
    per_qhead = torch.empty(hq, prompt_len, dtype=torch.float32, device=dev)
    for h in range(hkv):
        qh = q_obs[:, h * g:(h + 1) * g].to(torch.float32).permute(1, 0, 2)  # [G, w, D]
        scores = (qh @ k[h].T).mul_(scale)  # [G, w, L]
        tail = scores[..., prompt_len - w:]
        # softmax in place (one [G, w, L] buffer per KV head). Masked keys are zeroed after the
        # exp rather than set to -inf before it: torch's vectorised exp takes a slow path on
        # -inf (5x on the whole softmax here)
        peak = tail.masked_fill(after, float("-inf")).amax(-1)  # [G, w]
        if prompt_len > w:
            peak = torch.maximum(peak, scores[..., :prompt_len - w].amax(-1))
        scores.sub_(peak[..., None]).exp_()
        tail.masked_fill_(after, 0.0)
        # sum over the queries of each row normalised by its total: one [1, w] @ [w, L] per head
        inv_total = scores.sum(-1, keepdim=True).reciprocal_()  # [G, w, 1]
        per_qhead[h * g:(h + 1) * g] = (inv_total.transpose(1, 2) @ scores)[:, 0]
    pooled = max_pool_same(per_qhead, pool_kernel)
    return pooled.reshape(hkv, g, prompt_len).sum(dim=1)


def max_pool_same(x: Tensor, kernel: int) -> Tensor:
    """1-D max pool along the last dim, stride 1, padding ``kernel // 2``, same length."""
    if kernel <= 1:
        return x
    n = x.shape[-1]
    pooled = F.max_pool1d(x[:, None, :], kernel_size=kernel, stride=1, padding=kernel // 2)
    return pooled[:, 0, :n]


def select_kept(scores: Tensor, budget: int, window: int) -> Tensor:
    """Kept slots per KV head, ``[Hkv, budget]`` int64 ascending.

    Top ``budget - window`` scores among positions ``[0, L - window)`` plus all of the last
    ``window`` positions. Requires ``window < budget < L`` (the caller skips eviction when the
    prompt already fits the budget).
    """
    hkv, length = scores.shape
    if not 0 <= window < budget:
        raise ValueError(f"select_kept needs 0 <= window < budget (window={window}, "
                         f"budget={budget})")
    if budget >= length:
        raise ValueError(f"select_kept needs budget < prompt length (budget={budget}, "
                         f"length={length}); nothing to evict")
    top = torch.topk(scores[:, :length - window], budget - window, dim=-1).indices
    tail = torch.arange(length - window, length, device=scores.device, dtype=top.dtype)
    kept = torch.cat([top, tail.expand(hkv, window)], dim=-1)
    return torch.sort(kept, dim=-1).values


def evicted_partial_ref(q_ref: Tensor, kv_cache: Tensor, block_row: Tensor, kept_idx: Tensor,
                        prompt_len: int, scale: float,
                        kv_layout: KVLayout | None = None) -> tuple[Tensor, Tensor]:
    """Attention of ``q_ref [Hq, D]`` over the prompt slots NOT kept for its KV head.

    Returns ``(o_e [Hq, D] float32, lse_e [Hq] float32)``; ``lse_e = -inf`` and ``o_e = 0`` where
    nothing was evicted.
    """
    hq, d = q_ref.shape
    hkv = kv_cache.shape[1]
    g = hq // hkv
    dev = q_ref.device
    slots = torch.arange(prompt_len, dtype=torch.int64, device=dev)
    k, v = gather_kv(kv_cache, block_row, slots, kv_layout)
    evicted = torch.ones(hkv, prompt_len, dtype=torch.bool, device=dev)
    evicted.scatter_(1, kept_idx.to(torch.int64), False)
    qh = q_ref.to(torch.float32).reshape(hkv, g, d)
    scores = (qh @ k.transpose(-1, -2)) * scale  # [Hkv, G, L]
    o, lse = masked_softmax_attention(scores, evicted[:, None, :], v)
    return o.reshape(hq, d), lse.reshape(hq)


def compact_kv_ref(kv_cache: Tensor, block_row: Tensor, kept_idx: Tensor,
                   kv_layout: KVLayout | None = None) -> None:
    """In place: for KV head h, slot j (j < budget) <- old slot ``kept_idx[h, j]``."""
    hkv, budget = kept_idx.shape
    bs = kv_cache.shape[2]
    row = block_row.to(torch.int64)
    src = kept_idx.to(torch.int64)
    heads = torch.arange(hkv, device=kv_cache.device)[:, None].expand(hkv, budget)
    dst = torch.arange(budget, device=kv_cache.device)[None, :].expand(hkv, budget)
    if kv_layout is None or kv_layout.is_slot_major:
        moved = kv_cache[row[src // bs], heads, src % bs].clone()  # gather before any write
        kv_cache[row[dst // bs], heads, dst % bs] = moved
        return
    # read_slots copies: every slot is read before any is written
    k, v = kvl.read_slots(kv_cache, kv_layout, row[src // bs], heads, src % bs)
    kvl.write_slots(kv_cache, kv_layout, row[dst // bs], heads, dst % bs, k, v)

