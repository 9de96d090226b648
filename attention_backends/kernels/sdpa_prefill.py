"""Dense causal prefill through torch SDPA's fused kernels: whole prompts, and chunks over a
cached prefix.

For a prefill with no mask (no sparse rows, no evicted KV, no calibration) the work is plain
causal attention, where torch's fused kernels (cuDNN or flash on the GPU) beat our Triton kernel
(docs/benchmarks.md) and our float32 reference on the CPU (benchmarks/cpu_dense_prefill.py).

- A whole prompt (its queries cover all its KV slots) is one SDPA call with a causal mask.
- A chunk over a cached prefix of ``c`` slots needs a bottom-right causal mask, which SDPA's
  fused kernels do not run fast (``causal_lower_right`` goes to a slower kernel). It is split
  into two fused calls whose log-sum-exps are merged: the chunk's queries over the prefix (no
  mask) and over the chunk itself (top-left causal, a square). Both run at the fused kernels'
  dense rate; the merge is one pass over the two outputs (``_merge_kernel``).

K/V come from the paged cache (one gather per sequence) or, for whole prompts, from this
step's ``new_kv`` (no gather). With host copies of ``query_start_loc`` and ``seq_lens`` the
dispatch needs no device sync.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

_UNSUPPORTED: set[tuple] = set()
# per (device type, dtype, Hq, Hkv, D): which fused call with log-sum-exp worked (chunks)
_LSE_IMPL: dict[tuple, str] = {}


def _gather_kv(kv_cache: torch.Tensor, row: torch.Tensor, length: int):
    """K, V ``[length, Hkv, D]`` (views of one copy) of one sequence's first ``length`` slots."""
    _, hkv, page, d2 = kv_cache.shape
    nblk = (length + page - 1) // page
    # one pass: the blocks' rows land token-major ([blocks, page, Hkv, 2D])
    x = torch.empty(nblk, page, hkv, d2, dtype=kv_cache.dtype, device=kv_cache.device)
    torch.index_select(kv_cache.transpose(1, 2), 0, row[:nblk].long(), out=x)
    x = x.view(nblk * page, hkv, d2)[:length]
    return x[..., :d2 // 2], x[..., d2 // 2:]


def _bhld(x: torch.Tensor) -> torch.Tensor:
    """[L, H, D] -> [1, H, L, D] view."""
    return x.transpose(0, 1)[None]


LSE_IMPLS = ("cudnn", "flash", "cudnn_rep", "flash_rep")


def _sdpa_lse(q, k, v, causal: bool, scale: float, impl: str | None = None):
    """Fused attention returning ``(o [1, H, L, D], lse [H, L] float32, natural log)``.

    ``q [1, Hq, L, D]``, ``k``/``v [1, Hkv, S, D]``. ``impl`` (one of ``LSE_IMPLS``; ``_rep``:
    K/V heads repeated to the q heads first) or, if None, the first that runs of cuDNN, flash,
    and both with repeated heads (the CPU's flash kernel on the CPU)."""
    key = (q.device.type, q.dtype, q.shape[1], k.shape[1], q.shape[3])
    impls = list(LSE_IMPLS) if q.is_cuda else ["cpu", "cpu_rep"]
    if impl is not None and q.is_cuda:
        impls = [impl]
    elif key in _LSE_IMPL:
        impls = [_LSE_IMPL[key]]
    err = None
    for impl in impls:
        kk, vv = k, v
        if impl.endswith("_rep") and k.shape[1] != q.shape[1]:
            g = q.shape[1] // k.shape[1]
            kk, vv = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        try:
            if impl.startswith("cudnn"):
                r = torch.ops.aten._scaled_dot_product_cudnn_attention(
                    q, kk, vv, None, True, 0.0, causal, False, scale=scale)
            elif impl.startswith("flash"):
                r = torch.ops.aten._scaled_dot_product_flash_attention(
                    q, kk, vv, 0.0, causal, False, scale=scale)
            else:
                r = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q, kk, vv, 0.0, causal, scale=scale)
        except (RuntimeError, TypeError, NotImplementedError) as e:
            err = e
            continue
        o, lse = r[0], r[1]
        _LSE_IMPL.setdefault(key, impl)
        return o, lse.reshape(q.shape[1], -1)[:, :q.shape[2]]
    raise RuntimeError(f"no fused SDPA kernel with log-sum-exp for these shapes: {err}")


_NO_FA2_OUT: set[str] = set()


def _fa2_into(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              out: torch.Tensor) -> bool:
    """Causal FlashAttention-2 of one whole prompt (``q [L, Hq, D]``, ``k``/``v [L, Hkv, D]``)
    written straight into ``out [L, Hq, D]``: no copy of the result. False (nothing written)
    where torch's ``_flash_attention_forward`` has no ``out`` argument or rejects the inputs."""
    if not q.is_cuda or q.device.type in _NO_FA2_OUT:
        return False
    from attention_backends.kernels.host import to_device

    n = q.shape[0]
    cu = to_device(torch.tensor([0, n], dtype=torch.int32), q.device)
    try:
        torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, n, n, 0.0, True, False,
                                                scale=scale, out=out)
    except (RuntimeError, TypeError):
        _NO_FA2_OUT.add(q.device.type)
        return False
    return True


def _merge(out: torch.Tensor, o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor,
           lse2: torch.Tensor, use_triton: bool) -> None:
    """``out [L, H, D] = lse-merge(o1, o2)``; ``o* [L, H, D]`` (any strides, D contiguous),
    ``lse* [H, L]`` float32 natural log (both finite: every query sees a key of each part).
    One Triton pass (``use_triton``), else torch ops."""
    if use_triton:
        import triton

        from attention_backends.kernels.paged_attention import _merge_kernel

        n, h, d = out.shape
        block_t = 16
        _merge_kernel[(triton.cdiv(n, block_t), h)](
            out, o1, o2, lse1, lse2, n, out.stride(0), out.stride(1), o1.stride(0),
            o1.stride(1), o2.stride(0), o2.stride(1), lse1.stride(0), lse1.stride(1),
            lse2.stride(0), lse2.stride(1), D=d, BLOCK_T=block_t, num_warps=4)
        return
    l1 = lse1.t().float()
    l2 = lse2.t().float()
    m = torch.maximum(l1, l2)
    w1 = torch.exp(l1 - m)[..., None]
    w2 = torch.exp(l2 - m)[..., None]
    out.copy_((o1.float() * w1 + o2.float() * w2) / (w1 + w2))


def dense_prefill_sdpa(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                       seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                       out: torch.Tensor, q_thr: int, *, whole_batch: bool,
                       chunks: bool = False, host_query_start_loc: Sequence[int] | None = None,
                       host_seq_lens: Sequence[int] | None = None,
                       new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                       triton_merge: bool = False, lse_impl: str | None = None,
                       whole_impl: str = "sdpa") -> list[int] | None:
    """Write ``out`` for each sequence with ``q_len > q_thr`` that is a whole prompt (or, with
    ``chunks``, any prefill sequence); returns their indices.

    ``whole_batch``: all such sequences or none - None when one of them is not taken.
    ``host_query_start_loc`` / ``host_seq_lens``: host copies (the latter exact on prefill rows;
    decode rows may be upper bounds), else read from the device (a sync).
    ``new_kv``: this step's K and V ``[T, Hkv, D]`` (already in the cache), read by whole
    prompts instead of gathering their K/V. None also when no fused SDPA kernel takes these
    shapes (remembered per shape). ``triton_merge``: merge a chunk's two parts with the Triton
    kernel (GPU, or the interpreter), else with torch ops. ``lse_impl``: the fused kernel of the
    chunks' two parts (``_sdpa_lse``; None: the first that runs). ``whole_impl``: "sdpa"
    (``F.scaled_dot_product_attention``, then a copy into ``out``) or "fa2_out" (FlashAttention-2
    through torch, writing ``out`` itself where the installed torch takes ``out``; else "sdpa").
    """
    key = (q.device.type, q.dtype, q.shape[1], kv_cache.shape[1], q.shape[2], chunks)
    if key in _UNSUPPORTED:
        return None
    qsl = list(host_query_start_loc) if host_query_start_loc is not None \
        else query_start_loc.tolist()
    lens = list(host_seq_lens) if host_seq_lens is not None else seq_lens.tolist()
    prefill = [(s, qsl[s], qsl[s + 1]) for s in range(len(lens)) if qsl[s + 1] - qsl[s] > q_thr]
    take = [(s, t0, t1) for s, t0, t1 in prefill if chunks or t1 - t0 == lens[s]]
    if not take or (whole_batch and len(take) != len(prefill)):
        return None
    # on the GPU never the math fallback: it would materialise [heads, q_len, kv_len] scores
    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                SDPBackend.EFFICIENT_ATTENTION]
    if not q.is_cuda:
        backends.append(SDPBackend.MATH)
    try:
        with sdpa_kernel(backends):
            for s, t0, t1 in take:
                length = lens[s]
                ctx = length - (t1 - t0)
                if ctx == 0 and new_kv is not None:
                    k, v = new_kv[0][t0:t1], new_kv[1][t0:t1]
                else:
                    k, v = _gather_kv(kv_cache, block_table[s], length)
                qs = _bhld(q[t0:t1])
                if ctx == 0:
                    if not (whole_impl == "fa2_out" and _fa2_into(q[t0:t1], k, v, scale,
                                                                  out[t0:t1])):
                        o = torch.nn.functional.scaled_dot_product_attention(
                            qs, _bhld(k), _bhld(v), is_causal=True, scale=scale,
                            enable_gqa=True)
                        out[t0:t1] = o[0].transpose(0, 1)
                else:
                    o1, l1 = _sdpa_lse(qs, _bhld(k[:ctx]), _bhld(v[:ctx]), False, scale,
                                       lse_impl)
                    o2, l2 = _sdpa_lse(qs, _bhld(k[ctx:]), _bhld(v[ctx:]), True, scale,
                                       lse_impl)
                    _merge(out[t0:t1], o1[0].transpose(0, 1), l1, o2[0].transpose(0, 1), l2,
                           triton_merge)
    except RuntimeError:
        _UNSUPPORTED.add(key)
        return None
    return [s for s, _, _ in take]
