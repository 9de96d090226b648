"""Prefill through fused attention kernels (torch SDPA's: cuDNN or flash on the GPU): dense
whole prompts, dense chunks over a cached prefix, and sink + window whole prompts.

For a prefill with no mask (no sparse rows, no evicted KV, no calibration) the work is plain
causal attention, where torch's fused kernels beat our Triton kernel (docs/benchmarks.md) and our
float32 reference on the CPU (benchmarks/cpu_dense_prefill.py). On the H200, cuDNN's kernel runs
causal attention about 1.8x faster than torch's FlashAttention-2 (v8 sweep), so cuDNN comes first
wherever ``cudnn_attention_ok``; a shape cuDNN refuses falls back to flash.

- A whole prompt (its queries cover all its KV slots) is one causal call (``_whole_prompt``).
- A chunk over a cached prefix of ``c`` slots needs a bottom-right causal mask, which SDPA's
  fused kernels do not run fast (``causal_lower_right`` goes to a slower kernel). It is split
  into two fused calls whose log-sum-exps are merged: the chunk's queries over the prefix (no
  mask) and over the chunk itself (top-left causal, a square). Both run at the fused kernels'
  dense rate; the merge is one pass over the two outputs (``_merge_kernel``).
- A sink + window whole prompt is cut into causal squares whose log-sum-exps are merged
  (``sparse_prefill_pieces``): the band of the window becomes a causal square once its queries
  and keys are both reversed.

K/V come from the paged cache (one gather per sequence) or, for whole prompts, from this
step's ``new_kv`` (no gather). With host copies of ``query_start_loc`` and ``seq_lens`` the
dispatch needs no device sync.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from attention_backends.kernels.intmath import cdiv

_UNSUPPORTED: set[tuple] = set()


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
# cuDNN's fused attention is used from this runtime version on: torch itself prefers it from
# there (sm90/sm100), and older versions mishandle query lengths that are not a multiple of 128
# (pytorch/pytorch#169849; torch 2.10 turned cuDNN off for those shapes).
MIN_CUDNN_VERSION = 91501
# (impl, shape key) pairs a fused kernel refused: not tried again
_REFUSED: set[tuple] = set()
# calls per fused kernel that ran (``_sdpa_lse``): benchmarks read which one did the work
IMPL_COUNTS: Counter[str] = Counter()


def cudnn_attention_ok(device: torch.device) -> bool:
    """Whether we send attention to cuDNN's fused kernel on ``device``: a Hopper or Blackwell
    GPU (sm90 / sm10x, where torch itself prefers cuDNN; elsewhere flash stays first) with cuDNN
    at least ``MIN_CUDNN_VERSION``."""
    if device.type != "cuda":
        return False
    return _cudnn_ok(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=8)
def _cudnn_ok(index: int) -> bool:
    if not torch.backends.cudnn.is_available():
        return False
    try:
        version = torch.backends.cudnn.version()
    except RuntimeError:
        # torch's Python check refuses a cuDNN runtime older than its build (once; later calls
        # return the version), while its SDPA dispatcher still runs cuDNN's attention on it
        # (seen on the H200 with torch 2.13 over cuDNN 9.19); the minimum below still applies
        try:
            version = torch.backends.cudnn.version()
        except RuntimeError:
            return False
    return (version or 0) >= MIN_CUDNN_VERSION and torch.cuda.get_device_capability(index)[0] in (
        9, 10)


def _math_lse(q, k, v, causal: bool, scale: float):
    """Float32 attention with the log-sum-exp, plain torch ops (any device): the reference the
    fused kernels are checked against. A causal mask is top-left (query ``i`` sees keys
    ``j <= i``)."""
    g = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(g, dim=1)
    vf = v.float().repeat_interleave(g, dim=1)
    s = (q.float() @ kf.transpose(-1, -2)) * scale
    if causal:
        i = torch.arange(q.shape[2], device=q.device)[:, None]
        j = torch.arange(k.shape[2], device=q.device)[None, :]
        s = s.masked_fill(j > i, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return (torch.softmax(s, -1) @ vf).to(q.dtype), lse


def _sdpa_lse(q, k, v, causal: bool, scale: float, impl: str | None = None):
    """Fused attention returning ``(o [B, Hq, Sq, D], lse [B, Hq, Sq] float32, natural log)``.

    ``q [B, Hq, Sq, D]``, ``k``/``v [B, Hkv, Sk, D]`` (any strides with D contiguous); a causal
    mask is top-left. ``impl`` (one of ``LSE_IMPLS``; ``_rep``: K/V heads repeated to the q heads
    first) is tried first, then the others in that order (cuDNN only where
    ``cudnn_attention_ok``), so a shape cuDNN refuses falls back to flash. On the CPU: torch's
    CPU flash kernel; ``impl="math"``: ``_math_lse`` (any device)."""
    if impl == "math":
        return _math_lse(q, k, v, causal, scale)
    if q.is_cuda:
        # torch never sends a single key to cuDNN (unsupported there): neither do we
        cudnn = cudnn_attention_ok(q.device) and k.shape[2] > 1
        allowed = [i for i in LSE_IMPLS if cudnn or not i.startswith("cudnn")]
        impls = ([impl] if impl in allowed else []) + [i for i in allowed if i != impl]
    else:
        impls = ["cpu", "cpu_rep"]
    shape = (q.device.type, q.dtype, tuple(q.shape), tuple(k.shape), causal)
    err = None
    for name in impls:
        if (name, shape) in _REFUSED:
            continue
        kk, vv = k, v
        if name.endswith("_rep") and k.shape[1] != q.shape[1]:
            g = q.shape[1] // k.shape[1]
            kk, vv = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        try:
            if name.startswith("cudnn"):
                r = torch.ops.aten._scaled_dot_product_cudnn_attention(
                    q, kk, vv, None, True, 0.0, causal, False, scale=scale)
            elif name.startswith("flash"):
                r = torch.ops.aten._scaled_dot_product_flash_attention(
                    q, kk, vv, 0.0, causal, False, scale=scale)
            else:
                r = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q, kk, vv, 0.0, causal, scale=scale)
        except (RuntimeError, TypeError, NotImplementedError) as e:
            err = e
            _REFUSED.add((name, shape))
            continue
        IMPL_COUNTS[name] += 1
        b, h, n = q.shape[0], q.shape[1], q.shape[2]
        return r[0], r[1].reshape(b, h, -1)[:, :, :n]
    raise RuntimeError(f"no fused SDPA kernel with log-sum-exp for these shapes: {err}")


WHOLE_IMPLS = ("cudnn", "sdpa", "fa2_out")
_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
             SDPBackend.EFFICIENT_ATTENTION]


def _whole_prompt(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  whole_impl: str) -> torch.Tensor:
    """Causal attention of one whole prompt, ``q [1, Hq, L, D]``, ``k``/``v [1, Hkv, L, D]``
    (GQA inside the kernel), through ``F.scaled_dot_product_attention``: with ``whole_impl``
    "cudnn" (where ``cudnn_attention_ok``) cuDNN's kernel comes first, then flash and
    memory-efficient for the shapes cuDNN does not take; else torch's own order."""
    def attend():
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    if whole_impl == "cudnn" and cudnn_attention_ok(q.device):
        with sdpa_kernel(_PRIORITY, set_priority=True):
            return attend()
    return attend()


def whole_prompt_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                         whole_impl: str) -> str:
    """The fused kernel (``SDPBackend`` name) torch picks for ``_whole_prompt`` with these
    inputs (same layouts): for the benchmark's records."""
    backends = list(_PRIORITY) + ([] if q.is_cuda else [SDPBackend.MATH])

    def choice():
        i = torch._fused_sdp_choice(q, k, v, None, 0.0, True, scale=scale, enable_gqa=True)
        return SDPBackend(i).name

    with sdpa_kernel(backends):
        if whole_impl == "cudnn" and cudnn_attention_ok(q.device):
            with sdpa_kernel(_PRIORITY, set_priority=True):
                return choice()
        return choice()


def _pow2_runs(n: int) -> list[tuple[int, int]]:
    """``[0, n)`` as runs of power-of-two lengths, longest first: ``[(start, length)]``."""
    runs, start = [], 0
    for bit in reversed(range(n.bit_length())):
        if n >> bit & 1:
            runs.append((start, 1 << bit))
            start += 1 << bit
    return runs


def _bhsd(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[n * S, H, D]`` -> ``[n, H, S, D]`` view (chunk-major)."""
    return x.unflatten(0, (n, x.shape[0] // n)).permute(0, 2, 1, 3)


def _merge_band(out, o1, l1, o2, l2, n: int, w: int, r: int, use_triton: bool) -> None:
    """``out [n, H, D]`` = LSE-merge of the diagonal piece (``o1 [C, H, W, D]``, ``l1 [C, H, W]``)
    and the sink + band piece (``o2 [C, H, R, D]``, ``l2 [C, H, R]``, queries backwards): query
    ``t`` is row ``t % W`` of ``o1`` and row ``R - 1 - t % W`` of ``o2`` (none if negative), in
    chunk ``t // W``. One Triton pass (``use_triton``), else torch ops."""
    if use_triton:
        from attention_backends.kernels.paged_attention import _merge_band_kernel

        h, d = out.shape[1], out.shape[2]
        block_t = 16
        _merge_band_kernel[(cdiv(n, block_t), h)](
            out, o1, o2, l1, l2, n, w, r, out.stride(0), out.stride(1), o1.stride(0),
            o1.stride(2), o1.stride(1), o2.stride(0), o2.stride(2), o2.stride(1), l1.stride(0),
            l1.stride(1), l1.stride(2), l2.stride(0), l2.stride(1), l2.stride(2), D=d,
            BLOCK_T=block_t, num_warps=4)
        return
    t = torch.arange(n, device=out.device)
    c, a = t // w, t % w
    i2 = r - 1 - a
    has2 = (i2 >= 0)[:, None]
    i2 = i2.clamp_min(0)
    x, lx = o1[c, :, a].float(), l1[c, :, a].float()  # [n, H, D], [n, H]
    y = o2[c, :, i2].float()
    ly = l2[c, :, i2].float().masked_fill(~has2, float("-inf"))
    m = torch.maximum(lx, ly)
    wx, wy = torch.exp(lx - m)[..., None], torch.exp(ly - m)[..., None]
    out.copy_((x * wx + y.nan_to_num(0.0) * wy) / (wx + wy))


def sparse_prefill_pieces(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: int,
                          window: int, scale: float, out: torch.Tensor, *,
                          impl: str | None = None, triton_merge: bool = False) -> None:
    """Sink + window causal attention of one whole prompt from plain causal fused-attention
    calls (cuDNN's on the H200), written into ``out``.

    ``q [L, Hq, D]``, ``k``/``v [L, Hkv, D]``, ``out [L, Hq, D]`` (token-major, any strides with
    D contiguous); ``sink >= 0``, ``window >= 1``, ``sink + window >= 2`` (ints, else
    ``ValueError``). Query ``p`` sees key ``j`` iff ``j <= p`` and (``j < sink`` or
    ``j > p - window``), as in ``ops.paged_attention``.

    Pieces, with ``P = sink + window``:

    - queries ``[0, P)`` see every earlier key: one causal call;
    - the rest, in chunks of ``W = window`` queries starting at ``s = P + c * W``: the
      *diagonal piece* (keys ``[s, s + W)``, causal: a view of q/k/v), and the *sink + band
      piece*: the ``sink`` keys and the ``W - 1`` window keys before ``s``, of which query
      ``s + a`` sees the last ``W - 1 - a``. In reverse order (queries and band keys both
      backwards) that is a causal square of side ``R = sink + W - 1``: key rows = the sink keys
      then the band keys backwards, query rows = ``sink - 1`` filler rows then the chunk's
      queries backwards, so row ``sink - 1 + i`` (query ``a = W - 1 - i``) sees every sink key
      and the ``i`` nearest band keys. These rows are gathered once (``index_select``);
    - the two pieces of each query are merged by log-sum-exp (``_merge_band``).

    The computed FLOPs match the mask's (the band triangle is a causal square, not a masked
    rectangle), up to the ``sink - 1`` filler rows of each chunk. A last partial chunk is padded
    to ``W`` queries (filler rows after the real ones, never seen by them), and full chunks go
    in runs of power-of-two lengths, so the shapes of the fused calls take a few values per
    ``(sink, window)`` whatever ``L``: cuDNN builds an execution plan per new shape.
    ``impl``: the fused kernel to try first (``_sdpa_lse``)."""
    if sink < 0 or window < 1 or sink + window < 2:
        raise ValueError(f"need sink >= 0, window >= 1, sink + window >= 2: {sink}, {window}")
    n_tok = q.shape[0]
    p0 = min(n_tok, sink + window)
    o, _ = _sdpa_lse(_bhsd(q[:p0], 1), _bhsd(k[:p0], 1), _bhsd(v[:p0], 1), True, scale, impl)
    out[:p0] = o[0].transpose(0, 1)
    n_gen = n_tok - p0
    if n_gen <= 0:
        return
    w = window
    n_full, rem = divmod(n_gen, w)
    n_chunks = n_full + (rem > 0)
    r = sink + w - 1
    dev = q.device
    # sink + band rows, all chunks: query rows i -> a = R - 1 - i (filler where a >= W or the
    # query is past the prompt), key rows i -> sink key i, then band key s + sink - 1 - i
    i = torch.arange(r, device=dev)
    s = p0 + w * torch.arange(n_chunks, device=dev)[:, None]
    a = r - 1 - i
    qpos = torch.where(a < w, s + a, s).clamp_max(n_tok - 1).flatten()
    kpos = torch.where(i < sink, i, s + sink - 1 - i).flatten()
    qb = _bhsd(q.index_select(0, qpos), n_chunks)
    kb = _bhsd(k.index_select(0, kpos), n_chunks)
    vb = _bhsd(v.index_select(0, kpos), n_chunks)
    runs = [(c0, g, False) for c0, g in _pow2_runs(n_full)] + ([(n_full, 1, True)] if rem else [])
    for c0, g, partial in runs:
        t0 = p0 + c0 * w
        if partial:
            # the last chunk padded to W queries and keys (zeros after the prompt's end): the
            # real queries never see the padding keys (causal), the padding rows are dropped
            qd, kd, vd = (torch.zeros(w, *x.shape[1:], dtype=x.dtype, device=dev)
                          for x in (q, k, v))
            for dst, src in ((qd, q), (kd, k), (vd, v)):
                dst[:rem] = src[t0:]
            n_rows = rem
        else:
            qd, kd, vd = (x[t0:t0 + g * w] for x in (q, k, v))
            n_rows = g * w
        o1, l1 = _sdpa_lse(_bhsd(qd, g), _bhsd(kd, g), _bhsd(vd, g), True, scale, impl)
        o2, l2 = _sdpa_lse(qb[c0:c0 + g], kb[c0:c0 + g], vb[c0:c0 + g], True, scale, impl)
        _merge_band(out[t0:t0 + n_rows], o1, l1, o2, l2, n_rows, w, r, triton_merge)


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
        from attention_backends.kernels.paged_attention import _merge_kernel

        n, h, d = out.shape
        block_t = 16
        _merge_kernel[(cdiv(n, block_t), h)](
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


def _prefill_rows(q, seq_lens, query_start_loc, q_thr, host_query_start_loc, host_seq_lens):
    """``(prefill rows [(seq, t0, t1)] with q_len > q_thr, seq lens)`` from the host copies, else
    from the device (a sync)."""
    qsl = list(host_query_start_loc) if host_query_start_loc is not None \
        else query_start_loc.tolist()
    lens = list(host_seq_lens) if host_seq_lens is not None else seq_lens.tolist()
    return [(s, qsl[s], qsl[s + 1]) for s in range(len(lens))
            if qsl[s + 1] - qsl[s] > q_thr], lens


def _backends(q: torch.Tensor) -> list:
    # on the GPU never the math fallback: it would materialise [heads, q_len, kv_len] scores
    return list(_PRIORITY) + ([] if q.is_cuda else [SDPBackend.MATH])


def dense_prefill_sdpa(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                       seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                       out: torch.Tensor, q_thr: int, *, whole_batch: bool,
                       chunks: bool = False, host_query_start_loc: Sequence[int] | None = None,
                       host_seq_lens: Sequence[int] | None = None,
                       new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                       triton_merge: bool = False, lse_impl: str | None = None,
                       whole_impl: str = "cudnn") -> list[int] | None:
    """Write ``out`` for each sequence with ``q_len > q_thr`` that is a whole prompt (or, with
    ``chunks``, any prefill sequence); returns their indices.

    ``whole_batch``: all such sequences or none - None when one of them is not taken.
    ``host_query_start_loc`` / ``host_seq_lens``: host copies (the latter exact on prefill rows;
    decode rows may be upper bounds), else read from the device (a sync).
    ``new_kv``: this step's K and V ``[T, Hkv, D]`` (already in the cache), read by whole
    prompts instead of gathering their K/V. None also when no fused SDPA kernel takes these
    shapes (remembered per shape). ``triton_merge``: merge a chunk's two parts with the Triton
    kernel (GPU, or the interpreter), else with torch ops. ``lse_impl``: the fused kernel tried
    first for the chunks' two parts (``_sdpa_lse``). ``whole_impl`` (``WHOLE_IMPLS``): "cudnn"
    (``_whole_prompt`` with cuDNN's kernel first where ``cudnn_attention_ok``, then a copy into
    ``out``), "sdpa" (torch's own choice of kernel) or "fa2_out" (FlashAttention-2 through
    torch, writing ``out`` itself where the installed torch takes ``out``; else "cudnn").
    """
    key = (q.device.type, q.dtype, q.shape[1], kv_cache.shape[1], q.shape[2], chunks)
    if key in _UNSUPPORTED:
        return None
    prefill, lens = _prefill_rows(q, seq_lens, query_start_loc, q_thr, host_query_start_loc,
                                  host_seq_lens)
    take = [(s, t0, t1) for s, t0, t1 in prefill if chunks or t1 - t0 == lens[s]]
    if not take or (whole_batch and len(take) != len(prefill)):
        return None
    try:
        with sdpa_kernel(_backends(q)):
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
                        o = _whole_prompt(qs, _bhld(k), _bhld(v), scale,
                                          "cudnn" if whole_impl == "fa2_out" else whole_impl)
                        out[t0:t1] = o[0].transpose(0, 1)
                else:
                    o1, l1 = _sdpa_lse(qs, _bhld(k[:ctx]), _bhld(v[:ctx]), False, scale,
                                       lse_impl)
                    o2, l2 = _sdpa_lse(qs, _bhld(k[ctx:]), _bhld(v[ctx:]), True, scale,
                                       lse_impl)
                    _merge(out[t0:t1], o1[0].transpose(0, 1), l1[0], o2[0].transpose(0, 1),
                           l2[0], triton_merge)
    except RuntimeError:
        _UNSUPPORTED.add(key)
        return None
    return [s for s, _, _ in take]


PIECES_MIN_WINDOW = 16


def sparse_prefill_sdpa(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                        out: torch.Tensor, q_thr: int, host_sink: Sequence[int],
                        host_window: Sequence[int], *,
                        host_query_start_loc: Sequence[int] | None = None,
                        host_seq_lens: Sequence[int] | None = None,
                        new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                        triton_merge: bool = False, impl: str | None = None) -> list[int]:
    """Sink + window prefill of the whole prompts (``q_len > q_thr``, no cached prefix,
    ``window > 0``) from fused-attention pieces (``sparse_prefill_pieces``); returns the indices
    of the sequences written (the others are left to the Triton kernel). Windows under
    ``PIECES_MIN_WINDOW`` stay on Triton: their pieces would be a few keys wide.

    ``host_sink`` / ``host_window``: this layer's per-sequence sink and window (host ints, window
    0 = full attention). Other arguments as in ``dense_prefill_sdpa``; ``impl``: the fused
    kernel tried first (``_sdpa_lse``). A sequence no fused kernel takes is left out (and the
    shape remembered)."""
    prefill, lens = _prefill_rows(q, seq_lens, query_start_loc, q_thr, host_query_start_loc,
                                  host_seq_lens)
    done = []
    for s, t0, t1 in prefill:
        sink, window = int(host_sink[s]), int(host_window[s])
        key = (q.device.type, q.dtype, q.shape[1], kv_cache.shape[1], q.shape[2], "sparse")
        if t1 - t0 != lens[s] or window < PIECES_MIN_WINDOW or key in _UNSUPPORTED:
            continue
        if new_kv is not None:
            k, v = new_kv[0][t0:t1], new_kv[1][t0:t1]
        else:
            k, v = _gather_kv(kv_cache, block_table[s], lens[s])
        try:
            sparse_prefill_pieces(q[t0:t1], k, v, max(sink, 0), window, scale, out[t0:t1],
                                  impl=impl, triton_merge=triton_merge)
        except RuntimeError:
            _UNSUPPORTED.add(key)
            continue
        done.append(s)
    return done
