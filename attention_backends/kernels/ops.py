"""Public attention ops: one API for the GPU (Triton) and CPU (PyTorch reference) paths.

CUDA tensors go to the Triton kernels; CPU tensors go to the float32 references in
``attention_backends.kernels.reference``, unless ``FLUXSERVE_FORCE_TRITON=1`` (with
``TRITON_INTERPRET=1`` this runs the Triton kernels on CPU tensors in Triton's interpreter; the
kernel tests use it).
Triton is imported lazily, so importing this module never needs it.

Paged KV cache: ``kv_cache[num_blocks, num_kv_heads, block_size, 2 * head_size]``, slot-major (K
then V on the last dim) unless a ``kv_layout`` (``kernels.kv_layout``) says otherwise: the CPU
backend passes vLLM's CPU layout; the Triton kernels take slot-major only.
``block_table[num_seqs, max_blocks]`` int32; ``seq_lens[num_seqs]`` int32 counts the KV slots of
each sequence including this step's tokens (already written); ``query_start_loc[num_seqs + 1]``
int32. The queries of sequence ``s`` are its last ``q_len_s`` slots.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from attention_backends.kernels import cpu_paged
from attention_backends.kernels import kv_layout as kv_layout_lib
from attention_backends.kernels import reference as ref
from attention_backends.kernels.kv_layout import KVLayout
from attention_backends.kernels.sdpa_prefill import dense_prefill_sdpa

__all__ = [
    "Calibration",
    "paged_attention",
    "snapkv_scores",
    "select_kept",
    "evicted_partial",
    "compact_kv",
    "write_kv",
]

FORCE_TRITON_ENV = "FLUXSERVE_FORCE_TRITON"


@dataclass
class Calibration:
    """Per-sequence calibration inputs standing in for the evicted keys.

    ``q_ref [num_seqs, Hq, D]`` (q's dtype), ``o_e [num_seqs, Hq, D]`` float32 softmax-normalised
    output of ``q_ref`` over the evicted keys, ``lse_e [num_seqs, Hq]`` float32 log-sum-exp of its
    scaled scores (``-inf``: nothing evicted), ``enabled [num_seqs]`` bool, ``tau`` the cosine
    threshold: one float for all sequences, or a float32 ``[num_seqs]`` tensor (requests of one
    batch may ask for different thresholds).
    """

    q_ref: Tensor
    o_e: Tensor
    lse_e: Tensor
    enabled: Tensor
    tau: float | Tensor

    def tau_of(self, seq: int) -> float:
        return float(self.tau[seq]) if isinstance(self.tau, Tensor) else float(self.tau)


def _use_triton(t: Tensor) -> bool:
    return t.is_cuda or os.environ.get(FORCE_TRITON_ENV) == "1"


def _slot_major_only(kv_layout: KVLayout | None) -> None:
    if kv_layout is not None and not kv_layout.is_slot_major:
        raise ValueError(f"the Triton kernels read a slot-major KV cache, not {kv_layout.name}")


def _as_i32(x: Tensor | None, device: torch.device) -> Tensor | None:
    """``x`` as a contiguous int32 tensor on ``device``: ``x`` itself when it already is (the
    usual case; the checks cost a fraction of the no-op ``to`` / ``contiguous`` calls)."""
    if x is None:
        return None
    if x.dtype == torch.int32 and x.device == device and x.is_contiguous():
        return x
    return x.to(device=device, dtype=torch.int32).contiguous()


def _i32(x: Tensor) -> Tensor:
    """``x`` as a contiguous int32 tensor (``x`` itself when it already is)."""
    if x.dtype == torch.int32 and x.is_contiguous():
        return x
    return x.to(torch.int32).contiguous()


# The Triton launcher module, imported on the first Triton call (this module must import
# without Triton), then kept: an import statement costs about a microsecond per call.
_TRITON_PAGED: list = []


def _paged_attention_triton():
    if not _TRITON_PAGED:
        from attention_backends.kernels import paged_attention as triton_paged

        _TRITON_PAGED.append(triton_paged)
    return _TRITON_PAGED[0].paged_attention_triton


def _dense_cpu(q: Tensor, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
               query_start_loc: Tensor, scale: float, out: Tensor | None):
    """Unmasked attention on the CPU: whole prompts through torch SDPA, the other sequences
    (decode steps, chunks over a cached prefix) through the float32 reference."""
    if out is None:
        out = torch.empty_like(q)
    done = set(dense_prefill_sdpa(q, kv_cache, block_table, seq_lens, query_start_loc, scale,
                                  out, q_thr=1, whole_batch=False) or ())
    if not done:
        return ref.paged_attention_ref(q, kv_cache, block_table, seq_lens, query_start_loc,
                                       scale, out=out)
    qsl = query_start_loc.tolist()
    rest = [s for s in range(seq_lens.shape[0]) if s not in done and qsl[s + 1] > qsl[s]]
    if rest:
        spans = [(qsl[s], qsl[s + 1]) for s in rest]
        sub_qsl = torch.tensor([0] + [t1 - t0 for t0, t1 in spans]).cumsum(0).to(torch.int32)
        sub_out, _ = ref.paged_attention_ref(
            torch.cat([q[t0:t1] for t0, t1 in spans]), kv_cache, block_table[rest],
            seq_lens[rest], sub_qsl, scale)
        for (t0, t1), a in zip(spans, sub_qsl.tolist(), strict=False):
            out[t0:t1] = sub_out[a:a + t1 - t0]
    return out, None


@functools.lru_cache(maxsize=16)
def _slot_major(block_size: int, head_size: int) -> KVLayout:
    return kv_layout_lib.slot_major(block_size, head_size)


def _masked_cpu(q: Tensor, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                query_start_loc: Tensor, scale: float, sink: Tensor | None,
                window: Tensor | None, kept_end: Tensor | None, gap_end: Tensor | None,
                calibration: Calibration | None, out: Tensor | None,
                kv_layout: KVLayout | None) -> tuple[Tensor, Tensor | None]:
    """Masked attention on the CPU (``cpu_paged.masked_paged_attention``); a calibrated row with
    several queries (rare: calibration starts after the prompt) through the float32 reference."""
    if out is None:
        out = torch.empty_like(q)
    layout = kv_layout or _slot_major(kv_cache.shape[2], kv_cache.shape[3] // 2)
    n = seq_lens.shape[0]
    qsl = query_start_loc.tolist()
    hits = None
    by_ref: list[int] = []
    if calibration is not None:
        hits = torch.zeros(q.shape[0], q.shape[1], dtype=torch.bool, device=q.device)
        by_ref = [s for s, on in enumerate(calibration.enabled.tolist())
                  if on and qsl[s + 1] - qsl[s] > 1]
    taken = set(by_ref)
    cpu_paged.masked_paged_attention(
        q, kv_cache, block_table, seq_lens, query_start_loc, scale, sink=sink, window=window,
        kept_end=kept_end, gap_end=gap_end, out=out, kv_layout=layout, calibration=calibration,
        hits=hits, rows=[s for s in range(n) if s not in taken] if taken else None)
    if not by_ref:
        return out, hits
    tokens = torch.cat([torch.arange(qsl[s], qsl[s + 1]) for s in by_ref])
    sel = torch.tensor(by_ref, dtype=torch.int64)
    sub_qsl = torch.tensor([0, *[qsl[s + 1] - qsl[s] for s in by_ref]]).cumsum(0)
    tau = calibration.tau
    sub_calib = Calibration(calibration.q_ref[sel], calibration.o_e[sel],
                            calibration.lse_e[sel], calibration.enabled[sel],
                            tau[sel] if isinstance(tau, Tensor) else tau)
    o, h = ref.paged_attention_ref(
        q.index_select(0, tokens), kv_cache, block_table[sel], seq_lens[sel], sub_qsl, scale,
        **{name: t[sel] if t is not None else None for name, t in
           (("sink", sink), ("window", window), ("kept_end", kept_end), ("gap_end", gap_end))},
        calibration=sub_calib, kv_layout=kv_layout)
    out.index_copy_(0, tokens, o)
    hits.index_copy_(0, tokens, h)
    return out, hits


def paged_attention(q: Tensor, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                    query_start_loc: Tensor, scale: float, *, sink: Tensor | None = None,
                    window: Tensor | None = None, kept_end: Tensor | None = None,
                    gap_end: Tensor | None = None, calibration: Calibration | None = None,
                    out: Tensor | None = None, max_query_len: int | None = None,
                    max_seq_len: int | None = None, max_kv_tokens: int | None = None,
                    decode_config: dict | None = None,
                    prefill_config: dict | None = None,
                    kv_layout: KVLayout | None = None,
                    host_query_start_loc: Sequence[int] | None = None,
                    host_seq_lens: Sequence[int] | None = None,
                    new_kv: tuple[Tensor, Tensor] | None = None,
                    host_sink: Sequence[int] | None = None,
                    host_window: Sequence[int] | None = None,
                    hits_out: Tensor | None = None
                    ) -> tuple[Tensor, Tensor | None]:
    """Varlen paged attention with sink/window/gap masks and optional calibration.

    Key slot ``j`` is visible to the query at slot ``p`` of sequence ``s`` iff ``j <= p`` and
    ``(j < kept_end[s] or j >= gap_end[s])`` and ``(window[s] <= 0 or j < sink[s] or
    j > p - window[s])``. ``sink``/``window``/``kept_end``/``gap_end`` are int32 ``[num_seqs]``;
    None means 0 for all. Slots in the gap ``[kept_end, gap_end)`` are never read (their blocks
    may be freed and reused).

    With ``calibration``, a (token, q head) whose sequence is enabled and whose query has cosine
    ``>= tau`` with ``q_ref[s, h]`` gets the LSE-merge of the kept-key output and
    ``(o_e, lse_e)``, and ``hit = True``; other rows get the kept-key output. A row with no
    visible key gets 0.

    Returns ``(out [T, Hq, D] in q.dtype, calib_hits [T, Hq] bool or None)``.

    Optional tuning (Triton path only, ignored on CPU), host ints that save device syncs and size
    the split-KV grid: ``max_query_len``, ``max_seq_len``, ``max_kv_tokens`` (an upper bound on
    the keys any sequence sees, e.g. ``sink + window + q_len`` for SA or ``budget + decoded`` for
    compressed KV; defaults to ``max_seq_len``); ``decode_config`` / ``prefill_config`` (block
    sizes, warps, stages, ``num_splits``); ``host_query_start_loc`` / ``host_seq_lens`` (host
    copies of the two tensors, ``host_seq_lens`` exact at least on rows with ``q_len > 1``: the
    dense-prefill dispatch then needs no device sync); ``new_kv`` (this step's K and V
    ``[T, Hkv, D]``, already written to the cache: whole prompts read them instead of gathering
    their K/V from the cache); ``host_sink`` / ``host_window`` (host copies of ``sink`` and
    ``window``: with the other host copies they let sink + window whole prompts run on the fused
    attention kernels where the tuned table's ``sparse_backend`` says so).

    ``hits_out``: with ``calibration``, the buffer the hits are written into (int8 ``[T, Hq]``,
    contiguous; the returned hits are its bool view): a caller whose call a CUDA graph captures
    reads them there after a replay.

    ``kv_layout``: where K/V lie in the cache (None: slot-major); raises ``ValueError`` for any
    other layout on the Triton path, and for a ``hits_out`` of another dtype or shape.
    """
    t_total, hq, d = q.shape
    hkv = kv_cache.shape[1]
    if hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of KV heads ({hkv})")
    if kv_cache.shape[3] != 2 * d:
        raise ValueError(f"kv_cache last dim {kv_cache.shape[3]} != 2 * head_size {2 * d}")
    if out is not None and out.shape != q.shape:
        raise ValueError(f"out shape {tuple(out.shape)} != q shape {tuple(q.shape)}")
    if hits_out is not None and (hits_out.dtype != torch.int8 or hits_out.shape != q.shape[:2]
                                 or not hits_out.is_contiguous()):
        raise ValueError(f"hits_out must be a contiguous int8 [{t_total}, {hq}] tensor, not "
                         f"{hits_out.dtype} {tuple(hits_out.shape)}")
    if not _use_triton(q):
        out, hits = _paged_attention_cpu(q, kv_cache, block_table, seq_lens, query_start_loc,
                                         scale, sink, window, kept_end, gap_end, calibration,
                                         out, kv_layout)
        if hits_out is not None and hits is not None:
            hits_out.copy_(hits.view(torch.int8))
            hits = hits_out.view(torch.bool)
        return out, hits
    _slot_major_only(kv_layout)
    dev = q.device
    return _paged_attention_triton()(
        q.contiguous() if q.stride(2) != 1 else q, kv_cache,
        block_table if block_table.dtype == torch.int32 else block_table.to(torch.int32),
        _i32(seq_lens), _i32(query_start_loc), scale, _as_i32(sink, dev),
        _as_i32(window, dev), _as_i32(kept_end, dev), _as_i32(gap_end, dev), calibration,
        out, max_query_len=max_query_len, max_seq_len=max_seq_len,
        max_kv_tokens=max_kv_tokens, decode_config=decode_config,
        prefill_config=prefill_config, host_query_start_loc=host_query_start_loc,
        host_seq_lens=host_seq_lens, new_kv=new_kv, host_sink=host_sink,
        host_window=host_window, hits_out=hits_out if calibration is not None else None)


def _paged_attention_cpu(q, kv_cache, block_table, seq_lens, query_start_loc, scale, sink,
                         window, kept_end, gap_end, calibration, out, kv_layout):
    """``paged_attention`` on the CPU."""
    slot_major = kv_layout is None or kv_layout.is_slot_major
    if slot_major and all(m is None for m in (sink, window, kept_end, gap_end, calibration)):
        return _dense_cpu(q, kv_cache, block_table, seq_lens, query_start_loc, scale, out)
    return _masked_cpu(q, kv_cache, block_table, seq_lens, query_start_loc, scale,
                       sink, window, kept_end, gap_end, calibration, out, kv_layout)


def snapkv_scores(q_obs: Tensor, kv_cache: Tensor, block_row: Tensor, prompt_len: int,
                  scale: float, pool_kernel: int, kv_layout: KVLayout | None = None) -> Tensor:
    """SnapKV scores ``[Hkv, prompt_len]`` float32 for one sequence.

    ``q_obs [w, Hq, D]`` are the queries at slots ``prompt_len - w .. prompt_len - 1``. For each
    q head: causal softmax over keys ``[0, prompt_len)``, summed over the ``w`` queries, max-pooled
    along positions (kernel ``pool_kernel``, stride 1, padding ``pool_kernel // 2``, same length;
    use an odd kernel), then summed over each GQA group. ``block_row = block_table[s]``.
    ``kv_layout`` as in ``paged_attention``.
    """
    w = q_obs.shape[0]
    if not 0 < w <= prompt_len:
        raise ValueError(f"need 0 < observation window ({w}) <= prompt_len ({prompt_len})")
    if not _use_triton(q_obs):
        return ref.snapkv_scores_ref(q_obs, kv_cache, block_row, prompt_len, scale, pool_kernel,
                                     kv_layout)
    _slot_major_only(kv_layout)
    from attention_backends.kernels.snapkv import snapkv_scores_triton

    return snapkv_scores_triton(q_obs, kv_cache, block_row.to(torch.int32).contiguous(),
                                prompt_len, scale, pool_kernel)


def select_kept(scores: Tensor, budget: int, window: int) -> Tensor:
    """Kept slots ``[Hkv, budget]`` int64, ascending per head.

    Per KV head: the top ``budget - window`` scores among positions ``[0, L - window)`` plus all
    of the last ``window`` positions. Raises ``ValueError`` unless ``0 <= window < budget < L``:
    a prompt that fits its budget is not compressed (the caller checks first).
    """
    return ref.select_kept(scores, budget, window)


def evicted_partial(q_ref: Tensor, kv_cache: Tensor, block_row: Tensor, kept_idx: Tensor,
                    prompt_len: int, scale: float,
                    kv_layout: KVLayout | None = None) -> tuple[Tensor, Tensor]:
    """``(o_e [Hq, D] f32, lse_e [Hq] f32)``: attention of ``q_ref [Hq, D]`` over the slots of
    ``[0, prompt_len)`` not kept for its KV head. Call before ``compact_kv``. ``kv_layout`` as
    in ``paged_attention``."""
    if not _use_triton(q_ref):
        return ref.evicted_partial_ref(q_ref, kv_cache, block_row, kept_idx, prompt_len, scale,
                                       kv_layout)
    _slot_major_only(kv_layout)
    from attention_backends.kernels.snapkv import evicted_partial_triton

    return evicted_partial_triton(q_ref, kv_cache, block_row.to(torch.int32).contiguous(),
                                  kept_idx, prompt_len, scale)


def compact_kv(kv_cache: Tensor, block_row: Tensor, kept_idx: Tensor,
               kv_layout: KVLayout | None = None) -> None:
    """In place: for KV head h, slot j (``j < budget``) takes old slot ``kept_idx[h, j]``.
    ``kv_layout`` as in ``paged_attention``."""
    if not _use_triton(kv_cache):
        ref.compact_kv_ref(kv_cache, block_row, kept_idx, kv_layout)
        return
    _slot_major_only(kv_layout)
    from attention_backends.kernels.snapkv import compact_kv_triton

    compact_kv_triton(kv_cache, block_row.to(torch.int32).contiguous(), kept_idx)


def write_kv(key: Tensor, value: Tensor, kv_cache: Tensor, slot_mapping: Tensor) -> None:
    """Write this step's ``key``/``value [>= n, Hkv, D]`` into the paged cache at
    ``slot_mapping [n]`` (slot = block * block_size + offset; a negative slot is padding and is
    skipped). On the GPU one Triton launch with no host sync; on the CPU an indexed copy."""
    n = slot_mapping.shape[0]
    if n == 0:
        return
    if _use_triton(kv_cache):
        from attention_backends.kernels.paged_attention import write_kv_triton

        write_kv_triton(key[:n], value[:n], kv_cache, slot_mapping)
        return
    block_size, d = kv_cache.shape[2], kv_cache.shape[3] // 2
    slots = slot_mapping.to(torch.int64)
    k, v = key[:n], value[:n]
    valid = slots >= 0
    if not bool(valid.all()):
        slots, k, v = slots[valid], k[valid], v[valid]
    blk, off = slots // block_size, slots % block_size
    kv_cache[blk, :, off, :d] = k.to(kv_cache.dtype)
    kv_cache[blk, :, off, d:] = v.to(kv_cache.dtype)
