"""The CPU path of masked attention (kernels.cpu_paged through ops.paged_attention) against the
float32 reference: sink/window rows, compressed rows with their gap, prefill chunks over a
cached prefix longer than one SDPA chunk, decode rows of different lengths in one padded call,
and calibrated rows (which ops sends to the reference). Caches are poisoned with NaN wherever
nothing may be read."""

from __future__ import annotations

import pytest
import torch

from attention_backends.kernels import cpu_paged, ops
from attention_backends.kernels import reference as ref
from tests.kernels.kvcache_builder import build_paged_kv, rel_err
from tests.unit.test_kv_layout import _relayout, _vec

HQ, HKV, D, BS = 8, 2, 32, 16

# (seq_len, q_len, sink, window, kept_end, gap_end)
ROWS = [
    (300, 1, 4, 24, 0, 0),  # sparse decode
    (70, 1, 4, 100, 0, 0),  # sparse decode that sees everything
    (200, 1, 0, 0, 40, 150),  # compressed decode
    (260, 1, 8, 16, 64, 200),  # compressed and sparse decode
    (33, 1, 0, 0, 0, 0),  # dense decode, one block and a bit
    (900, cpu_paged.Q_CHUNK + 90, 5, 40, 0, 0),  # sparse chunk over a prefix, two SDPA calls
    (120, 120, 3, 17, 0, 0),  # a whole sparse prompt
    (180, 12, 0, 0, 50, 160),  # compressed, a chunk of queries after the gap
]


def _batch(rows, dtype, gen):
    lens = [r[0] for r in rows]
    pk = build_paged_kv(lens, HKV, D, BS, dtype, gen, kept_end=[r[4] for r in rows],
                        gap_end=[r[5] for r in rows])
    q = torch.randn(sum(r[1] for r in rows), HQ, D, generator=gen).to(dtype)
    qsl = torch.tensor([0, *[r[1] for r in rows]]).cumsum(0).to(torch.int32)
    masks = {name: torch.tensor([r[i] for r in rows], dtype=torch.int32)
             for i, name in ((2, "sink"), (3, "window"), (4, "kept_end"), (5, "gap_end"))}
    return pk, q, qsl, masks


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("layout", ["slot_major", "vec"])
def test_masked_cpu_path_matches_the_reference(dtype, tol, layout):
    gen = torch.Generator().manual_seed(21)
    pk, q, qsl, masks = _batch(ROWS, dtype, gen)
    want, _ = ref.paged_attention_ref(q, pk.kv_cache, pk.block_table, pk.seq_lens, qsl, 0.1,
                                      **masks)
    cache, kv_layout = pk.kv_cache, None
    if layout == "vec":
        kv_layout = _vec(BS, D)
        cache = _relayout(pk.kv_cache, kv_layout)
    got, hits = ops.paged_attention(q, cache, pk.block_table, pk.seq_lens, qsl, 0.1,
                                    kv_layout=kv_layout, **masks)
    assert hits is None and not torch.isnan(got).any()
    t = 0
    for r in ROWS:  # row by row: a wrong mask on one row must not hide in the batch's norm
        assert rel_err(got[t:t + r[1]], want[t:t + r[1]]) < tol, r
        t += r[1]


@pytest.mark.parametrize("q_len", [1, 3])
def test_calibrated_rows_merge_as_in_the_reference(q_len):
    gen = torch.Generator().manual_seed(22)
    rows = [(r[0], q_len, *r[2:]) for r in ROWS[:4]]  # several queries: by the reference
    pk, q, qsl, masks = _batch(rows, torch.float32, gen)
    calib = ops.Calibration(q_ref=q[qsl[:-1].long()].clone(),
                            o_e=torch.randn(4, HQ, D, generator=gen),
                            lse_e=torch.randn(4, HQ, generator=gen),
                            enabled=torch.tensor([False, False, True, True]),
                            tau=torch.tensor([0.0, 0.0, -1.0, 2.0]))
    want, want_hits = ref.paged_attention_ref(q, pk.kv_cache, pk.block_table, pk.seq_lens, qsl,
                                              0.1, calibration=calib, **masks)
    got, hits = ops.paged_attention(q, pk.kv_cache, pk.block_table, pk.seq_lens, qsl, 0.1,
                                    calibration=calib, **masks)
    assert torch.equal(hits, want_hits)
    row = torch.arange(4).repeat_interleave(q_len)
    assert bool(hits[row == 2].all()) and not bool(hits[row != 2].any())  # tau -1 merges
    assert rel_err(got, want) < 1e-5


def test_visible_ranges_are_the_reference_union():
    cases = [(0, 1, 0, 0, 0, 0), (299, 300, 4, 24, 0, 0), (10, 40, 4, 100, 0, 0),
             (199, 200, 0, 0, 40, 150), (259, 260, 8, 16, 64, 200), (150, 180, 3, 5, 50, 160),
             (20, 30, 50, 5, 0, 0)]
    for p_lo, p_hi, sink, window, kept, gap in cases:
        want = ref.visible_union(p_lo, p_hi, sink, window, kept, gap)
        got = torch.cat([torch.arange(a, b) for a, b in
                         cpu_paged.visible_ranges(p_lo, p_hi, sink, window, kept, gap)])
        assert torch.equal(got, want), (p_lo, p_hi, sink, window, kept, gap)
