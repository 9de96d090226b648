"""Dense causal prefill of whole prompts through torch SDPA's fused kernels.

For a prefill with no mask (no sparse rows, no evicted KV, no calibration) the work is plain
causal attention, where torch's fused kernels beat both our Triton kernel (on the GPU: flash
runs at ~540 TFLOP/s on an H200, ours at ~370) and our float32 reference on the CPU
(benchmarks/cpu_dense_prefill.py). A chunk over a cached prefix needs a bottom-right causal
mask, which SDPA's fused kernels run no faster than ours, so chunks are left to the caller.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

_UNSUPPORTED: set[tuple] = set()


def dense_prefill_sdpa(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                       seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                       out: torch.Tensor, q_thr: int, *, whole_batch: bool) -> list[int] | None:
    """Write ``out`` for each sequence with ``q_len > q_thr`` that is a whole prompt (its
    queries cover all its KV slots); returns their indices. K/V are gathered per sequence from
    the paged cache (bytes, small next to a prefill's FLOPs).

    ``whole_batch``: all such sequences or none - None when one of them is a chunk over a cached
    prefix. None also when no fused SDPA kernel takes these shapes (remembered per shape).
    """
    key = (q.device.type, q.dtype, q.shape[1], kv_cache.shape[1], q.shape[2])
    if key in _UNSUPPORTED:
        return None
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    prefill = [(s, qsl[s], qsl[s + 1]) for s in range(len(lens)) if qsl[s + 1] - qsl[s] > q_thr]
    whole = [(s, t0, t1) for s, t0, t1 in prefill if t1 - t0 == lens[s]]
    if not whole or (whole_batch and len(whole) != len(prefill)):
        return None
    _, hkv, page, d2 = kv_cache.shape
    d = d2 // 2
    # on the GPU never the math fallback: it would materialise [heads, q_len, kv_len] scores
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                SDPBackend.EFFICIENT_ATTENTION]
    if not q.is_cuda:
        backends.append(SDPBackend.MATH)
    try:
        with sdpa_kernel(backends):
            for s, t0, t1 in whole:
                length = lens[s]
                nblk = (length + page - 1) // page
                kv = kv_cache[block_table[s, :nblk].long()]  # [nblk, Hkv, page, 2D]
                kv = kv.transpose(0, 1).reshape(hkv, nblk * page, d2)[:, :length]
                o = torch.nn.functional.scaled_dot_product_attention(
                    q[t0:t1].transpose(0, 1)[None], kv[None, ..., :d], kv[None, ..., d:],
                    is_causal=True, scale=scale, enable_gqa=True)
                out[t0:t1] = o[0].transpose(0, 1)
    except RuntimeError:
        _UNSUPPORTED.add(key)
        return None
    return [s for s, _, _ in whole]
