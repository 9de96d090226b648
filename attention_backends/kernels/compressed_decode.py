"""Decode of compressed rows (KV eviction) through a paged kernel that returns no log-sum-exp.

A compressed row sees its kept slots ``[0, kept_end)`` and the slots ``[gap_end, seq_len)``
after the gap (``kv_policies.eviction.plan.EvictionPlan``). The gap's two end blocks hold stale
slots between visible ones, which a causal kernel cannot skip, and CaliDrop merges an evicted
part ``(o_E, lse_E)`` into the result by log-sum-exp. vLLM's CPU kernel returns no
log-sum-exp, but it takes one extra logit per query head (``s_aux``, learned attention sinks:
a key of score ``s_aux`` and value 0), which is enough for one merge:

- the kernel reads the **bulk**, whole blocks only: the kept region's full blocks, then the
  blocks after the one holding ``gap_end`` (``bulk_blocks``: ``kept_end // bs`` blocks, then
  up to ``seq_len``);
- the rest, ``X``, is at most two blocks' worth of slots (the kept region's last partial block
  and the live end of ``gap_end``'s block), computed in float32 with its log-sum-exp
  (``rest_attention``), CaliDrop's evicted part joining it where the row's calibration
  applies;
- with ``s_aux = lse_X``, the kernel returns ``R = w * o_A``, where ``o_A`` is the bulk's
  attention and ``w = exp(lse_A) / (exp(lse_A) + exp(lse_X))``, so the merged attention
  ``w * o_A + (1 - w) * o_X`` (the split-KV combine of flash-decoding, and CaliDrop's merge
  of the evicted part) is ``R + (1 - w) * o_X``. The kernel runs each query head twice
  (``duplicate_heads``): once with ``s_aux = -inf`` (``o_A``), once with ``lse_X`` (``R``),
  and ``w = <R, o_A> / <o_A, o_A>`` (``merge_bulk``).

Both kernel outputs are rounded to the query dtype (bf16: 8 bits), so ``w`` is known to that
precision or better (the dot products average over the head dimension), not worse than the
rounding of the output itself. A row whose ``o_A`` is zero (``w`` undefined) is computed in
float32 instead (``decode_row``). No vLLM import: the plan is index arithmetic and the merge
is torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from attention_backends.kernels.cpu_paged import blocks_of, decode_partials
from attention_backends.kernels.kv_layout import KVLayout
from attention_backends.kernels.reference import lse_merge, masked_softmax_attention


@dataclass(frozen=True)
class CompressedDecodePlan:
    """How a compressed decode row splits between the kernel and ``decode_partials``.

    ``bulk_blocks``: logical blocks the kernel reads, in order, ``bulk_len`` slots of them
    (every slot visible; 0: no kernel call); ``rest_blocks`` / ``rest_ranges``: the logical
    blocks and visible slot ranges (half-open, ascending) computed in float32; ``visible``:
    all the slots the query sees, as ranges.
    """

    bulk_blocks: list[int]
    bulk_len: int
    rest_blocks: list[int]
    rest_ranges: list[tuple[int, int]]
    visible: list[tuple[int, int]]


def plan_compressed_decode(seq_len: int, kept_end: int, gap_end: int,
                           block_size: int) -> CompressedDecodePlan:
    """The split of a decode query at slot ``seq_len - 1`` of a row compressed to
    ``[0, kept_end) + [gap_end, seq_len)``. Raises ``ValueError`` unless
    ``0 <= kept_end <= gap_end < seq_len``."""
    if not 0 <= kept_end <= gap_end < seq_len:
        raise ValueError(f"need 0 <= kept_end ({kept_end}) <= gap_end ({gap_end}) < seq_len "
                         f"({seq_len})")
    bs = block_size
    kept_blocks = kept_end // bs
    gap_block = gap_end // bs
    after = (gap_block + 1) * bs  # first slot of the first block after gap_end's block
    bulk = list(range(kept_blocks))
    bulk_len = kept_blocks * bs
    if seq_len > after:
        bulk += range(gap_block + 1, (seq_len - 1) // bs + 1)
        bulk_len += seq_len - after
    ranges = []
    if kept_end > kept_blocks * bs:
        ranges.append((kept_blocks * bs, kept_end))
    ranges.append((gap_end, min(seq_len, after)))
    blocks = sorted({lo // bs for lo, _ in ranges})
    visible = [(0, kept_end), (gap_end, seq_len)] if kept_end else [(gap_end, seq_len)]
    return CompressedDecodePlan(bulk, bulk_len, blocks, ranges, visible)


def rest_attention(q: Tensor, kv_cache: Tensor, layout: KVLayout, block_row: Tensor,
                   ranges: list[tuple[int, int]], scale: float,
                   evicted: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Attention of one decode query ``q [Hq, D]`` over the slots of ``ranges`` (a plan's
    ``rest_ranges``: each inside one block), in float32 with its log-sum-exp: ``(o [Hq, D],
    lse [Hq])``. ``block_row``: the row's block-table row (host). ``evicted = (o_E [Hq, D],
    lse_E [Hq])`` float32 joins as one more key per head, of score ``lse_E`` and value ``o_E``
    (CaliDrop's merge; ``lse_E = -inf`` where it does not apply). Affine layouts (vLLM's VEC
    layout) are read one block at a time, converted whole and viewed; others through
    ``cpu_paged.decode_partials``. A handful of small ops: on the CPU their count, not their
    size, is the cost."""
    hq, d = q.shape
    bs, hkv = layout.block_size, kv_cache.shape[1]
    if layout.k_affine is None or layout.v_affine is None:
        o, lse = decode_partials(q[None], kv_cache, layout, block_row[None],
                                 [(0, blocks_of(ranges, bs), ranges)], scale)
        o, lse = o[0], lse[0]
        if evicted is not None:
            o, lse = lse_merge(o, lse, *evicted), torch.logaddexp(lse, evicted[1])
        return o, lse
    ks, vs = [], []
    for lo, hi in ranges:
        # [Hkv, bs, 2 * D]; a view of the cache when it is float32 already
        region = kv_cache[int(block_row[lo // bs])].to(torch.float32)
        start = region.storage_offset()
        for side, (s_slot, s_dim, base) in ((ks, layout.k_affine), (vs, layout.v_affine)):
            side.append(torch.as_strided(region, (hkv, hi - lo, d),
                                         (region.stride(0), s_slot, s_dim),
                                         start + base + lo % bs * s_slot))
    k, v = (ks[0], vs[0]) if len(ranges) == 1 else (torch.cat(ks, 1), torch.cat(vs, 1))
    g = hq // hkv
    scores = (q.view(hkv, g, d).to(torch.float32) * scale) @ k.transpose(1, 2)  # [Hkv, G, n]
    if evicted is None:
        lse = torch.logsumexp(scores, -1, keepdim=True)
        return (scores.sub_(lse).exp_() @ v).view(hq, d), lse.view(hq)
    o_e, lse_e = evicted
    lse_e = lse_e.view(hkv, g, 1)
    lse = torch.logsumexp(torch.cat([scores, lse_e], -1), -1, keepdim=True)
    o = scores.sub_(lse).exp_() @ v
    o.addcmul_(lse_e.sub(lse).exp_(), o_e.view(hkv, g, d))
    return o.view(hq, d), lse.view(hq)


def duplicate_heads(q: Tensor) -> Tensor:
    """``q [T, Hq, D]`` as ``[T, 2 * Hq, D]``, each head twice in a row: head ``2h`` and
    ``2h + 1`` are ``q[:, h]``, and both map to ``h``'s KV head under GQA (``2h // (2G) ==
    h // G``)."""
    return q.repeat_interleave(2, dim=1)


def sink_logits(lse_x: Tensor) -> Tensor:
    """The kernel's ``s_aux [2 * Hq]`` float32 for one row: ``-inf`` on even heads (plain
    attention), ``lse_x [Hq]`` on odd ones."""
    out = torch.full((lse_x.shape[0], 2), float("-inf"))
    out[:, 1] = lse_x
    return out.view(-1)


def merge_bulk(kernel_out: Tensor, o_x: Tensor) -> Tensor | None:
    """The merged attention ``[Hq, D]`` float32 from the kernel's output ``[2 * Hq, D]`` (heads
    as ``duplicate_heads``, logits as ``sink_logits``) and ``o_x [Hq, D]``; None when ``w`` is
    undefined at some head (``o_A`` zero there)."""
    r = kernel_out.to(torch.float32).view(-1, 2, kernel_out.shape[-1])
    dots = (r * r[:, :1]).sum(-1)  # [Hq, 2]: <o_A, o_A>, <R, o_A>
    if not float(dots[:, 0].min()) > 0:
        return None
    w = dots[:, 1:] / dots[:, :1]
    return torch.addcmul(r[:, 1], 1 - w, o_x)


def decode_row(q: Tensor, kv_cache: Tensor, layout: KVLayout, block_row: Tensor,
               plan: CompressedDecodePlan, scale: float,
               evicted: tuple[Tensor, Tensor] | None,
               bulk: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """The attention ``[Hq, D]`` float32 of one compressed row's decode query ``q [Hq, D]``
    (cache dtype) over its visible slots, CaliDrop's ``evicted = (o_E [Hq, D], lse_E [Hq])``
    float32 merged in (``lse_E = -inf`` at heads where it does not apply; None: nowhere).

    ``block_row``: the row's block-table row; ``bulk(q2 [1, 2 * Hq, D], s_aux [2 * Hq])``
    runs the kernel on ``plan.bulk_blocks`` and returns its output ``[1, 2 * Hq, D]``. When
    the bulk's output is zero at some head (``merge_bulk``), the whole row is computed in
    float32 instead (``cpu_paged.decode_partials``)."""
    o_x, lse_x = rest_attention(q, kv_cache, layout, block_row, plan.rest_ranges, scale, evicted)
    if not plan.bulk_len:
        return o_x
    merged = merge_bulk(bulk(duplicate_heads(q[None]), sink_logits(lse_x))[0], o_x)
    if merged is not None:
        return merged
    o, lse = decode_partials(q[None], kv_cache, layout, block_row[None],
                             [(0, blocks_of(plan.visible, layout.block_size), plan.visible)],
                             scale)
    return o[0] if evicted is None else lse_merge(o[0], lse[0], *evicted)


def check_sink_logit(attend, head_size: int, dtype: torch.dtype) -> None:
    """Check, on a small random case, that a kernel treats ``s_aux`` as this module assumes: one
    extra logit per query head whose value is zero, i.e. ``sum_i e^{s_i} v_i / (sum_i e^{s_i}
    + e^{s_aux})``, ``-inf`` meaning none. ``attend(q [1, Hq, D], k [n, Hkv, D], v, s_aux
    [Hq] float32) -> [1, Hq, D]`` runs the kernel on one decode query over ``n`` keys.
    Raises ``RuntimeError`` when it does not (a vLLM whose sinks mean something else)."""
    gen = torch.Generator().manual_seed(0)
    hkv, g, n = 2, 2, 40
    q = torch.randn(1, hkv * g, head_size, generator=gen).to(dtype)
    k, v = (torch.randn(n, hkv, head_size, generator=gen).to(dtype) for _ in range(2))
    s_aux = torch.tensor([float("-inf"), 0.5, 2.0, -1.0])
    scale = head_size ** -0.5
    scores = q[0].float().view(hkv, g, -1) @ k.float().permute(1, 2, 0) * scale  # [Hkv, G, n]
    o, lse = masked_softmax_attention(scores, None, v.float().transpose(0, 1))
    want = (o * torch.sigmoid(lse - s_aux.view(hkv, g))[..., None]).reshape(hkv * g, -1)
    got = attend(q, k, v, s_aux)[0].float()
    err = float((got - want).norm() / want.norm())
    if not err < 2e-2:
        raise RuntimeError(
            "vLLM's CPU attention kernel does not treat s_aux as a zero-valued extra logit per "
            f"query head (relative error {err:.3g}): compressed decode rows cannot use it")
