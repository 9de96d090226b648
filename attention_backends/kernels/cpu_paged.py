"""The CPU path of masked paged attention (sink/window, gaps, calibration) over whole KV blocks.

Same contract as ``ops.paged_attention``. For each sequence and chunk of its queries, the blocks
holding a slot that some query of the chunk can see are gathered whole (one ``index_select`` in
the cache's ``KVLayout``) and their other slots zeroed (a freed or stale slot may hold
anything). A chunk of several queries then runs torch's fused SDPA kernel with the chunk's
boolean mask (it accumulates in float32). The decode rows (one query each) of a batch run
together, padded to the longest row's blocks, in float32 matmuls that also give the
log-sum-exp, which calibrated rows merge with their evicted part. The float32 reference
(``kernels.reference``) defines the result; this path differs from it by rounding only.

A sparse row sees ``sink + window`` keys whatever its length, so its cost stops growing with the
context, unlike dense attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from attention_backends.kernels import kv_layout as kvl
from attention_backends.kernels.kv_layout import KVLayout
from attention_backends.kernels.reference import (
    cosine,
    lse_merge,
    masked_softmax_attention,
    visible_mask,
)

# Queries of one sequence per SDPA call. Larger chunks see more keys that only part of them can
# see (the window slides by the chunk's length), smaller ones gather the window more often.
Q_CHUNK = 512

_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def _intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for a0, a1 in a:
        for b0, b1 in b:
            lo, hi = max(a0, b0), min(a1, b1)
            if lo < hi:
                out.append((lo, hi))
    return out


def visible_ranges(p_lo: int, p_hi: int, sink: int, window: int, kept_end: int,
                   gap_end: int) -> list[tuple[int, int]]:
    """The slots visible to at least one query at slots ``p_lo .. p_hi - 1``, as ascending
    half-open ranges (the same set as ``reference.visible_union``)."""
    ranges = [(0, p_hi)]
    if gap_end > kept_end:
        ranges = _intersect(ranges, [(0, kept_end), (gap_end, p_hi)])
    if window > 0:
        ranges = _intersect(ranges, [(0, sink), (max(sink, p_lo - window + 1), p_hi)])
    return ranges


def blocks_of(ranges: list[tuple[int, int]], bs: int) -> list[int]:
    """The logical blocks (ascending) holding a slot of ``ranges`` (ascending half-open)."""
    blocks: list[int] = []
    for lo, hi in ranges:
        for b in range(lo // bs, (hi - 1) // bs + 1):
            if not blocks or blocks[-1] < b:
                blocks.append(b)
    return blocks


def _inside(slots: Tensor, ranges: list[tuple[int, int]]) -> Tensor:
    inside = torch.zeros_like(slots, dtype=torch.bool)
    for lo, hi in ranges:
        inside |= (slots >= lo) & (slots < hi)
    return inside


def _gather(kv_cache: Tensor, layout: KVLayout, block_row: Tensor, blocks: list[int],
            ranges: list[tuple[int, int]]) -> tuple[Tensor, Tensor, Tensor]:
    """K and V ``[Hkv, len(blocks) * bs, D]`` (cache dtype) of the logical ``blocks``, zero
    outside ``ranges``, and the slot of each key ``[len(blocks) * bs]`` int64."""
    bs = layout.block_size
    logical = torch.tensor(blocks, dtype=torch.int64)
    k, v = kvl.gather_blocks(kv_cache, layout, block_row.to(torch.int64)[logical])
    slots = (logical[:, None] * bs + torch.arange(bs)).flatten()
    inside = _inside(slots, ranges)
    if not bool(inside.all()):
        k.masked_fill_(~inside[None, :, None], 0)
        v.masked_fill_(~inside[None, :, None], 0)
    return k, v, slots


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """``q [B, Hq, n, D]``, ``k``/``v [B, Hkv, N, D]``, ``mask [B, 1, n, N]`` bool."""
    with sdpa_kernel(_BACKENDS):
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                              scale=scale, enable_gqa=True)


def masked_paged_attention(q: Tensor, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                           query_start_loc: Tensor, scale: float, *, sink: Tensor | None,
                           window: Tensor | None, kept_end: Tensor | None,
                           gap_end: Tensor | None, out: Tensor, kv_layout: KVLayout,
                           calibration=None, hits: Tensor | None = None,
                           rows: list[int] | None = None) -> Tensor:
    """``ops.paged_attention`` on the CPU, written into ``out [T, Hq, D]`` (returned) for the
    sequences in ``rows`` (None: all; the others' outputs are left as they are). Arguments as
    there; ``kv_layout`` must be given (``kv_layout.slot_major`` for the slot-major cache).
    ``calibration`` (``ops.Calibration``) applies to decode rows only (a calibrated row with
    several queries is the caller's: ``ops`` sends it to the reference); their hits go to
    ``hits [T, Hq]`` bool."""
    n = seq_lens.shape[0]
    bs = kv_cache.shape[2]

    def per_seq(x: Tensor | None) -> list[int]:
        return [0] * n if x is None else [int(t) for t in x.tolist()]

    lens, qsl = per_seq(seq_lens), [int(t) for t in query_start_loc.tolist()]
    sinks, windows, kept, gaps = map(per_seq, (sink, window, kept_end, gap_end))
    decode: list[tuple[int, list[int], list[tuple[int, int]]]] = []
    for s in range(n) if rows is None else rows:
        q_len = qsl[s + 1] - qsl[s]
        if q_len <= 0:
            continue
        ctx = lens[s] - q_len
        if q_len == 1:
            ranges = visible_ranges(ctx, ctx + 1, sinks[s], windows[s], kept[s], gaps[s])
            decode.append((s, blocks_of(ranges, bs), ranges))
            continue
        for c0 in range(0, q_len, Q_CHUNK):
            c1 = min(q_len, c0 + Q_CHUNK)
            ranges = visible_ranges(ctx + c0, ctx + c1, sinks[s], windows[s], kept[s], gaps[s])
            k, v, slots = _gather(kv_cache, kv_layout, block_table[s], blocks_of(ranges, bs),
                                  ranges)
            pos = torch.arange(ctx + c0, ctx + c1, dtype=torch.int64)
            mask = visible_mask(pos, slots, sinks[s], windows[s], kept[s], gaps[s])
            t0 = qsl[s] + c0
            o = _sdpa(q[t0:t0 + c1 - c0].transpose(0, 1)[None], k[None], v[None],
                      mask[None, None], scale)
            out[t0:t0 + c1 - c0] = o[0].transpose(0, 1)
    if decode:
        _decode(q, kv_cache, kv_layout, block_table, qsl, lens, decode,
                (sinks, windows, kept, gaps), scale, out, calibration, hits)
    return out


def decode_partials(q_rows: Tensor, kv_cache: Tensor, layout: KVLayout, block_table: Tensor,
                    rows: list[tuple[int, list[int], list[tuple[int, int]]]], scale: float,
                    masks: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Decode attention of ``R = len(rows)`` queries over the slots of some ranges, with its
    log-sum-exp: ``(o [R, Hq, D] float32, lse [R, Hq] float32)``, -inf and 0 where a row sees
    nothing.

    ``q_rows [R, Hq, D]``; ``rows[i] = (s, blocks, ranges)``: the sequence (row of
    ``block_table``), the logical blocks holding its visible slots (ascending) and those slots
    as ascending half-open ranges. ``masks[i]`` (optional, ``[len(blocks) * bs]`` bool) narrows
    row ``i``'s visible slots further. The rows' blocks, then copies of each row's first block
    (masked) up to the longest row's count, are gathered by one ``index_select``; other slots
    of a gathered block are zeroed (a freed or stale slot may hold anything)."""
    hkv, bs, d = kv_cache.shape[1], kv_cache.shape[2], kv_cache.shape[3] // 2
    hq = q_rows.shape[1]
    r = len(rows)
    width = max(len(blocks) for _, blocks, _ in rows)
    logical = torch.tensor([blocks + [blocks[0]] * (width - len(blocks))
                            for _, blocks, _ in rows], dtype=torch.int64)  # [R, width]
    sel = torch.tensor([s for s, _, _ in rows], dtype=torch.int64)
    phys = block_table.index_select(0, sel).to(torch.int64).gather(1, logical)
    k, v = kvl.gather_blocks(kv_cache, layout, phys.flatten(), torch.float32)
    slots = (logical[:, :, None] * bs + torch.arange(bs)).flatten(1)  # [R, N]
    inside = torch.stack([_inside(slots[i], ranges) for i, (_, _, ranges) in enumerate(rows)])
    inside &= torch.arange(width * bs)[None, :] < torch.tensor(
        [len(blocks) * bs for _, blocks, _ in rows])[:, None]  # padding blocks: nothing
    k, v = (t.view(hkv, r, width * bs, d).transpose(0, 1) for t in (k, v))  # [R, Hkv, N, D]
    if not bool(inside.all()):
        k.masked_fill_(~inside[:, None, :, None], 0)
        v.masked_fill_(~inside[:, None, :, None], 0)
    mask = inside
    if masks is not None:
        mask = mask & torch.stack([F.pad(m, (0, width * bs - m.numel())) for m in masks])
    scores = (q_rows.to(torch.float32).view(r, hkv, hq // hkv, d) @ k.transpose(-1, -2)) * scale
    o, lse = masked_softmax_attention(scores, mask[:, None, None, :], v)  # [R, Hkv, G, ...]
    return o.reshape(r, hq, d), lse.reshape(r, hq)


def calibration_hits(q_rows: Tensor, calibration, sel: Tensor | None = None) -> Tensor | None:
    """``[R, Hq]`` bool: where CaliDrop merges its evicted part into decode queries ``q_rows``
    of the sequences ``sel [R]`` (None: the calibration's rows, in order) - cosine to
    ``q_ref`` at least ``tau``, calibration enabled (CaliDrop's test, docs/kv_policies.md);
    None when no row is calibrated."""
    if calibration is None:
        return None
    enabled = calibration.enabled
    if sel is not None:
        enabled = enabled[sel]
    if not bool(enabled.any()):
        return None
    tau, q_ref = calibration.tau, calibration.q_ref
    if sel is not None:
        q_ref = q_ref[sel]
        tau = tau[sel] if isinstance(tau, Tensor) else tau
    tau = tau.to(torch.float32)[:, None] if isinstance(tau, Tensor) else float(tau)
    return (cosine(q_rows, q_ref) >= tau) & enabled.to(torch.bool)[:, None]


def _decode(q: Tensor, kv_cache: Tensor, layout: KVLayout, block_table: Tensor, qsl: list[int],
            lens: list[int], rows: list[tuple[int, list[int], list[tuple[int, int]]]],
            masks: tuple[list[int], ...], scale: float, out: Tensor, calibration,
            hits: Tensor | None) -> None:
    """The decode rows at once (``decode_partials`` over their visible slots), the calibrated
    rows merged with their evicted part."""
    bs = kv_cache.shape[2]
    tokens = torch.tensor([qsl[s] for s, _, _ in rows], dtype=torch.int64)
    q_rows = q.index_select(0, tokens)  # [R, Hq, D]
    narrow = [visible_mask(torch.tensor([lens[s] - 1]),
                           (torch.tensor(blocks)[:, None] * bs + torch.arange(bs)).flatten(),
                           *(m[s] for m in masks))[0]
              for s, blocks, _ in rows]
    o, lse = decode_partials(q_rows, kv_cache, layout, block_table, rows, scale, narrow)
    sel = torch.tensor([s for s, _, _ in rows], dtype=torch.int64)
    hit = calibration_hits(q_rows, calibration, sel)
    if hit is not None:
        merged = lse_merge(o, lse, calibration.o_e[sel].to(torch.float32),
                           calibration.lse_e[sel].to(torch.float32))
        o = torch.where(hit[..., None], merged, o)
        hits.index_copy_(0, tokens, hit)
    out.index_copy_(0, tokens, o.to(out.dtype))
