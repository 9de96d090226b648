"""Attention through FlashAttention's varlen kernel over the paged KV cache (FlashAttention-3 on
Hopper: vLLM's ``vllm_flash_attn``), where the H200 sweep found it faster than our kernels.

The kernels layer does not import vLLM: the vLLM glue registers FlashAttention's
``flash_attn_varlen_func`` at start-up (``register``), benchmarks do the same, and the tests
register a float32 stand-in with the same contract (``reference.flash_varlen_ref``). With
nothing registered (the CPU path) nothing here runs.

The contract used (FlashAttention's docstring): ``q [T, Hq, D]``; ``k``/``v``
``[num_blocks, block_size, Hkv, D]`` views of the cache with ``block_table [S, max_blocks]``
int32 and ``seqused_k [S]`` int32 (the keys of sequence ``s`` are its first ``seqused_k[s]``
slots); ``cu_seqlens_q [S + 1]`` int32. Masks are aligned to the bottom-right corner: query
``i`` of sequence ``s`` (``q_len`` queries) sits at slot ``p = seqused_k - q_len + i`` and,
with ``causal`` and ``window_size = (left, 0)``, sees keys ``[p - left, p]`` (``left = -1``:
all of ``[0, p]``). ``return_softmax_lse`` gives the natural-log log-sum-exp of the scaled
scores, ``[Hq, T]`` float32; ``out`` is written in place.

Two paths (``ops.paged_attention`` semantics, sink/window per row as int32 ``[S]``):

- ``dense``: plain causal attention of every row, one call, written straight into the
  caller's ``out`` (no copy; the cuDNN path through torch SDPA cannot take an output buffer);
- ``sink_window``: rows with the same window ``W > 0`` and each its own sink (all rows of the
  step, or its prefill rows when they are contiguous and share ``W``: ``prefill_range``): the band
  ``(p - W, p]`` in one call with FlashAttention's sliding window, then ``_sink_merge_kernel``
  (Triton) attends the sink keys that the band leaves out, ``j < min(sink, p - W + 1)``, and
  merges the two parts by log-sum-exp in place (the merge of Flash-Decoding /
  FlashAttention's split-KV, Dao et al. 2023). For sink 128 + window 2048 the extra work over
  the band is ``sink`` keys per query plus one read of q and one read and write of the output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

from attention_backends.kernels.intmath import cdiv, next_power_of_2
from attention_backends.kernels.paged_attention import LOG2E, _mma, _softmax_step

FlashVarlen = Callable[..., object]
_FLASH: list[FlashVarlen] = []


def register(fn: FlashVarlen | None) -> None:
    """Use ``fn`` (FlashAttention's ``flash_attn_varlen_func`` contract, version bound) for
    the paths here; None unregisters."""
    _FLASH.clear()
    if fn is not None:
        _FLASH.append(fn)


def registered() -> FlashVarlen | None:
    return _FLASH[0] if _FLASH else None


def _kv_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ``[num_blocks, block_size, Hkv, D]`` views of the slot-major cache."""
    d = kv_cache.shape[3] // 2
    return kv_cache.transpose(1, 2).split(d, dim=-1)


def dense(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
          seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
          out: torch.Tensor, max_query_len: int, max_seq_len: int) -> torch.Tensor:
    """Causal attention of every row over its paged KV, into ``out [T, Hq, D]``."""
    fn = registered()
    if fn is None:
        raise RuntimeError("no FlashAttention varlen function registered")
    k, v = _kv_views(kv_cache)
    fn(q=q, k=k, v=v, out=out, cu_seqlens_q=query_start_loc, max_seqlen_q=max_query_len,
       seqused_k=seq_lens, max_seqlen_k=max_seq_len, softmax_scale=scale, causal=True,
       block_table=block_table)
    return out


def uniform_window(host_window: Sequence[int] | None, num_seqs: int) -> int | None:
    """The one positive window shared by all ``num_seqs`` rows, else None."""
    if host_window is None or num_seqs == 0:
        return None
    w = {int(x) for x in list(host_window)[:num_seqs]}
    if len(w) != 1:
        return None
    (win,) = w
    return win if win > 0 else None


def prefill_range(host_query_start_loc: Sequence[int], host_window: Sequence[int] | None,
                  q_thr: int, num_seqs: int) -> tuple[int, int, int] | None:
    """``(a, b, W)`` when the rows with more than ``q_thr`` queries (the prefills) are exactly
    the rows ``a .. b - 1`` and share one window ``W > 0`` (the other rows, decodes or empty,
    may have any window); else None. Such prefills run here on views of the batch while our
    decode kernel takes the other rows: a sparse prompt chunk keeps FlashAttention when full
    requests decode beside it."""
    if host_window is None:
        return None
    qsl = list(host_query_start_loc)
    rows = [s for s in range(num_seqs) if qsl[s + 1] - qsl[s] > q_thr]
    if not rows or rows[-1] - rows[0] + 1 != len(rows):
        return None
    win = uniform_window(list(host_window)[rows[0]:rows[-1] + 1], len(rows))
    return None if win is None else (rows[0], rows[-1] + 1, win)


def sink_window(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                out: torch.Tensor, sink: torch.Tensor, window: int, max_query_len: int,
                max_seq_len: int, max_sink: int | None = None) -> torch.Tensor:
    """Sink + window attention (``ops.paged_attention``'s mask with per-row ``sink [S]`` int32
    and one ``window > 0``) into ``out [T, Hq, D]``: the band through FlashAttention's sliding
    window, then the sink keys outside it merged in (``_sink_merge_kernel``). ``max_sink``: a
    host bound on the sinks (None: read from the device, a sync)."""
    fn = registered()
    if fn is None:
        raise RuntimeError("no FlashAttention varlen function registered")
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    k, v = _kv_views(kv_cache)
    _, lse = fn(q=q, k=k, v=v, out=out, cu_seqlens_q=query_start_loc,
                max_seqlen_q=max_query_len, seqused_k=seq_lens, max_seqlen_k=max_seq_len,
                softmax_scale=scale, causal=True, window_size=[window - 1, 0],
                block_table=block_table, return_softmax_lse=True)
    if max_sink is None:
        max_sink = int(sink.max()) if sink.numel() else 0
    if max_sink > 0 and max_seq_len > window:
        sink_merge(q, kv_cache, block_table, seq_lens, query_start_loc, sink, window, out, lse,
                   scale, max_query_len, min(max_sink, max_seq_len - window))
    return out


@triton.jit
def _sink_merge_kernel(q_ptr, kv_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, sink_ptr, out_ptr, lse_ptr,
                       scale_log2, W, stride_qt, stride_qh, stride_kb, stride_kh, stride_ks,
                       stride_bt, stride_ot, stride_oh, stride_lh, stride_lt,
                       G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (token tile, sequence, q head): attention over the sink keys the band leaves out,
    ``j < min(sink, p - W + 1)``, LSE-merged into ``out`` (which holds the band's output, its
    log-sum-exp in ``lse [Hq, T]``, natural log). Rows without such keys are not touched."""
    tb = tl.program_id(0)
    s = tl.program_id(1)
    h = tl.program_id(2)
    q0 = tl.load(qsl_ptr + s)
    q_len = tl.load(qsl_ptr + s + 1) - q0
    t_lo = tb * BLOCK_T
    if t_lo < q_len:
        ctx = tl.load(seq_lens_ptr + s) - q_len
        sink = tl.load(sink_ptr + s)
        t_hi = tl.minimum(t_lo + BLOCK_T, q_len)
        kmax = tl.minimum(sink, ctx + t_hi - W)  # keys of the tile's last query
        if kmax > 0:
            kvh = h // G
            t = t_lo + tl.arange(0, BLOCK_T)
            t_ok = t < q_len
            n_keys = tl.minimum(sink, ctx + t - W + 1)
            row_ok = t_ok & (n_keys > 0)
            tok = (q0 + t).to(tl.int64)
            d = tl.arange(0, D)
            q = tl.load(q_ptr + tok[:, None] * stride_qt + h * stride_qh + d[None, :],
                        mask=t_ok[:, None], other=0.0)
            m_i = tl.full([BLOCK_T], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_T], tl.float32)
            acc = tl.zeros([BLOCK_T, D], tl.float32)
            for n0 in range(0, kmax, BLOCK_N):
                j = n0 + tl.arange(0, BLOCK_N)
                j_ok = j < kmax
                blk = tl.load(bt_ptr + s * stride_bt + j // PAGE, mask=j_ok, other=0)
                base = blk.to(tl.int64) * stride_kb + kvh * stride_kh + (j % PAGE) * stride_ks
                k = tl.load(kv_ptr + base[None, :] + d[:, None], mask=j_ok[None, :], other=0.0)
                v = tl.load(kv_ptr + base[:, None] + D + d[None, :], mask=j_ok[:, None],
                            other=0.0)
                sc = _mma(q, k) * scale_log2
                sc = tl.where(j[None, :] < n_keys[:, None], sc, float("-inf"))
                m_i, l_i, acc = _softmax_step(sc, v, m_i, l_i, acc)
            lb = tl.load(lse_ptr + h.to(tl.int64) * stride_lh + tok * stride_lt, mask=row_ok,
                         other=0.0) * 1.4426950408889634  # log2(e)
            ob = tl.load(out_ptr + tok[:, None] * stride_ot + h * stride_oh + d[None, :],
                         mask=row_ok[:, None], other=0.0).to(tl.float32)
            m_s = tl.where(row_ok, m_i, 0.0)
            mm = tl.maximum(lb, m_s)
            wb = tl.exp2(lb - mm)
            ws = tl.exp2(m_s - mm)  # the sink part's weight is l_i * ws, its output acc / l_i
            den = wb + l_i * ws
            o = (ob * wb[:, None] + acc * ws[:, None]) / tl.where(row_ok, den, 1.0)[:, None]
            tl.store(out_ptr + tok[:, None] * stride_ot + h * stride_oh + d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


SINK_BLOCK_T = 64
SINK_BLOCK_N = 64


def sink_merge(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
               seq_lens: torch.Tensor, query_start_loc: torch.Tensor, sink: torch.Tensor,
               window: int, out: torch.Tensor, lse: torch.Tensor, scale: float,
               max_query_len: int, max_sink: int) -> None:
    """Merge into ``out [T, Hq, D]`` (the band's output, log-sum-exp ``lse [Hq, T]`` float32,
    natural log) the attention over each query's sink keys outside its band
    (``j < min(sink[s], p - window + 1)``). ``max_sink``: a host bound on those keys."""
    t_total, hq, d = q.shape
    hkv, page = kv_cache.shape[1], kv_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    if t_total == 0 or num_seqs == 0 or max_sink <= 0:
        return
    block_n = max(16, min(SINK_BLOCK_N, next_power_of_2(max_sink)))
    grid = (cdiv(max_query_len, SINK_BLOCK_T), num_seqs, hq)
    _sink_merge_kernel[grid](
        q, kv_cache, block_table, seq_lens, query_start_loc, sink, out, lse,
        float(scale) * LOG2E, int(window), q.stride(0), q.stride(1), kv_cache.stride(0),
        kv_cache.stride(1), kv_cache.stride(2), block_table.stride(0), out.stride(0),
        out.stride(1), lse.stride(0), lse.stride(1),
        G=hq // hkv, D=d, PAGE=page, BLOCK_T=SINK_BLOCK_T, BLOCK_N=block_n,
        num_warps=4, num_stages=2)
