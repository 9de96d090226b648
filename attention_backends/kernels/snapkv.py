"""Triton kernels for SnapKV scoring, the evicted-set partial attention and KV compaction.

All work on one sequence's paged KV (``block_row = block_table[s]``), before compaction, over
the prompt slots ``[0, prompt_len)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attention_backends.kernels.intmath import cdiv, next_power_of_2
from attention_backends.kernels.paged_attention import _mma, _num_sms, _softmax_step
from attention_backends.kernels.reference import max_pool_same

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _load_k(kv_ptr, row_ptr, kvh, offs_n, valid, stride_kb, stride_kh, stride_ks,
            D: tl.constexpr, PAGE: tl.constexpr, WITH_V: tl.constexpr):
    offs_d = tl.arange(0, D)
    blk = tl.load(row_ptr + offs_n // PAGE, mask=valid, other=0).to(tl.int64)
    row = blk * stride_kb + kvh * stride_kh + (offs_n % PAGE).to(tl.int64) * stride_ks
    ptrs = kv_ptr + row[:, None] + offs_d[None, :]
    k = tl.load(ptrs, mask=valid[:, None], other=0.0)
    v = k
    if WITH_V:
        v = tl.load(ptrs + D, mask=valid[:, None], other=0.0)
    return k, v


@triton.jit
def _obs_queries(q_ptr, prompt_len, w, stride_qt, stride_qh, G: tl.constexpr, D: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """Query head ``h = program_id(0)``'s observation queries: ``(h, kv head, row offsets
    [BLOCK_M], row mask (< w), prompt positions, q [BLOCK_M, D] (0 beyond w))``."""
    h = tl.program_id(0)
    kvh = h // G
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < w
    pos = prompt_len - w + offs_m
    q = tl.load(q_ptr + offs_m[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    return h, kvh, offs_m, row_ok, pos, q


@triton.jit
def _obs_lse_kernel(q_ptr, kv_ptr, row_ptr, part_ptr, prompt_len, w, scale_log2, tiles_per_split,
                    stride_qt, stride_qh, stride_kb, stride_kh, stride_ks,
                    G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """Partial log2-sum-exp of each observation query over one split of the keys."""
    h, kvh, offs_m, row_ok, pos, q = _obs_queries(q_ptr, prompt_len, w, stride_qt, stride_qh,
                                                  G, D, BLOCK_M)
    split = tl.program_id(1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    n_tiles = tl.cdiv(prompt_len, BLOCK_N)
    t_lo = split * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)
    for t in range(t_lo, t_hi):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = offs_n < prompt_len
        k, _ = _load_k(kv_ptr, row_ptr, kvh, offs_n, valid, stride_kb, stride_kh, stride_ks,
                       D, PAGE, False)
        qk = _mma(q, tl.trans(k)) * scale_log2
        vis = valid[None, :] & (offs_n[None, :] <= pos[:, None])
        qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(qk - m_safe[:, None]), 1)
        m_i = m_new
    has = l_i > 0
    lse2 = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(part_ptr + (split * tl.num_programs(0) + h) * BLOCK_M + offs_m, lse2)


@triton.jit
def _obs_colsum_kernel(q_ptr, kv_ptr, row_ptr, lse_ptr, out_ptr, prompt_len, w, scale_log2,
                       stride_qt, stride_qh, stride_kb, stride_kh, stride_ks,
                       G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sum over the observation queries of their softmax probabilities, per key."""
    h, kvh, offs_m, row_ok, pos, q = _obs_queries(q_ptr, prompt_len, w, stride_qt, stride_qh,
                                                  G, D, BLOCK_M)
    t = tl.program_id(1)
    lse2 = tl.load(lse_ptr + h * BLOCK_M + offs_m)
    offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = offs_n < prompt_len
    k, _ = _load_k(kv_ptr, row_ptr, kvh, offs_n, valid, stride_kb, stride_kh, stride_ks,
                   D, PAGE, False)
    qk = _mma(q, tl.trans(k)) * scale_log2
    vis = row_ok[:, None] & valid[None, :] & (offs_n[None, :] <= pos[:, None])
    lse_safe = tl.where(lse2 == float("-inf"), 0.0, lse2)
    p = tl.where(vis, tl.exp2(qk - lse_safe[:, None]), 0.0)
    tl.store(out_ptr + h.to(tl.int64) * prompt_len + offs_n, tl.sum(p, 0), mask=valid)


@triton.jit
def _evicted_kernel(q_ptr, kv_ptr, row_ptr, kept_ptr, part_o_ptr, part_lse_ptr, prompt_len,
                    scale_log2, tiles_per_split, stride_kb, stride_kh, stride_ks,
                    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Partial attention of q_ref (the G q heads of one KV head) over the evicted keys."""
    kvh = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < G
    h_r = kvh * G + offs_m
    q = tl.load(q_ptr + h_r[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    n_tiles = tl.cdiv(prompt_len, BLOCK_N)
    t_lo = split * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)
    for t in range(t_lo, t_hi):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        in_range = offs_n < prompt_len
        kept = tl.load(kept_ptr + kvh.to(tl.int64) * prompt_len + offs_n, mask=in_range,
                       other=1)
        ev = in_range & (kept == 0)
        k, v = _load_k(kv_ptr, row_ptr, kvh, offs_n, ev, stride_kb, stride_kh, stride_ks,
                       D, PAGE, True)
        qk = _mma(q, tl.trans(k)) * scale_log2
        qk = tl.where(ev[None, :], qk, float("-inf"))
        m_i, l_i, acc = _softmax_step(qk, v, m_i, l_i, acc)
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse2 = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    part = split * HQ + h_r
    tl.store(part_lse_ptr + part, lse2, mask=row_ok)
    tl.store(part_o_ptr + part[:, None] * D + offs_d[None, :], o, mask=row_ok[:, None])


@triton.jit
def _gather_rows_kernel(kv_ptr, row_ptr, idx_ptr, tmp_ptr, budget, stride_idx,
                        stride_kb, stride_kh, stride_ks,
                        D2: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """tmp[h, j] = kv[slot kept_idx[h, j], h] for j < budget."""
    kvh = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, D2)
    valid = offs_n < budget
    src = tl.load(idx_ptr + kvh * stride_idx + offs_n, mask=valid, other=0)
    blk = tl.load(row_ptr + src // PAGE, mask=valid, other=0).to(tl.int64)
    row = blk * stride_kb + kvh * stride_kh + (src % PAGE).to(tl.int64) * stride_ks
    x = tl.load(kv_ptr + row[:, None] + offs_c[None, :], mask=valid[:, None], other=0.0)
    dst = (kvh.to(tl.int64) * budget + offs_n) * D2
    tl.store(tmp_ptr + dst[:, None] + offs_c[None, :], x, mask=valid[:, None])


@triton.jit
def _scatter_rows_kernel(kv_ptr, row_ptr, tmp_ptr, budget, stride_kb, stride_kh, stride_ks,
                         D2: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """kv[slot j, h] = tmp[h, j] for j < budget."""
    kvh = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, D2)
    valid = offs_n < budget
    src = (kvh.to(tl.int64) * budget + offs_n) * D2
    x = tl.load(tmp_ptr + src[:, None] + offs_c[None, :], mask=valid[:, None], other=0.0)
    blk = tl.load(row_ptr + offs_n // PAGE, mask=valid, other=0).to(tl.int64)
    row = blk * stride_kb + kvh * stride_kh + (offs_n % PAGE).to(tl.int64) * stride_ks
    tl.store(kv_ptr + row[:, None] + offs_c[None, :], x, mask=valid[:, None])


# ----------------------------------------------------------------------------- launchers


def _kv_strides(kv_cache):
    assert kv_cache.stride(3) == 1
    return kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2)


def snapkv_scores_triton(q_obs, kv_cache, block_row, prompt_len, scale, pool_kernel,
                         block_n: int = 64):
    w, hq, d = q_obs.shape
    hkv, page = kv_cache.shape[1], kv_cache.shape[2]
    g = hq // hkv
    dev = q_obs.device
    assert q_obs.stride(2) == 1
    block_m = max(16, next_power_of_2(w))
    n_tiles = cdiv(prompt_len, block_n)
    nsplit = max(1, min(n_tiles, cdiv(2 * _num_sms(dev), hq)))
    per_split = cdiv(n_tiles, nsplit)
    nsplit = cdiv(n_tiles, per_split)
    scale_log2 = float(scale) * LOG2E
    part = torch.empty(nsplit, hq, block_m, dtype=torch.float32, device=dev)
    _obs_lse_kernel[(hq, nsplit)](
        q_obs, kv_cache, block_row, part, prompt_len, w, scale_log2, per_split,
        q_obs.stride(0), q_obs.stride(1), *_kv_strides(kv_cache),
        G=g, D=d, PAGE=page, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=3)
    lse2 = (torch.logsumexp(part * LN2, dim=0) * LOG2E).contiguous()  # [Hq, BLOCK_M]
    colsum = torch.empty(hq, prompt_len, dtype=torch.float32, device=dev)
    _obs_colsum_kernel[(hq, n_tiles)](
        q_obs, kv_cache, block_row, lse2, colsum, prompt_len, w, scale_log2,
        q_obs.stride(0), q_obs.stride(1), *_kv_strides(kv_cache),
        G=g, D=d, PAGE=page, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=2)
    pooled = max_pool_same(colsum, pool_kernel)
    return pooled.reshape(hkv, g, prompt_len).sum(dim=1)


def combine_partials(o: torch.Tensor, lse2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge split partials: ``o [S, ..., D]`` normalised, ``lse2 [S, ...]`` in log2 units.

    Returns ``(o [..., D], lse [...] natural log)``; all-empty rows give 0 and ``-inf``.
    """
    lse = lse2 * LN2
    tot = torch.logsumexp(lse, dim=0)
    safe = torch.where(torch.isfinite(tot), tot, torch.zeros_like(tot))
    wts = torch.exp(lse - safe[None])  # 0 for empty splits
    return (o * wts[..., None]).sum(0), tot


def evicted_partial_triton(q_ref, kv_cache, block_row, kept_idx, prompt_len, scale,
                           block_n: int = 64):
    hq, d = q_ref.shape
    hkv, page = kv_cache.shape[1], kv_cache.shape[2]
    g = hq // hkv
    dev = q_ref.device
    q_ref = q_ref.contiguous()
    kept = torch.zeros(hkv, prompt_len, dtype=torch.int8, device=dev)
    kept.scatter_(1, kept_idx.to(torch.int64), 1)
    n_tiles = cdiv(prompt_len, block_n)
    nsplit = max(1, min(n_tiles, cdiv(2 * _num_sms(dev), hkv)))
    per_split = cdiv(n_tiles, nsplit)
    nsplit = cdiv(n_tiles, per_split)
    part_o = torch.empty(nsplit, hq, d, dtype=torch.float32, device=dev)
    part_lse = torch.empty(nsplit, hq, dtype=torch.float32, device=dev)
    _evicted_kernel[(hkv, nsplit)](
        q_ref, kv_cache, block_row, kept, part_o, part_lse, prompt_len, float(scale) * LOG2E,
        per_split, *_kv_strides(kv_cache),
        HQ=hq, G=g, D=d, PAGE=page, BLOCK_M=max(16, next_power_of_2(g)),
        BLOCK_N=block_n, num_warps=4, num_stages=3)
    return combine_partials(part_o, part_lse)


def compact_kv_triton(kv_cache, block_row, kept_idx, block_n: int = 32):
    hkv, budget = kept_idx.shape
    page, d2 = kv_cache.shape[2], kv_cache.shape[3]
    idx = kept_idx.to(torch.int32).contiguous()
    tmp = torch.empty(hkv, budget, d2, dtype=kv_cache.dtype, device=kv_cache.device)
    grid = (hkv, cdiv(budget, block_n))
    _gather_rows_kernel[grid](kv_cache, block_row, idx, tmp, budget, idx.stride(0),
                              *_kv_strides(kv_cache), D2=d2, PAGE=page, BLOCK_N=block_n,
                              num_warps=4)
    _scatter_rows_kernel[grid](kv_cache, block_row, tmp, budget, *_kv_strides(kv_cache),
                               D2=d2, PAGE=page, BLOCK_N=block_n, num_warps=4)
