"""Triton paged attention: a prefill kernel and a split-KV decode kernel with a reduce step.

Both kernels read the paged KV cache ``[num_blocks, Hkv, block_size, 2 * D]`` and apply the
sink / window / gap mask of ``attention_backends.kernels.ops.paged_attention``. Work is skipped at
KV-tile granularity: for the queries a program owns, the visible key slots are at most three
intervals (``[0, seq)`` minus the freed gap ``[kept_end, gap_end)`` minus the window hole
``[sink, p_lo - window + 1)``), and the kernels loop only over the tiles of those intervals.
Rows of a tile outside its interval are never loaded, so stale gap blocks are never read.

Softmax runs in the log2 domain (scores pre-multiplied by ``scale * log2(e)``); accumulators are
float32.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from attention_backends.kernels.sdpa_prefill import dense_prefill_sdpa

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Decode kernel: rows of a program = (query tokens of one sequence) x (q heads of one KV head).
DECODE_MAX_ROWS = 64

# Triton's CPU interpreter gets bf16 tl.dot wrong (triton 3.9): there, dot operands are upcast to
# float32 (after the same rounding the GPU path does), which computes the same function.
UPCAST_DOT = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _mma(a, b):
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b)


@triton.jit
def _visible_intervals(p_lo, p_hi, sink, window, kept_end, gap_end):
    """Key slots visible to some query at slots [p_lo, p_hi): [0,a1) + [b1,a2) + [b2,end)."""
    end = p_hi
    # hole 1: the freed gap; hole 2: keys before every query's window (past the sink)
    a1 = tl.minimum(tl.maximum(kept_end, 0), end)
    b1 = tl.minimum(tl.maximum(gap_end, a1), end)
    a2 = tl.minimum(tl.maximum(sink, 0), end)
    b2 = tl.where(window > 0, p_lo - window + 1, a2)
    b2 = tl.minimum(tl.maximum(b2, a2), end)
    e1 = b1 <= a1
    a1 = tl.where(e1, end, a1)
    b1 = tl.where(e1, end, b1)
    e2 = b2 <= a2
    a2 = tl.where(e2, end, a2)
    b2 = tl.where(e2, end, b2)
    swap = a2 < a1
    ta = tl.where(swap, a2, a1)
    tb = tl.where(swap, b2, b1)
    a2 = tl.where(swap, a1, a2)
    b2 = tl.where(swap, b1, b2)
    a1 = ta
    b1 = tb
    overlap = b1 >= a2
    b1 = tl.where(overlap, tl.maximum(b1, b2), b1)
    a2 = tl.where(overlap, end, a2)
    b2 = tl.where(overlap, end, b2)
    return a1, b1, a2, b2, end


@triton.jit
def _seq_masks(sink_ptr, window_ptr, kept_ptr, gap_ptr, s, HAS_SW: tl.constexpr,
               HAS_GAP: tl.constexpr):
    """(sink, window, kept_end, gap_end) of sequence s; absent tensors mean 0."""
    zero = s * 0  # an int32 scalar tensor, like the loaded values
    sink = zero
    window = zero
    kept_end = zero
    gap_end = zero
    if HAS_SW:
        sink = tl.load(sink_ptr + s)
        window = tl.load(window_ptr + s)
    if HAS_GAP:
        kept_end = tl.load(kept_ptr + s)
        gap_end = tl.load(gap_ptr + s)
    return sink, window, kept_end, gap_end


@triton.jit
def _n_tiles(lo, hi, BLOCK_N: tl.constexpr):
    return tl.where(hi > lo, (hi + BLOCK_N - 1) // BLOCK_N - lo // BLOCK_N, 0)


@triton.jit
def _tile_at(v, n1, n2, a1, b1, a2, b2, end, BLOCK_N: tl.constexpr):
    """Virtual tile v -> (first slot of the tile, interval [lo, hi) its rows must lie in)."""
    in1 = v < n1
    in2 = v < n1 + n2
    lo = tl.where(in1, 0, tl.where(in2, b1, b2))
    hi = tl.where(in1, a1, tl.where(in2, a2, end))
    base = tl.where(in1, 0, tl.where(in2, b1 // BLOCK_N - n1, b2 // BLOCK_N - n1 - n2))
    return (base + v) * BLOCK_N, lo, hi


@triton.jit
def _load_kv_tile(kv_ptr, bt_row_ptr, kvh, n0, lo, hi, stride_kb, stride_kh, stride_ks,
                  BLOCK_N: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    jvalid = (offs_n >= lo) & (offs_n < hi)
    blk = tl.load(bt_row_ptr + offs_n // PAGE, mask=jvalid, other=0).to(tl.int64)
    row = blk * stride_kb + kvh * stride_kh + (offs_n % PAGE).to(tl.int64) * stride_ks
    ptrs = kv_ptr + row[:, None] + offs_d[None, :]
    k = tl.load(ptrs, mask=jvalid[:, None], other=0.0)
    v = tl.load(ptrs + D, mask=jvalid[:, None], other=0.0)
    return k, v, offs_n, jvalid


@triton.jit
def _load_kv_tile_full(kv_ptr, bt_row_ptr, kvh, n0, stride_kb, stride_kh, stride_ks,
                       BLOCK_N: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr):
    """A KV tile whose rows are all visible: no load masks."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    blk = tl.load(bt_row_ptr + offs_n // PAGE).to(tl.int64)
    row = blk * stride_kb + kvh * stride_kh + (offs_n % PAGE).to(tl.int64) * stride_ks
    ptrs = kv_ptr + row[:, None] + offs_d[None, :]
    return tl.load(ptrs), tl.load(ptrs + D), offs_n


@triton.jit
def _attend_tile(q, k, v, offs_n, jvalid, pos, m_i, l_i, acc, sink, window, scale_log2,
                 APPLY_MASK: tl.constexpr):
    qk = _mma(q, tl.trans(k))  # raw scores; the scale is folded into the exponent (FMA)
    if APPLY_MASK:
        j = offs_n[None, :]
        p = pos[:, None]
        vis = jvalid[None, :] & (j <= p) & ((window <= 0) | (j < sink) | (j > p - window))
        qk = tl.where(vis, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    pr = tl.exp2(qk * scale_log2 - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(pr, 1)
    acc = acc * alpha[:, None] + _mma(pr.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _calib_weights(qf, qref, lse2, lse_e2, tau_ptr, en_ptr, s, AXIS: tl.constexpr):
    """The calibration merge of ``_finish`` / ``_finish_row``, for rows of ``q`` (``AXIS = 1``:
    ``qf``, ``qref`` ``[rows, D]``, ``lse2``, ``lse_e2`` ``[rows]``) or one row (``AXIS = 0``).

    Returns ``hit`` (cos(q, q_ref) >= tau[s] on an enabled sequence ``s``) and the LSE-merge
    weights ``w1`` (kept keys, log2 ``lse2``), ``w2`` (evicted set, log2 ``lse_e2``) and their
    sum ``den2`` (1 where both are empty): merged = ``(o * w1 + o_e * w2) / den2``.
    """
    num = tl.sum(qf * qref, AXIS)
    den = tl.sqrt(tl.sum(qf * qf, AXIS) * tl.sum(qref * qref, AXIS))
    cos = num / tl.maximum(den, 1e-12)
    hit = (cos >= tl.load(tau_ptr + s)) & (tl.load(en_ptr + s) != 0)
    mm = tl.maximum(lse2, lse_e2)
    mm = tl.where(mm == float("-inf"), 0.0, mm)
    w1 = tl.exp2(lse2 - mm)
    w2 = tl.exp2(lse_e2 - mm)
    den2 = w1 + w2
    return hit, w1, w2, tl.where(den2 > 0, den2, 1.0)


@triton.jit
def _finish(o, lse2, q, s, t_abs, h_r, row_ok, out_ptr, hits_ptr, stride_ot, stride_oh,
            qref_ptr, oe_ptr, lsee_ptr, en_ptr, tau_ptr, HQ: tl.constexpr, D: tl.constexpr,
            HAS_CALIB: tl.constexpr):
    """Optional calibration merge, then store the rows (o normalised, lse2 in log2 units)."""
    offs_d = tl.arange(0, D)
    if HAS_CALIB:
        cal_off = (s * HQ + h_r).to(tl.int64)
        qref = tl.load(qref_ptr + cal_off[:, None] * D + offs_d[None, :], mask=row_ok[:, None],
                       other=0.0).to(tl.float32)
        lse_e2 = tl.load(lsee_ptr + cal_off, mask=row_ok, other=float("-inf")) * 1.4426950408889634
        o_e = tl.load(oe_ptr + cal_off[:, None] * D + offs_d[None, :], mask=row_ok[:, None],
                      other=0.0)
        hit, w1, w2, den2 = _calib_weights(q.to(tl.float32), qref, lse2, lse_e2, tau_ptr, en_ptr,
                                           s, 1)
        hit = hit & row_ok
        merged = (o * w1[:, None] + o_e * w2[:, None]) / den2[:, None]
        o = tl.where(hit[:, None], merged, o)
        tl.store(hits_ptr + t_abs.to(tl.int64) * HQ + h_r, hit.to(tl.int8), mask=row_ok)
    o_ptrs = out_ptr + t_abs.to(tl.int64)[:, None] * stride_ot + h_r[:, None] * stride_oh \
        + offs_d[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _finish_row(o, lse2, q, s, t_abs, h, out_ptr, hits_ptr, stride_ot, stride_oh, qref_ptr,
                oe_ptr, lsee_ptr, en_ptr, tau_ptr, HQ: tl.constexpr, D: tl.constexpr,
                HAS_CALIB: tl.constexpr):
    """``_finish`` for a single (token, head) row: o [D] normalised, lse2 scalar (log2)."""
    offs_d = tl.arange(0, D)
    if HAS_CALIB:
        cal_off = (s * HQ + h).to(tl.int64)
        qref = tl.load(qref_ptr + cal_off * D + offs_d).to(tl.float32)
        lse_e2 = tl.load(lsee_ptr + cal_off) * 1.4426950408889634
        o_e = tl.load(oe_ptr + cal_off * D + offs_d)
        hit, w1, w2, den2 = _calib_weights(q.to(tl.float32), qref, lse2, lse_e2, tau_ptr, en_ptr,
                                           s, 0)
        merged = (o * w1 + o_e * w2) / den2
        o = tl.where(hit, merged, o)
        tl.store(hits_ptr + t_abs.to(tl.int64) * HQ + h, hit.to(tl.int8))
    tl.store(out_ptr + t_abs.to(tl.int64) * stride_ot + h * stride_oh + offs_d,
             o.to(out_ptr.dtype.element_ty))


@triton.jit
def _decode_kernel(
    q_ptr, kv_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, sink_ptr, window_ptr, kept_ptr, gap_ptr,
    out_ptr, hits_ptr, part_o_ptr, part_lse_ptr,
    qref_ptr, oe_ptr, lsee_ptr, en_ptr, tau_ptr, scale_log2,
    stride_qt, stride_qh, stride_kb, stride_kh, stride_ks, stride_bt, stride_ot, stride_oh,
    num_splits, q_thr,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_CALIB: tl.constexpr, FINAL: tl.constexpr,
    MAXQ: tl.constexpr, HAS_SW: tl.constexpr, HAS_GAP: tl.constexpr,
):
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(qsl_ptr + s)
    q_len = tl.load(qsl_ptr + s + 1) - q_start
    if (q_len <= 0) | (q_len > q_thr):
        return
    seq_len = tl.load(seq_lens_ptr + s)
    ctx = seq_len - q_len
    sink, window, kept_end, gap_end = _seq_masks(sink_ptr, window_ptr, kept_ptr, gap_ptr, s,
                                                 HAS_SW, HAS_GAP)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    t_rel = offs_m // G
    h_r = kvh * G + offs_m % G
    row_ok = t_rel < q_len
    t_abs = q_start + t_rel
    pos = ctx + t_rel
    q = tl.load(q_ptr + t_abs.to(tl.int64)[:, None] * stride_qt + h_r[:, None] * stride_qh
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    a1, b1, a2, b2, end = _visible_intervals(ctx, seq_len, sink, window, kept_end, gap_end)
    n1 = _n_tiles(0, a1, BLOCK_N)
    n2 = _n_tiles(b1, a2, BLOCK_N)
    n3 = _n_tiles(b2, end, BLOCK_N)
    n_tot = n1 + n2 + n3
    per_split = (n_tot + num_splits - 1) // num_splits
    v_lo = split * per_split
    v_hi = tl.minimum(v_lo + per_split, n_tot)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    bt_row = bt_ptr + s.to(tl.int64) * stride_bt
    for vt in range(v_lo, v_hi):
        n0, lo, hi = _tile_at(vt, n1, n2, a1, b1, a2, b2, end, BLOCK_N)
        k, v, offs_n, jvalid = _load_kv_tile(kv_ptr, bt_row, kvh, n0, lo, hi, stride_kb,
                                             stride_kh, stride_ks, BLOCK_N, D, PAGE)
        m_i, l_i, acc = _attend_tile(q, k, v, offs_n, jvalid, pos, m_i, l_i, acc, sink, window,
                                     scale_log2, True)

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse2 = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    if FINAL:
        _finish(o, lse2, q, s, t_abs, h_r, row_ok, out_ptr, hits_ptr, stride_ot, stride_oh,
                qref_ptr, oe_ptr, lsee_ptr, en_ptr, tau_ptr, HQ, D, HAS_CALIB)
    else:
        part = ((s.to(tl.int64) * MAXQ + t_rel) * HQ + h_r) * num_splits + split
        tl.store(part_lse_ptr + part, lse2, mask=row_ok)
        tl.store(part_o_ptr + part[:, None] * D + offs_d[None, :], o, mask=row_ok[:, None])


@triton.jit
def _decode_reduce_kernel(
    q_ptr, qsl_ptr, out_ptr, hits_ptr, part_o_ptr, part_lse_ptr,
    qref_ptr, oe_ptr, lsee_ptr, en_ptr, tau_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, num_splits, q_thr,
    HQ: tl.constexpr, D: tl.constexpr, SPLIT_CHUNK: tl.constexpr, HAS_CALIB: tl.constexpr,
    MAXQ: tl.constexpr,
):
    """One program per (sequence, q head, query token): merge the split partials."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    t_rel = tl.program_id(2)
    q_start = tl.load(qsl_ptr + s)
    q_len = tl.load(qsl_ptr + s + 1) - q_start
    if (q_len > q_thr) | (t_rel >= q_len):
        return
    t_abs = q_start + t_rel
    offs_c = tl.arange(0, SPLIT_CHUNK)
    offs_d = tl.arange(0, D)
    part0 = ((s.to(tl.int64) * MAXQ + t_rel) * HQ + h) * num_splits
    m_i = tl.max(tl.full([SPLIT_CHUNK], float("-inf"), tl.float32), 0)
    l_i = tl.sum(tl.zeros([SPLIT_CHUNK], tl.float32), 0)
    acc = tl.zeros([D], tl.float32)
    for c0 in range(0, num_splits, SPLIT_CHUNK):
        ok = c0 + offs_c < num_splits
        lse = tl.load(part_lse_ptr + part0 + c0 + offs_c, mask=ok, other=float("-inf"))
        o = tl.load(part_o_ptr + (part0 + c0 + offs_c)[:, None] * D + offs_d[None, :],
                    mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m_i, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        w = tl.exp2(lse - m_safe)
        l_i = l_i * alpha + tl.sum(w, 0)
        acc = acc * alpha + tl.sum(o * w[:, None], 0)
        m_i = m_new
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)
    lse2 = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    q = tl.zeros([D], tl.float32)
    if HAS_CALIB:
        q = tl.load(q_ptr + t_abs.to(tl.int64) * stride_qt + h * stride_qh + offs_d)
    _finish_row(o, lse2, q, s, t_abs, h, out_ptr, hits_ptr, stride_ot, stride_oh, qref_ptr,
                oe_ptr, lsee_ptr, en_ptr, tau_ptr, HQ, D, HAS_CALIB)


@triton.jit
def _prefill_kernel(
    q_ptr, kv_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, cu_tiles_ptr, sink_ptr, window_ptr, kept_ptr,
    gap_ptr, out_ptr, hits_ptr, qref_ptr, oe_ptr, lsee_ptr, en_ptr, tau_ptr, scale_log2,
    stride_qt, stride_qh, stride_kb, stride_kh, stride_ks, stride_bt, stride_ot, stride_oh,
    num_seqs, grid_tiles,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    HAS_CALIB: tl.constexpr, MASK_MODE: tl.constexpr, HAS_SW: tl.constexpr,
    HAS_GAP: tl.constexpr,
):
    """One program per (KV head, tile of BLOCK_M // G query tokens): its BLOCK_M rows are those
    tokens x the G q heads sharing the KV head, so each KV tile is loaded once per group.

    MASK_MODE 0: tiles every row sees whole run in their own loop without mask arithmetic;
    3 (default): one loop, a per-tile branch skips the mask where it can (the branch stops the
    software pipeliner, yet with 4 warps it is the fastest on H200); 1: every tile is masked;
    2: no tile is masked (timing experiments only: wrong on boundary tiles).
    """
    TOK: tl.constexpr = BLOCK_M // G
    kvh = tl.program_id(0)
    # heaviest (latest) tiles first: launch order is grid order
    tile = grid_tiles - 1 - tl.program_id(1)
    if tile >= tl.load(cu_tiles_ptr + num_seqs):
        return
    lo_s = 0
    hi_s = num_seqs
    for _ in range(SEARCH_STEPS):
        mid = (lo_s + hi_s) // 2
        right = tl.load(cu_tiles_ptr + mid) <= tile
        lo_s = tl.where(right, mid, lo_s)
        hi_s = tl.where(right, hi_s, mid)
    s = lo_s
    m0 = (tile - tl.load(cu_tiles_ptr + s)) * TOK
    q_start = tl.load(qsl_ptr + s)
    q_len = tl.load(qsl_ptr + s + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + s)
    ctx = seq_len - q_len
    sink, window, kept_end, gap_end = _seq_masks(sink_ptr, window_ptr, kept_ptr, gap_ptr, s,
                                                 HAS_SW, HAS_GAP)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    t_rel = m0 + offs_m // G
    h_r = kvh * G + offs_m % G
    row_ok = (offs_m < TOK * G) & (t_rel < q_len)
    t_abs = q_start + t_rel
    pos = ctx + t_rel
    q = tl.load(q_ptr + t_abs.to(tl.int64)[:, None] * stride_qt + h_r[:, None] * stride_qh
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    p_lo = ctx + m0
    p_hi = ctx + tl.minimum(m0 + TOK, q_len)
    p_max = p_hi - 1

    a1, b1, a2, b2, end = _visible_intervals(p_lo, p_hi, sink, window, kept_end, gap_end)
    n1 = _n_tiles(0, a1, BLOCK_N)
    n2 = _n_tiles(b1, a2, BLOCK_N)
    n3 = _n_tiles(b2, end, BLOCK_N)
    n_tot = n1 + n2 + n3

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    bt_row = bt_ptr + s.to(tl.int64) * stride_bt
    # The clean run: tiles of the last visible interval that every row sees whole (past the
    # window edge of the last row, before the diagonal of the first). They need no mask and run
    # in their own loop; the other tiles (sink, window edge, diagonal, gap edges) are masked.
    # Two straight-line loops keep the software pipeliner working (a branch in the loop body
    # disables it).
    # last interval [last_lo, end): after the later non-empty hole (empty holes sit at end)
    in3 = a2 < b2
    in2 = a1 < b1
    last_lo = tl.where(in3, b2, tl.where(in2, b1, 0))
    v_last = tl.where(in3, n1 + n2, tl.where(in2, n1, 0))  # its first virtual tile
    c_lo = tl.where(window > 0, tl.maximum(last_lo, p_max - window + 1), last_lo)
    r_lo = (c_lo + BLOCK_N - 1) // BLOCK_N
    r_hi = tl.maximum(tl.minimum(end, p_lo + 1) // BLOCK_N, r_lo)
    if MASK_MODE >= 1:
        r_hi = r_lo  # modes 1 and 3: no separate clean loop
    n_clean = r_hi - r_lo
    v_clean = v_last + r_lo - last_lo // BLOCK_N  # virtual index of the first clean tile
    for r in range(r_lo, r_hi):
        k, v, offs_n = _load_kv_tile_full(kv_ptr, bt_row, kvh, r * BLOCK_N, stride_kb,
                                          stride_kh, stride_ks, BLOCK_N, D, PAGE)
        m_i, l_i, acc = _attend_tile(q, k, v, offs_n, offs_n >= 0, pos, m_i, l_i, acc, sink,
                                     window, scale_log2, False)
    for u in range(0, n_tot - n_clean):
        vt = tl.where(u < v_clean, u, u + n_clean)
        n0, lo, hi = _tile_at(vt, n1, n2, a1, b1, a2, b2, end, BLOCK_N)
        k, v, offs_n, jvalid = _load_kv_tile(kv_ptr, bt_row, kvh, n0, lo, hi, stride_kb,
                                             stride_kh, stride_ks, BLOCK_N, D, PAGE)
        if MASK_MODE == 3:
            n_last = n0 + BLOCK_N - 1
            inside = (n0 >= lo) & (n_last < hi) & (n_last <= p_lo)
            in_win = (window <= 0) | (n_last < sink) | (n0 > p_max - window)
            if inside & in_win:
                m_i, l_i, acc = _attend_tile(q, k, v, offs_n, jvalid, pos, m_i, l_i, acc, sink,
                                             window, scale_log2, False)
            else:
                m_i, l_i, acc = _attend_tile(q, k, v, offs_n, jvalid, pos, m_i, l_i, acc, sink,
                                             window, scale_log2, True)
        else:
            m_i, l_i, acc = _attend_tile(q, k, v, offs_n, jvalid, pos, m_i, l_i, acc, sink,
                                         window, scale_log2, MASK_MODE != 2)

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse2 = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    _finish(o, lse2, q, s, t_abs, h_r, row_ok, out_ptr, hits_ptr, stride_ot, stride_oh,
            qref_ptr, oe_ptr, lsee_ptr, en_ptr, tau_ptr, HQ, D, HAS_CALIB)


# ----------------------------------------------------------------------------- launchers


@functools.lru_cache(maxsize=8)
def _sms_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _sms_of(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: a few splits, so the split/reduce path is exercised


# Defaults = the winners of benchmarks/gpu_kernels.py's sweep on an H200 (docs/benchmarks.md).
# waves: decode programs per SM. The split count makes (sequences x KV heads x splits) about
# waves x SMs, all co-resident (one wave: no tail), so one long sequence fills the GPU too.
# block_n 128: the pipeliner prefetches only one KV tile ahead behind the block-table load, so
# a large tile keeps enough bytes in flight.
DEFAULT_DECODE = {"block_n": 128, "num_warps": 4, "num_stages": 3, "waves": 3}
# mask_mode 3 (one loop, per-tile branch) with 4 warps: two CTAs per SM overlap each other's
# softmax and MMA, which beat the pipelined two-loop form (mode 0) with 8 warps.
DEFAULT_PREFILL = {"block_m": 128, "block_n": 64, "num_warps": 4, "num_stages": 3,
                   "mask_mode": 3, "dense_backend": "sdpa"}
MAX_SPLITS = 256
SPLIT_CHUNK = 32


def decode_splits(kv_tokens: int, block_n: int, waves: int, pairs: int, sms: int) -> int:
    """Splits per (sequence, KV head): ``pairs x splits`` close to (not over) ``waves x SMs``,
    and at least two KV tiles per split."""
    tiles = triton.cdiv(kv_tokens, block_n)
    n = min((waves * sms) // pairs, triton.cdiv(tiles, 2))
    return max(1, min(MAX_SPLITS, n))


def paged_attention_triton(q, kv_cache, block_table, seq_lens, query_start_loc, scale, sink,
                           window, kept_end, gap_end, calibration, out, *, max_query_len=None,
                           max_seq_len=None, max_kv_tokens=None, decode_config=None,
                           prefill_config=None):
    """Launch the decode and/or prefill kernels. Mask tensors: int32 [num_seqs] or None (0).
    sink and window come together (both or neither), so do kept_end and gap_end."""
    t_total, hq, d = q.shape
    _, hkv, page, d2 = kv_cache.shape
    num_seqs = seq_lens.shape[0]
    g = hq // hkv
    dev = q.device
    if out is None:
        out = torch.empty(t_total, hq, d, dtype=q.dtype, device=dev)
    if t_total == 0 or num_seqs == 0:
        return out, (torch.zeros(t_total, hq, dtype=torch.bool, device=dev)
                     if calibration is not None else None)
    has_calib = calibration is not None
    if has_calib:
        # every row of a sequence with queries is written by exactly one of the two kernels
        hits_u8 = torch.empty(t_total, hq, dtype=torch.int8, device=dev)
        qref = calibration.q_ref.contiguous()
        o_e = calibration.o_e.to(torch.float32).contiguous()
        lse_e = calibration.lse_e.to(torch.float32).contiguous()
        en = calibration.enabled
        en = en.view(torch.uint8) if en.dtype == torch.bool else en.to(torch.int32)
        en = en.contiguous()
        # one threshold per sequence; a fill, not a host copy, so CUDA graphs can capture it
        if isinstance(calibration.tau, torch.Tensor):
            tau = calibration.tau.to(device=dev, dtype=torch.float32).expand(num_seqs).contiguous()
        else:
            tau = torch.full((num_seqs,), float(calibration.tau), dtype=torch.float32, device=dev)
    else:
        hits_u8 = out  # unused
        qref = o_e = lse_e = en = tau = q
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max().item())
    if max_seq_len is None:
        max_seq_len = block_table.shape[1] * page
    if max_kv_tokens is None:
        max_kv_tokens = max_seq_len
    scale_log2 = float(scale) * LOG2E
    has_sw = sink is not None or window is not None
    has_gap = kept_end is not None or gap_end is not None
    zeros = None
    if (sink is None) != (window is None) or (kept_end is None) != (gap_end is None):
        zeros = torch.zeros(num_seqs, dtype=torch.int32, device=dev)
    sink = sink if sink is not None else (zeros if has_sw else seq_lens)
    window = window if window is not None else (zeros if has_sw else seq_lens)
    kept_end = kept_end if kept_end is not None else (zeros if has_gap else seq_lens)
    gap_end = gap_end if gap_end is not None else (zeros if has_gap else seq_lens)
    strides = (q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1),
               kv_cache.stride(2), block_table.stride(0), out.stride(0), out.stride(1))
    assert q.stride(2) == 1 and kv_cache.stride(3) == 1 and out.stride(2) == 1
    assert block_table.stride(1) == 1

    q_thr = max(1, DECODE_MAX_ROWS // g)
    dcfg = dict(DEFAULT_DECODE, **(decode_config or {}))
    pcfg = dict(DEFAULT_PREFILL, **(prefill_config or {}))

    # decode kernel: sequences with 1 <= q_len <= q_thr
    max_q_dec = min(max_query_len, q_thr)
    block_m = max(16, triton.next_power_of_2(max_q_dec * g))
    bn = dcfg["block_n"]
    num_splits = dcfg.get("num_splits")
    if num_splits is None:
        num_splits = decode_splits(min(max_kv_tokens, max_seq_len), bn, dcfg["waves"],
                                   num_seqs * hkv, _num_sms(dev))
    num_splits = max(1, int(num_splits))
    final = num_splits == 1
    if final:
        part_o = part_lse = out
    else:
        rows = num_seqs * max_q_dec * hq * num_splits
        part_o = torch.empty(rows * d, dtype=torch.float32, device=dev)
        part_lse = torch.empty(rows, dtype=torch.float32, device=dev)
    _decode_kernel[(num_seqs, hkv, num_splits)](
        q, kv_cache, block_table, seq_lens, query_start_loc, sink, window, kept_end, gap_end,
        out, hits_u8, part_o, part_lse, qref, o_e, lse_e, en, tau, scale_log2, *strides,
        num_splits, q_thr,
        HQ=hq, G=g, D=d, PAGE=page, BLOCK_M=block_m, BLOCK_N=bn, HAS_CALIB=has_calib,
        FINAL=final, MAXQ=max_q_dec, HAS_SW=has_sw, HAS_GAP=has_gap, num_warps=dcfg["num_warps"],
        num_stages=dcfg["num_stages"],
    )
    if not final:
        _decode_reduce_kernel[(num_seqs, hq, max_q_dec)](
            q, query_start_loc, out, hits_u8, part_o, part_lse, qref, o_e, lse_e, en, tau,
            strides[0], strides[1], strides[6], strides[7], num_splits, q_thr,
            HQ=hq, D=d, SPLIT_CHUNK=SPLIT_CHUNK, HAS_CALIB=has_calib, MAXQ=max_q_dec,
            num_warps=4,
        )

    # prefill: sequences with q_len > q_thr. Without any mask or calibration in the batch, the
    # work is plain causal attention, where torch's flash kernel beats ours (docs/benchmarks.md).
    # (The interpreter, UPCAST_DOT, keeps the Triton kernel so the CPU tests exercise it.)
    dense_done = (max_query_len > q_thr and not (has_sw or has_gap or has_calib)
                  and pcfg["dense_backend"] == "sdpa" and not UPCAST_DOT
                  and dense_prefill_sdpa(q, kv_cache, block_table, seq_lens, query_start_loc,
                                         scale, out, q_thr, whole_batch=True) is not None)
    if max_query_len > q_thr and not dense_done:
        bm = max(pcfg["block_m"], triton.next_power_of_2(g))
        tok = bm // g
        q_lens = query_start_loc[1:] - query_start_loc[:-1]
        tiles = torch.where(q_lens > q_thr, (q_lens + tok - 1) // tok, torch.zeros_like(q_lens))
        cu_tiles = torch.zeros(num_seqs + 1, dtype=torch.int32, device=dev)
        cu_tiles[1:] = torch.cumsum(tiles, 0)
        grid_tiles = triton.cdiv(t_total, tok) + num_seqs
        steps = max(1, math.ceil(math.log2(num_seqs + 1)) + 1)
        _prefill_kernel[(hkv, grid_tiles)](
            q, kv_cache, block_table, seq_lens, query_start_loc, cu_tiles, sink, window,
            kept_end, gap_end, out, hits_u8, qref, o_e, lse_e, en, tau, scale_log2, *strides,
            num_seqs, grid_tiles,
            HQ=hq, G=g, D=d, PAGE=page, BLOCK_M=bm, BLOCK_N=pcfg["block_n"],
            SEARCH_STEPS=steps, HAS_CALIB=has_calib, MASK_MODE=pcfg["mask_mode"], HAS_SW=has_sw,
            HAS_GAP=has_gap,
            num_warps=pcfg["num_warps"], num_stages=pcfg["num_stages"],
        )
    hits = hits_u8.view(torch.bool) if has_calib else None
    return out, hits
