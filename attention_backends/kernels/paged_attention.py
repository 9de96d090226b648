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

from attention_backends.kernels.host import to_device
from attention_backends.kernels.intmath import cdiv, next_power_of_2
from attention_backends.kernels.sdpa_prefill import dense_prefill_sdpa, sparse_prefill_sdpa

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
def _softmax_step(qk2, v, m_i, l_i, acc):
    """One online-softmax step over a tile: ``qk2`` the tile's scores in the log2 domain, masked
    keys ``-inf`` (a row with none visible so far keeps ``m = -inf``, ``l = 0``, ``acc = 0``).
    Returns the new ``(m_i, l_i, acc)``."""
    m_new = tl.maximum(m_i, tl.max(qk2, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk2 - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v)
    return m_new, l_i, acc


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
def _calib_hit(qf, qref, tau_ptr, en_ptr, s, AXIS: tl.constexpr):
    """cos(q, q_ref) >= tau[s] on an enabled sequence ``s`` (CaliDrop's reuse test), for rows
    of ``q`` (``AXIS = 1``: ``qf``, ``qref`` float32 ``[rows, D]``) or one row (``AXIS = 0``)."""
    num = tl.sum(qf * qref, AXIS)
    den = tl.sqrt(tl.sum(qf * qf, AXIS) * tl.sum(qref * qref, AXIS))
    cos = num / tl.maximum(den, 1e-12)
    return (cos >= tl.load(tau_ptr + s)) & (tl.load(en_ptr + s) != 0)


@triton.jit
def _calib_weights(lse2, lse_e2):
    """LSE-merge weights of the kept keys (log2 ``lse2``) and the evicted set (log2
    ``lse_e2``), elementwise: ``(w1, w2, den2)``, merged = ``(o * w1 + o_e * w2) / den2``
    (``den2`` 1 where both are empty)."""
    mm = tl.maximum(lse2, lse_e2)
    mm = tl.where(mm == float("-inf"), 0.0, mm)
    w1 = tl.exp2(lse2 - mm)
    w2 = tl.exp2(lse_e2 - mm)
    den2 = w1 + w2
    return w1, w2, tl.where(den2 > 0, den2, 1.0)


@triton.jit
def _calib_rows(q, s, h_r, row_ok, qref_ptr, oe_ptr, lsee_ptr, en_ptr, tau_ptr,
                HQ: tl.constexpr, D: tl.constexpr):
    """Calibration inputs of the rows (q heads ``h_r`` of sequence ``s``, ``q`` their queries):
    ``(hit [rows] bool, o_e [rows, D] float32, lse_e2 [rows] float32 log2)``. Independent of
    the KV loop, so a kernel may issue these loads before it (``CALIB_EARLY``)."""
    offs_d = tl.arange(0, D)
    cal_off = (s * HQ + h_r).to(tl.int64)
    qref = tl.load(qref_ptr + cal_off[:, None] * D + offs_d[None, :], mask=row_ok[:, None],
                   other=0.0).to(tl.float32)
    lse_e2 = tl.load(lsee_ptr + cal_off, mask=row_ok, other=float("-inf")) * 1.4426950408889634
    o_e = tl.load(oe_ptr + cal_off[:, None] * D + offs_d[None, :], mask=row_ok[:, None],
                  other=0.0)
    hit = _calib_hit(q.to(tl.float32), qref, tau_ptr, en_ptr, s, 1) & row_ok
    return hit, o_e, lse_e2


@triton.jit
def _finish(o, lse2, hit, o_e, lse_e2, t_abs, h_r, row_ok, out_ptr, hits_ptr, stride_ot,
            stride_oh, HQ: tl.constexpr, D: tl.constexpr, HAS_CALIB: tl.constexpr):
    """Optional calibration merge (``_calib_rows``' outputs), then store the rows (o
    normalised, lse2 in log2 units)."""
    offs_d = tl.arange(0, D)
    if HAS_CALIB:
        w1, w2, den2 = _calib_weights(lse2, lse_e2)
        merged = (o * w1[:, None] + o_e * w2[:, None]) / den2[:, None]
        o = tl.where(hit[:, None], merged, o)
        tl.store(hits_ptr + t_abs.to(tl.int64) * HQ + h_r, hit.to(tl.int8), mask=row_ok)
    o_ptrs = out_ptr + t_abs.to(tl.int64)[:, None] * stride_ot + h_r[:, None] * stride_oh \
        + offs_d[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _finish_calib(o, lse2, q, s, t_abs, h_r, row_ok, out_ptr, hits_ptr, stride_ot, stride_oh,
                  qref_ptr, oe_ptr, lsee_ptr, en_ptr, tau_ptr, HQ: tl.constexpr,
                  D: tl.constexpr, HAS_CALIB: tl.constexpr):
    """``_finish`` with the calibration inputs loaded here, after the KV loop."""
    if HAS_CALIB:
        hit, o_e, lse_e2 = _calib_rows(q, s, h_r, row_ok, qref_ptr, oe_ptr, lsee_ptr, en_ptr,
                                       tau_ptr, HQ, D)
    else:
        hit, o_e, lse_e2 = row_ok, o, lse2  # unused
    _finish(o, lse2, hit, o_e, lse_e2, t_abs, h_r, row_ok, out_ptr, hits_ptr, stride_ot,
            stride_oh, HQ, D, HAS_CALIB)


@triton.jit
def _finish_row(o, lse2, q, s, t_abs, h, out_ptr, hits_ptr, stride_ot, stride_oh, qref_ptr,
                oe_ptr, lsee_ptr, en_ptr, tau_ptr, HQ: tl.constexpr, D: tl.constexpr,
                HAS_CALIB: tl.constexpr):
    """``_finish_calib`` for a single (token, head) row: o [D] normalised, lse2 scalar (log2)."""
    offs_d = tl.arange(0, D)
    if HAS_CALIB:
        cal_off = (s * HQ + h).to(tl.int64)
        qref = tl.load(qref_ptr + cal_off * D + offs_d).to(tl.float32)
        lse_e2 = tl.load(lsee_ptr + cal_off) * 1.4426950408889634
        o_e = tl.load(oe_ptr + cal_off * D + offs_d)
        hit = _calib_hit(q.to(tl.float32), qref, tau_ptr, en_ptr, s, 0)
        w1, w2, den2 = _calib_weights(lse2, lse_e2)
        merged = (o * w1 + o_e * w2) / den2
        o = tl.where(hit, merged, o)
        tl.store(hits_ptr + t_abs.to(tl.int64) * HQ + h, hit.to(tl.int8))
    tl.store(out_ptr + t_abs.to(tl.int64) * stride_ot + h * stride_oh + offs_d,
             o.to(out_ptr.dtype.element_ty))


@triton.jit
def _decode_kernel(
    q_ptr, kv_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, sink_ptr, window_ptr, kept_ptr, gap_ptr,
    out_ptr, hits_ptr, part_o_ptr, part_lse_ptr, lock_ptr,
    qref_ptr, oe_ptr, lsee_ptr, en_ptr, tau_ptr, scale_log2,
    stride_qt, stride_qh, stride_kb, stride_kh, stride_ks, stride_bt, stride_ot, stride_oh,
    num_splits, q_thr,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_CALIB: tl.constexpr, FINAL: tl.constexpr,
    MAXQ: tl.constexpr, HAS_SW: tl.constexpr, HAS_GAP: tl.constexpr,
    FUSED_REDUCE: tl.constexpr, CALIB_EARLY: tl.constexpr,
):
    """Split-KV (flash-decoding) attention for sequences with ``q_len <= q_thr``: one program
    per (sequence, KV head, split); its rows are the sequence's query tokens x the G q heads of
    the KV head (GQA-packed: each KV tile is read once per KV head).

    ``FINAL`` (one split): the program writes the output. Else it writes a partial (o, lse2);
    with ``FUSED_REDUCE`` the last split of a (sequence, KV head) to finish, found by an atomic
    counter in ``lock_ptr`` (reset to 0 by that program), merges the partials and writes the
    output, so no reduce launch follows; without it ``_decode_reduce_kernel`` does.

    Split ``k`` of ``S`` takes the virtual KV tiles ``k, k + S, k + 2S, ...``: the splits'
    tile counts differ by at most one.

    ``CALIB_EARLY``: the calibration inputs of a program that may write the output are loaded
    before the KV loop, so their memory round trip overlaps it instead of following it.
    """
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    # every per-sequence scalar is loaded before the first branch: one memory round trip, not
    # two, ahead of the block-table load and the first KV tile (all are in bounds: s < seqs)
    q_start = tl.load(qsl_ptr + s)
    q_len = tl.load(qsl_ptr + s + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + s)
    sink, window, kept_end, gap_end = _seq_masks(sink_ptr, window_ptr, kept_ptr, gap_ptr, s,
                                                 HAS_SW, HAS_GAP)
    bt_row = bt_ptr + s.to(tl.int64) * stride_bt
    if (q_len <= 0) | (q_len > q_thr):
        return
    ctx = seq_len - q_len

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
    if HAS_CALIB and CALIB_EARLY and (FINAL or FUSED_REDUCE):
        hit, o_e, lse_e2 = _calib_rows(q, s, h_r, row_ok, qref_ptr, oe_ptr, lsee_ptr, en_ptr,
                                       tau_ptr, HQ, D)
    n1 = _n_tiles(0, a1, BLOCK_N)
    n2 = _n_tiles(b1, a2, BLOCK_N)
    n3 = _n_tiles(b2, end, BLOCK_N)
    n_tot = n1 + n2 + n3

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for vt in range(split, n_tot, num_splits):
        n0, lo, hi = _tile_at(vt, n1, n2, a1, b1, a2, b2, end, BLOCK_N)
        k, v, offs_n, jvalid = _load_kv_tile(kv_ptr, bt_row, kvh, n0, lo, hi, stride_kb,
                                             stride_kh, stride_ks, BLOCK_N, D, PAGE)
        m_i, l_i, acc = _attend_tile(q, k, v, offs_n, jvalid, pos, m_i, l_i, acc, sink, window,
                                     scale_log2, True)

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse2 = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    if FINAL:
        if HAS_CALIB and CALIB_EARLY:
            _finish(o, lse2, hit, o_e, lse_e2, t_abs, h_r, row_ok, out_ptr, hits_ptr,
                    stride_ot, stride_oh, HQ, D, HAS_CALIB)
        else:
            _finish_calib(o, lse2, q, s, t_abs, h_r, row_ok, out_ptr, hits_ptr, stride_ot,
                          stride_oh, qref_ptr, oe_ptr, lsee_ptr, en_ptr, tau_ptr, HQ, D,
                          HAS_CALIB)
    else:
        part0 = ((s.to(tl.int64) * MAXQ + t_rel) * HQ + h_r) * num_splits
        part = part0 + split
        tl.store(part_lse_ptr + part, lse2, mask=row_ok)
        tl.store(part_o_ptr + part[:, None] * D + offs_d[None, :], o, mask=row_ok[:, None])
        if FUSED_REDUCE:
            # every thread's partial stores are issued before the counter moves (the barrier);
            # the release/acquire atomic orders them for the program that reads them
            tl.debug_barrier()
            lock = lock_ptr + s * (HQ // G) + kvh
            arrived = tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu")
            if arrived == num_splits - 1:
                m_r = tl.full([BLOCK_M], float("-inf"), tl.float32)
                l_r = tl.zeros([BLOCK_M], tl.float32)
                acc_r = tl.zeros([BLOCK_M, D], tl.float32)
                for sp in range(0, num_splits):
                    # .cg: from L2, never a stale L1 line
                    lse_s = tl.load(part_lse_ptr + part0 + sp, mask=row_ok,
                                    other=float("-inf"), cache_modifier=".cg")
                    o_s = tl.load(part_o_ptr + (part0 + sp)[:, None] * D + offs_d[None, :],
                                  mask=row_ok[:, None], other=0.0, cache_modifier=".cg")
                    m_new = tl.maximum(m_r, lse_s)
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                    alpha = tl.exp2(m_r - m_safe)
                    w = tl.exp2(lse_s - m_safe)
                    l_r = l_r * alpha + w
                    acc_r = acc_r * alpha[:, None] + o_s * w[:, None]
                    m_r = m_new
                has_r = l_r > 0
                o = acc_r / tl.where(has_r, l_r, 1.0)[:, None]
                lse2 = tl.where(has_r, m_r + tl.log2(tl.where(has_r, l_r, 1.0)), float("-inf"))
                if HAS_CALIB and CALIB_EARLY:
                    _finish(o, lse2, hit, o_e, lse_e2, t_abs, h_r, row_ok, out_ptr, hits_ptr,
                            stride_ot, stride_oh, HQ, D, HAS_CALIB)
                else:
                    _finish_calib(o, lse2, q, s, t_abs, h_r, row_ok, out_ptr, hits_ptr,
                                  stride_ot, stride_oh, qref_ptr, oe_ptr, lsee_ptr, en_ptr,
                                  tau_ptr, HQ, D, HAS_CALIB)
                tl.atomic_xchg(lock, 0)


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
def _tile_runs(lo, hi, c_lo, p_lo, sink, BLOCK_N: tl.constexpr):
    """KV tiles of the visible interval ``[lo, hi)`` as ``(it_lo, ft_lo, ft_hi, it_hi)``: tiles
    ``[ft_lo, ft_hi)`` are full (every key visible to every row of the program: no mask), tiles
    ``[it_lo, ft_lo)`` and ``[ft_hi, it_hi)`` are partial (masked).

    A key is visible to every row when it lies in the interval and in ``[c_lo, p_lo]`` (past the
    window edge of the last row, ``c_lo = 0`` without a window, and not past the first row's
    diagonal) or in ``[0, min(sink, p_lo + 1))``. Of these two runs the interval gets one (the
    window run if it has a whole tile, else the sink run); a full tile missed only costs a mask.
    """
    it_lo = lo // BLOCK_N
    it_hi = tl.where(hi > lo, (hi + BLOCK_N - 1) // BLOCK_N, it_lo)
    w_lo = (tl.maximum(lo, c_lo) + BLOCK_N - 1) // BLOCK_N
    w_hi = tl.minimum(hi, p_lo + 1) // BLOCK_N
    s_lo = (lo + BLOCK_N - 1) // BLOCK_N
    s_hi = tl.minimum(tl.minimum(hi, sink), p_lo + 1) // BLOCK_N
    use_w = w_hi > w_lo
    ft_lo = tl.where(use_w, w_lo, s_lo)
    ft_hi = tl.where(use_w, w_hi, s_hi)
    ft_lo = tl.minimum(tl.maximum(ft_lo, it_lo), it_hi)
    ft_hi = tl.minimum(tl.maximum(ft_hi, ft_lo), it_hi)
    return it_lo, ft_lo, ft_hi, it_hi


@triton.jit
def _attend_full_tile(q, k, v, m_i, l_i, acc, scale_log2):
    """``_attend_tile`` for a tile every row sees whole: no mask, and every row's running max is
    finite after it (no -inf guard)."""
    qk = _mma(q, tl.trans(k))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
    alpha = tl.exp2(m_i - m_new)
    pr = tl.exp2(qk * scale_log2 - m_new[:, None])
    l_i = l_i * alpha + tl.sum(pr, 1)
    acc = acc * alpha[:, None] + _mma(pr.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _prefill_kernel(
    q_ptr, kv_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, cu_tiles_ptr, sink_ptr, window_ptr, kept_ptr,
    gap_ptr, out_ptr, hits_ptr, qref_ptr, oe_ptr, lsee_ptr, en_ptr, tau_ptr, scale_log2,
    stride_qt, stride_qh, stride_kb, stride_kh, stride_ks, stride_bt, stride_ot, stride_oh,
    num_seqs, grid_tiles,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    HAS_CALIB: tl.constexpr, MASK_MODE: tl.constexpr, HAS_SW: tl.constexpr,
    HAS_GAP: tl.constexpr, PACK_GQA: tl.constexpr,
):
    """Prefill (and chunked prefill) over the paged cache.

    ``PACK_GQA``: one program per (KV head, tile of ``BLOCK_M // G`` query tokens), whose
    ``BLOCK_M`` rows are those tokens x the G q heads sharing the KV head (each KV tile is loaded
    once per group, and the window band of a tile is only ``BLOCK_M // G`` tokens wide); else one
    program per (q head, tile of ``BLOCK_M`` tokens), as FlexAttention does.

    The KV tiles a program visits are split, like FlexAttention's block masks, into full tiles
    (every key visible to every row: no mask arithmetic, no load masks) and partial tiles (sink
    end, window edge, diagonal, gap edges), each kind in its own straight-line loop so the
    software pipeliner covers both. ``MASK_MODE`` 1 masks every tile (tests, ablation).
    """
    if PACK_GQA:
        TOK: tl.constexpr = BLOCK_M // G
    else:
        TOK: tl.constexpr = BLOCK_M
    hp = tl.program_id(0)  # KV head (packed) or q head
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
    if PACK_GQA:
        kvh = hp
        t_rel = m0 + offs_m // G
        h_r = kvh * G + offs_m % G
        row_ok = (offs_m < TOK * G) & (t_rel < q_len)
    else:
        kvh = hp // G
        t_rel = m0 + offs_m
        h_r = hp + offs_m * 0
        row_ok = t_rel < q_len
    t_abs = q_start + t_rel
    pos = ctx + t_rel
    q = tl.load(q_ptr + t_abs.to(tl.int64)[:, None] * stride_qt + h_r[:, None] * stride_qh
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    p_lo = ctx + m0
    p_hi = ctx + tl.minimum(m0 + TOK, q_len)
    p_max = p_hi - 1

    a1, b1, a2, b2, end = _visible_intervals(p_lo, p_hi, sink, window, kept_end, gap_end)
    c_lo = tl.where(window > 0, p_max - window + 1, 0)
    # intervals [0, a1), [b1, a2), [b2, end); each: partial, full, partial tile runs
    i1a, f1a, f1b, i1b = _tile_runs(0, a1, c_lo, p_lo, sink, BLOCK_N)
    i2a, f2a, f2b, i2b = _tile_runs(b1, a2, c_lo, p_lo, sink, BLOCK_N)
    i3a, f3a, f3b, i3b = _tile_runs(b2, end, c_lo, p_lo, sink, BLOCK_N)
    if MASK_MODE == 1:
        f1b = f1a
        f2b = f2a
        f3b = f3a
    nf1 = f1b - f1a
    nf12 = nf1 + f2b - f2a
    n_full = nf12 + f3b - f3a
    # partial runs, cumulative counts
    e0 = f1a - i1a
    e1 = e0 + i1b - f1b
    e2 = e1 + f2a - i2a
    e3 = e2 + i2b - f2b
    e4 = e3 + f3a - i3a
    n_part = e4 + i3b - f3b

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    bt_row = bt_ptr + s.to(tl.int64) * stride_bt
    # full tiles: no masks (straight-line body, pipelined)
    for v in range(0, n_full):
        r = tl.where(v < nf1, f1a + v, tl.where(v < nf12, f2a + v - nf1, f3a + v - nf12))
        k, vv, offs_n = _load_kv_tile_full(kv_ptr, bt_row, kvh, r * BLOCK_N, stride_kb,
                                           stride_kh, stride_ks, BLOCK_N, D, PAGE)
        m_i, l_i, acc = _attend_full_tile(q, k, vv, m_i, l_i, acc, scale_log2)
    # partial tiles: sink end, window edge, diagonal, gap edges
    for u in range(0, n_part):
        r = tl.where(u < e0, i1a + u, tl.where(u < e1, f1b + u - e0, tl.where(
            u < e2, i2a + u - e1, tl.where(u < e3, f2b + u - e2, tl.where(
                u < e4, i3a + u - e3, f3b + u - e4)))))
        lo = tl.where(u < e1, 0, tl.where(u < e3, b1, b2))
        hi = tl.where(u < e1, a1, tl.where(u < e3, a2, end))
        k, vv, offs_n, jvalid = _load_kv_tile(kv_ptr, bt_row, kvh, r * BLOCK_N, lo, hi,
                                              stride_kb, stride_kh, stride_ks, BLOCK_N, D, PAGE)
        m_i, l_i, acc = _attend_tile(q, k, vv, offs_n, jvalid, pos, m_i, l_i, acc, sink,
                                     window, scale_log2, True)

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse2 = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    _finish_calib(o, lse2, q, s, t_abs, h_r, row_ok, out_ptr, hits_ptr, stride_ot, stride_oh,
                  qref_ptr, oe_ptr, lsee_ptr, en_ptr, tau_ptr, HQ, D, HAS_CALIB)


@triton.jit
def _merge_kernel(out_ptr, o1_ptr, o2_ptr, l1_ptr, l2_ptr, n, s_ot, s_oh, s_1t, s_1h, s_2t,
                  s_2h, s_l1h, s_l1t, s_l2h, s_l2t, D: tl.constexpr, BLOCK_T: tl.constexpr):
    """out[t, h] = LSE-merge of (o1, l1) and (o2, l2) at (t, h); l* natural-log [H, T]."""
    h = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = t < n
    d = tl.arange(0, D)
    t64 = t.to(tl.int64)
    l1 = tl.load(l1_ptr + h * s_l1h + t64 * s_l1t, mask=ok, other=0.0)
    l2 = tl.load(l2_ptr + h * s_l2h + t64 * s_l2t, mask=ok, other=0.0)
    m = tl.maximum(l1, l2)
    w1 = tl.exp(l1 - m)
    w2 = tl.exp(l2 - m)
    den = w1 + w2
    a = tl.load(o1_ptr + t64[:, None] * s_1t + h * s_1h + d[None, :], mask=ok[:, None],
                other=0.0).to(tl.float32)
    b = tl.load(o2_ptr + t64[:, None] * s_2t + h * s_2h + d[None, :], mask=ok[:, None],
                other=0.0).to(tl.float32)
    o = (a * (w1 / den)[:, None] + b * (w2 / den)[:, None])
    tl.store(out_ptr + t64[:, None] * s_ot + h * s_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _merge_band_kernel(out_ptr, o1_ptr, o2_ptr, l1_ptr, l2_ptr, n, W, R, s_ot, s_oh, s_1c,
                       s_1t, s_1h, s_2c, s_2t, s_2h, s_l1c, s_l1h, s_l1t, s_l2c, s_l2h, s_l2t,
                       D: tl.constexpr, BLOCK_T: tl.constexpr):
    """Sink + window prefill from fused-attention pieces (``sdpa_prefill.sparse_prefill_pieces``):
    ``out[t, h]`` for query ``t`` of a run of chunks of ``W`` queries is the LSE-merge of the
    diagonal piece (``o1``/``l1`` at chunk ``t // W``, row ``t % W``) and the sink + band piece,
    whose queries run backwards (``o2``/``l2`` at chunk ``t // W``, row ``R - 1 - t % W``; a
    negative row has no such keys). ``l*`` natural log, indexed (chunk, head, row)."""
    h = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = t < n
    c = (t // W).to(tl.int64)
    a = t % W
    i2 = R - 1 - a
    ok2 = ok & (i2 >= 0)
    i2 = tl.maximum(i2, 0).to(tl.int64)
    a = a.to(tl.int64)
    d = tl.arange(0, D)
    # the diagonal piece always holds the query's own key: l1 is finite
    l1 = tl.load(l1_ptr + c * s_l1c + h * s_l1h + a * s_l1t, mask=ok, other=0.0)
    l2 = tl.load(l2_ptr + c * s_l2c + h * s_l2h + i2 * s_l2t, mask=ok2, other=float("-inf"))
    m = tl.maximum(l1, l2)
    w1 = tl.exp(l1 - m)
    w2 = tl.exp(l2 - m)
    den = w1 + w2
    x = tl.load(o1_ptr + (c * s_1c + a * s_1t)[:, None] + h * s_1h + d[None, :],
                mask=ok[:, None], other=0.0).to(tl.float32)
    y = tl.load(o2_ptr + (c * s_2c + i2 * s_2t)[:, None] + h * s_2h + d[None, :],
                mask=ok2[:, None], other=0.0).to(tl.float32)
    o = x * (w1 / den)[:, None] + y * (w2 / den)[:, None]
    tl.store(out_ptr + t.to(tl.int64)[:, None] * s_ot + h * s_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kv_ptr, slot_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cb, stride_ch, stride_cs, HKV: tl.constexpr, D: tl.constexpr,
                     PAGE: tl.constexpr, BLOCK_H: tl.constexpr):
    """One program per token: its K and V rows of every KV head to slot ``slot[t]`` of the paged
    cache (block ``slot // PAGE``, offset ``slot % PAGE``); a negative slot (padding) is
    skipped."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, D)
        ok = (h < HKV)[:, None]
        t64 = t.to(tl.int64)
        k = tl.load(k_ptr + t64 * stride_kt + h[:, None] * stride_kh + d[None, :], mask=ok)
        v = tl.load(v_ptr + t64 * stride_vt + h[:, None] * stride_vh + d[None, :], mask=ok)
        dst = kv_ptr + (slot // PAGE) * stride_cb + h[:, None] * stride_ch \
            + (slot % PAGE) * stride_cs + d[None, :]
        tl.store(dst, k.to(kv_ptr.dtype.element_ty), mask=ok)
        tl.store(dst + D, v.to(kv_ptr.dtype.element_ty), mask=ok)


def write_kv_triton(key, value, kv_cache, slot_mapping) -> None:
    """Scatter ``key``/``value [n, Hkv, D]`` (any token and head strides) to ``slot_mapping[n]``
    (negative: skipped) without a host sync."""
    n = slot_mapping.shape[0]
    if n == 0:
        return
    _, hkv, page, d2 = kv_cache.shape
    d = d2 // 2
    assert key.stride(2) == 1 and value.stride(2) == 1 and kv_cache.stride(3) == 1
    _write_kv_kernel[(n,)](
        key, value, kv_cache, slot_mapping, key.stride(0), key.stride(1), value.stride(0),
        value.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        HKV=hkv, D=d, PAGE=page, BLOCK_H=next_power_of_2(hkv), num_warps=4)


# ----------------------------------------------------------------------------- launchers


# ``flash_varlen`` imports this module, so it is imported on first use, then kept (an import
# statement on every call costs about a microsecond).
_FLASH_VARLEN: list = []


def _flash_varlen():
    """The ``flash_varlen`` module."""
    if not _FLASH_VARLEN:
        from attention_backends.kernels import flash_varlen

        _FLASH_VARLEN.append(flash_varlen)
    return _FLASH_VARLEN[0]


FLASH_DTYPES = (torch.float16, torch.bfloat16)  # FlashAttention's 16-bit inputs


def flash_varlen_ok(head_size: int, dtype: torch.dtype = torch.bfloat16, block_size: int = 16,
                    kv_dtype: torch.dtype | None = None) -> bool:
    """A FlashAttention varlen function is registered (``flash_varlen.register``) and can take
    the step: a head size that suits the sink-merge kernel (a power of two, 16 for its dot
    products) and FlashAttention (at most 256), one 16-bit dtype for q, the KV cache
    (``kv_dtype``, None: q's) and the output (a float32 model stays on our kernels), and
    blocks of a multiple of 16 slots (vLLM's FlashAttention block sizes)."""
    return (16 <= head_size <= 256 and head_size & (head_size - 1) == 0
            and dtype in FLASH_DTYPES and kv_dtype in (None, dtype) and block_size % 16 == 0
            and _flash_varlen().registered() is not None)


@functools.lru_cache(maxsize=8)
def _sms_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _sms_of(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: a few splits, so the split/reduce path is exercised


# Defaults, used where tuned_h200.json (below) has no entry. Chosen from the sm_90 compile of
# Triton 3.6 (benchmarks/sm90_compile_report.py) before the v8 sweep: see docs/benchmarks.md.
# waves: decode programs per SM. The split count makes (sequences x KV heads x splits) about
# waves x SMs, all co-resident (one wave: no tail), so one long sequence fills the GPU too.
# num_stages 5: the least that leaves a K/V tile in flight behind the block-table load (one
# stage goes to that indirect load); 64-key tiles keep two such programs per SM.
# fused_max_splits: up to this many splits the last split merges them (no reduce launch).
# calib_early: calibrated rows load their calibration inputs before the KV loop (more
# registers: 200 against 160 per thread at the default shape; with the fused reduce every split
# loads them and only the last uses them; the sweep picks it per batch). Programs of more than
# 32 rows (several queries per sequence) load them late: early, they spill (ptxas, sm_90).
DEFAULT_DECODE = {"block_n": 64, "num_warps": 4, "num_stages": 5, "waves": 2,
                  "fused_max_splits": 16, "calib_early": False}
# Prefill: full and partial KV tiles in two straight-line loops (mask_mode 0), FlexAttention's
# Hopper shape (128 x 64 tiles, 8 warps), 5 stages (three K/V buffers), GQA-packed rows.
# Dense whole prompts through the fused kernels, cuDNN's first (whole_impl); chunks over a
# cached prefix and sink + window prompts on Triton unless the sweep's table says otherwise
# (chunk_backend / sparse_backend).
DEFAULT_PREFILL = {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 5,
                   "mask_mode": 0, "pack_gqa": True, "dense_backend": "sdpa",
                   "chunk_backend": "triton", "whole_impl": "cudnn",
                   "sparse_backend": "triton"}
MAX_SPLITS = 256

# Per-shape winners of the H200 sweep (benchmarks/gpu_sweep.py writes tuned_h200.json; copied
# here it overrides the defaults above): {"prefill": {mode: {min_query_len: cfg}},
# "decode": {mode: {min_num_seqs: cfg}}}, mode "dense" / "sparse" (/ "compressed" for decode).
TUNED_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned_h200.json")


@functools.lru_cache(maxsize=1)
def _tuned_table() -> dict:
    if not os.path.exists(TUNED_FILE):
        return {}
    import json

    with open(TUNED_FILE) as f:
        return json.load(f)


@functools.lru_cache(maxsize=4096)
def tuned_config(kind: str, mode: str, size: int) -> dict:
    """The tuned config of the largest size class ``<= size`` (query length for prefill, batch
    size for decode), or {} (defaults) when none is recorded."""
    classes = _tuned_table().get(kind, {}).get(mode, {})
    fits = [int(k) for k in classes if int(k) <= size]
    return dict(classes[str(max(fits))]) if fits else {}

# Split-K arrival counters of the fused decode reduce, one int32 per (sequence, KV head), zero
# between launches (the last split of each resets its own). Allocated once per device, outside
# any CUDA-graph capture; a batch that needs more than one allocated during capture falls back
# to the separate reduce launch.
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_MIN_COUNTERS = 1 << 14


def _split_counters(device: torch.device, n: int) -> torch.Tensor | None:
    buf = _COUNTERS.get(device)
    if buf is not None and buf.numel() >= n:
        return buf
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    buf = torch.zeros(max(n, _MIN_COUNTERS), dtype=torch.int32, device=device)
    _COUNTERS[device] = buf
    return buf
SPLIT_CHUNK = 32


def _f32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as contiguous float32 (``t`` itself when it already is)."""
    if t.dtype == torch.float32 and t.is_contiguous():
        return t
    return t.to(torch.float32).contiguous()


def decode_splits(kv_tokens: int, block_n: int, waves: int, pairs: int, sms: int) -> int:
    """Splits per (sequence, KV head): ``pairs x splits`` close to (not over) ``waves x SMs``,
    and at least two KV tiles per split."""
    tiles = cdiv(kv_tokens, block_n)
    n = min((waves * sms) // pairs, cdiv(tiles, 2))
    return max(1, min(MAX_SPLITS, n))


def _launch_decode(q, kv_cache, block_table, seq_lens, query_start_loc, sink, window, kept_end,
                   gap_end, out, hits_u8, qref, o_e, lse_e, en, tau, scale_log2, strides, q_thr,
                   max_q_dec, kv_tokens, has_calib, has_sw, has_gap, dcfg):
    """The split-KV decode launch (and its reduce, when the splits are not merged in-kernel)."""
    num_seqs, hq, d = seq_lens.shape[0], q.shape[1], q.shape[2]
    _, hkv, page, _ = kv_cache.shape
    g = hq // hkv
    dev = q.device
    block_m = max(16, next_power_of_2(max_q_dec * g))
    bn = dcfg["block_n"]
    num_splits = dcfg.get("num_splits")
    if num_splits is None:
        num_splits = decode_splits(kv_tokens, bn, dcfg["waves"], num_seqs * hkv, _num_sms(dev))
    num_splits = max(1, int(num_splits))
    final = num_splits == 1
    locks = None
    if final:
        part_o = part_lse = out
    else:
        rows = num_seqs * max_q_dec * hq * num_splits
        part_o = torch.empty(rows * d, dtype=torch.float32, device=dev)
        part_lse = torch.empty(rows, dtype=torch.float32, device=dev)
        if num_splits <= dcfg["fused_max_splits"]:
            locks = _split_counters(dev, num_seqs * hkv)
    fused = locks is not None
    _decode_kernel[(num_seqs, hkv, num_splits)](
        q, kv_cache, block_table, seq_lens, query_start_loc, sink, window, kept_end, gap_end,
        out, hits_u8, part_o, part_lse, locks if fused else seq_lens, qref, o_e, lse_e, en, tau,
        scale_log2, *strides, num_splits, q_thr,
        HQ=hq, G=g, D=d, PAGE=page, BLOCK_M=block_m, BLOCK_N=bn, HAS_CALIB=has_calib,
        FINAL=final, MAXQ=max_q_dec, HAS_SW=has_sw, HAS_GAP=has_gap, FUSED_REDUCE=fused,
        # up to 32 rows: at 64 (multi-token decode rows) the early loads spill registers
        CALIB_EARLY=bool(dcfg.get("calib_early", False)) and block_m <= 32,
        num_warps=dcfg["num_warps"], num_stages=dcfg["num_stages"],
    )
    if not final and not fused:
        _decode_reduce_kernel[(num_seqs, hq, max_q_dec)](
            q, query_start_loc, out, hits_u8, part_o, part_lse, qref, o_e, lse_e, en, tau,
            strides[0], strides[1], strides[6], strides[7], num_splits, q_thr,
            HQ=hq, D=d, SPLIT_CHUNK=SPLIT_CHUNK, HAS_CALIB=has_calib, MAXQ=max_q_dec,
            num_warps=4,
        )


def paged_attention_triton(q, kv_cache, block_table, seq_lens, query_start_loc, scale, sink,
                           window, kept_end, gap_end, calibration, out, *, max_query_len=None,
                           max_seq_len=None, max_kv_tokens=None, decode_config=None,
                           prefill_config=None, host_query_start_loc=None, host_seq_lens=None,
                           new_kv=None, host_sink=None, host_window=None, hits_out=None):
    """Launch the decode and/or prefill kernels. Mask tensors: int32 [num_seqs] or None (0).
    sink and window come together (both or neither), so do kept_end and gap_end.

    A prefill batch without masks or calibration goes to torch SDPA's fused kernels
    (``sdpa_prefill``): whole prompts always, chunks over a cached prefix with
    ``chunk_backend = "sdpa"``; the host copies ``host_query_start_loc`` / ``host_seq_lens``
    spare that dispatch a device sync, ``new_kv`` spares whole prompts their K/V gather. With
    ``sparse_backend = "sdpa"`` (and no gap or calibration in the batch), sink + window whole
    prompts go to the fused kernels too (``sparse_prefill_sdpa``; needs every host copy,
    ``host_sink`` / ``host_window`` included); the Triton kernel takes the other prefills.
    ``hits_out``: int8 ``[T, Hq]``, where the calibration hits go (None: a new tensor)."""
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
        hits_u8 = (hits_out if hits_out is not None
                   else torch.empty(t_total, hq, dtype=torch.int8, device=dev))
        qref = calibration.q_ref.contiguous()
        o_e, lse_e = _f32(calibration.o_e), _f32(calibration.lse_e)
        en = calibration.enabled
        en = en.view(torch.uint8) if en.dtype == torch.bool else en.to(torch.int32)
        en = en.contiguous()
        # one threshold per sequence; a fill, not a host copy, so CUDA graphs can capture it
        tau = calibration.tau
        if not isinstance(tau, torch.Tensor):
            tau = torch.full((num_seqs,), float(tau), dtype=torch.float32, device=dev)
        elif not (tau.dtype == torch.float32 and tau.shape == (num_seqs,) and tau.device == dev
                  and tau.is_contiguous()):
            tau = tau.to(device=dev, dtype=torch.float32).expand(num_seqs).contiguous()
    else:
        hits_u8 = out  # unused
        qref = o_e = lse_e = en = tau = q
    if max_query_len is None:
        if host_query_start_loc is not None:
            hq_l = list(host_query_start_loc)
            max_query_len = max(b - a for a, b in zip(hq_l[:-1], hq_l[1:], strict=True))
        else:
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
    # one stride() call per tensor (a tuple), not one per dimension
    q_st, kv_st, bt_st, out_st = q.stride(), kv_cache.stride(), block_table.stride(), out.stride()
    strides = (q_st[0], q_st[1], kv_st[0], kv_st[1], kv_st[2], bt_st[0], out_st[0], out_st[1])
    assert q_st[2] == 1 and kv_st[3] == 1 and out_st[2] == 1
    assert bt_st[1] == 1

    q_thr = max(1, DECODE_MAX_ROWS // g)
    prefill = max_query_len > q_thr  # some sequence goes to the prefill kernel (or SDPA)
    mode = "compressed" if has_gap else ("sparse" if has_sw else "dense")
    # defaults < the sweep's winners < the caller's settings (later keys override earlier ones)
    dcfg = {**DEFAULT_DECODE, **tuned_config("decode", mode, num_seqs),
            **(decode_config or {})}
    # (a decode step reads no prefill setting)
    pcfg = ({**DEFAULT_PREFILL, **tuned_config("prefill", "sparse" if has_sw else "dense",
                                               max_query_len), **(prefill_config or {})}
            if prefill else {})

    # FlashAttention's varlen kernel (registered by the vLLM glue: ``flash_varlen``) where the
    # sweep found it faster (tuned "dense_backend" / "sparse_backend" / decode "backend" =
    # "flash"): a dense layer whole, a sink + window layer whose rows share one window, or else
    # its prefill rows when they are contiguous and share one window (the decode kernel below
    # takes the other rows)
    flash_rows: range = range(0)
    if (not (has_gap or has_calib) and out.dtype == q.dtype
            and flash_varlen_ok(d, q.dtype, page, kv_cache.dtype)):
        flash_varlen = _flash_varlen()
        backend = (pcfg.get("sparse_backend" if has_sw else "dense_backend") if prefill
                   else dcfg.get("backend", "triton"))
        if backend == "flash":
            if not has_sw:
                flash_varlen.dense(q, kv_cache, block_table, seq_lens, query_start_loc, scale,
                                   out, max_query_len, max_seq_len)
                return out, None
            win = flash_varlen.uniform_window(host_window, num_seqs)
            if win is not None:
                max_sink = (max(int(x) for x in list(host_sink)[:num_seqs])
                            if host_sink is not None else None)
                flash_varlen.sink_window(q, kv_cache, block_table, seq_lens, query_start_loc,
                                         scale, out, sink, win, max_query_len, max_seq_len,
                                         max_sink=max_sink)
                return out, None
            rng = (flash_varlen.prefill_range(host_query_start_loc, host_window, q_thr, num_seqs)
                   if prefill and host_query_start_loc is not None else None)
            if rng is not None:
                a, b, win = rng
                hq_l = list(host_query_start_loc)
                t0, t1 = hq_l[a], hq_l[b]
                max_sink = (max(int(x) for x in list(host_sink)[a:b])
                            if host_sink is not None else None)
                flash_varlen.sink_window(
                    q[t0:t1], kv_cache, block_table[a:b], seq_lens[a:b],
                    query_start_loc[a:b + 1] - t0, scale, out[t0:t1], sink[a:b], win,
                    max_query_len, max_seq_len, max_sink=max_sink)
                flash_rows = range(a, b)

    # decode kernel: sequences with 1 <= q_len <= q_thr (with the host lengths, a batch of
    # prefills alone launches no empty decode grid). A longest query of 1..q_thr tokens is
    # such a sequence (a decode step: no scan of the lengths on every layer).
    has_decode = True
    if host_query_start_loc is not None and not 0 < max_query_len <= q_thr:
        hq_l = list(host_query_start_loc)
        has_decode = any(0 < b - a <= q_thr for a, b in zip(hq_l[:-1], hq_l[1:], strict=True))
    if has_decode:
        _launch_decode(q, kv_cache, block_table, seq_lens, query_start_loc, sink, window,
                       kept_end, gap_end, out, hits_u8, qref, o_e, lse_e, en, tau, scale_log2,
                       strides, q_thr, min(max_query_len, q_thr), min(max_kv_tokens, max_seq_len),
                       has_calib, has_sw, has_gap, dcfg)

    # prefill: sequences with q_len > q_thr. Without any mask or calibration in the batch, the
    # work is plain causal attention, where torch's fused kernels beat ours (docs/benchmarks.md).
    # (The interpreter, UPCAST_DOT, keeps the Triton kernel unless a test asks for SDPA, so the
    # CPU tests exercise it.)
    use_sdpa = prefill and pcfg["dense_backend"] == "sdpa" and (
        not UPCAST_DOT or "dense_backend" in (prefill_config or {}))
    dense_done = (prefill and not (has_sw or has_gap or has_calib) and use_sdpa
                  and dense_prefill_sdpa(q, kv_cache, block_table, seq_lens, query_start_loc,
                                         scale, out, q_thr, whole_batch=True,
                                         chunks=pcfg["chunk_backend"] == "sdpa",
                                         host_query_start_loc=host_query_start_loc,
                                         host_seq_lens=host_seq_lens, new_kv=new_kv,
                                         triton_merge=True, lse_impl=pcfg.get("lse_impl"),
                                         whole_impl=pcfg["whole_impl"])
                  is not None)
    # sink + window whole prompts through fused-attention pieces, where the sweep found them
    # faster than the Triton kernel (tuned "sparse_backend"); the others stay on Triton
    sparse_done: set[int] = set(flash_rows)
    capturing = prefill and dev.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if (prefill and has_sw and not (has_gap or has_calib or capturing)
            and pcfg.get("sparse_backend", "triton") == "sdpa"
            and None not in (host_sink, host_window, host_query_start_loc, host_seq_lens)
            and (not UPCAST_DOT or "sparse_backend" in (prefill_config or {}))):
        sparse_done = set(sparse_prefill_sdpa(
            q, kv_cache, block_table, seq_lens, query_start_loc, scale, out, q_thr, host_sink,
            host_window, host_query_start_loc=host_query_start_loc,
            host_seq_lens=host_seq_lens, new_kv=new_kv, triton_merge=True,
            impl=pcfg.get("lse_impl")))
    if sparse_done:
        hq_l = list(host_query_start_loc)
        dense_done = all(s in sparse_done for s in range(num_seqs)
                         if hq_l[s + 1] - hq_l[s] > q_thr)
    if prefill and not dense_done:
        pack = bool(pcfg["pack_gqa"])
        bm = max(pcfg["block_m"], next_power_of_2(g)) if pack else pcfg["block_m"]
        tok = bm // g if pack else bm
        if host_query_start_loc is not None and not capturing:
            # from the host lengths: one asynchronous copy instead of five small kernels
            hq_l = list(host_query_start_loc)
            cu = [0]
            for s_i, (a, b) in enumerate(zip(hq_l[:-1], hq_l[1:], strict=True)):
                take = b - a > q_thr and s_i not in sparse_done
                cu.append(cu[-1] + ((b - a + tok - 1) // tok if take else 0))
            cu_tiles = to_device(torch.tensor(cu, dtype=torch.int32), dev)
        else:
            q_lens = query_start_loc[1:] - query_start_loc[:-1]
            tiles = torch.where(q_lens > q_thr, (q_lens + tok - 1) // tok,
                                torch.zeros_like(q_lens))
            cu_tiles = torch.zeros(num_seqs + 1, dtype=torch.int32, device=dev)
            cu_tiles[1:] = torch.cumsum(tiles, 0)
        grid_tiles = cdiv(t_total, tok) + num_seqs
        steps = max(1, math.ceil(math.log2(num_seqs + 1)) + 1)
        _prefill_kernel[(hkv if pack else hq, grid_tiles)](
            q, kv_cache, block_table, seq_lens, query_start_loc, cu_tiles, sink, window,
            kept_end, gap_end, out, hits_u8, qref, o_e, lse_e, en, tau, scale_log2, *strides,
            num_seqs, grid_tiles,
            HQ=hq, G=g, D=d, PAGE=page, BLOCK_M=bm, BLOCK_N=pcfg["block_n"],
            SEARCH_STEPS=steps, HAS_CALIB=has_calib, MASK_MODE=pcfg["mask_mode"], HAS_SW=has_sw,
            HAS_GAP=has_gap, PACK_GQA=pack,
            num_warps=pcfg["num_warps"], num_stages=pcfg["num_stages"],
        )
    hits = hits_u8.view(torch.bool) if has_calib else None
    return out, hits
