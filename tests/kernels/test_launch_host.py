"""The host side of the Triton launch: the integer helpers match Triton's, the conversions the
wrapper skips when its inputs already are int32 / float32 / contiguous still happen when they
are not (same outputs, bit for bit), and the cached ``flash_varlen`` module reference follows
``register``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kvcache_builder import build_paged_kv, needs_triton

from attention_backends.kernels import ops
from attention_backends.kernels.intmath import cdiv, next_power_of_2


@needs_triton
@given(st.integers(-(2**40), 2**40), st.integers(1, 2**20))
def test_int_helpers_match_triton(x, y):
    import triton

    assert cdiv(x, y) == triton.cdiv(x, y)
    assert next_power_of_2(x) == triton.next_power_of_2(x)
    assert next_power_of_2(y) == triton.next_power_of_2(y)


def test_next_power_of_2_edges():
    assert [next_power_of_2(n) for n in (-3, 0, 1, 2, 3, 4, 5, 64, 65)] == [
        0, 0, 1, 2, 4, 4, 8, 64, 128]


@needs_triton
def test_flash_varlen_ok_follows_register():
    """The module reference is kept after the first call; what is registered is read on every
    call."""
    from attention_backends.kernels import flash_varlen
    from attention_backends.kernels import paged_attention as pa

    before = flash_varlen.registered()
    try:
        flash_varlen.register(None)
        assert not pa.flash_varlen_ok(128)
        flash_varlen.register(lambda **kw: None)
        assert pa.flash_varlen_ok(128) and pa.flash_varlen_ok(64)
        assert not pa.flash_varlen_ok(96)  # the sink-merge kernel takes powers of two
        assert pa.flash_varlen_ok(128, torch.float16)
        assert not pa.flash_varlen_ok(128, torch.float32)  # FlashAttention takes 16-bit inputs
        assert pa.flash_varlen_ok(256) and pa.flash_varlen_ok(16)
        assert not pa.flash_varlen_ok(512)  # over FlashAttention's 256
        assert not pa.flash_varlen_ok(8) and not pa.flash_varlen_ok(0)  # the merge's dots
        assert pa.flash_varlen_ok(128, torch.bfloat16, 32, torch.bfloat16)
        assert not pa.flash_varlen_ok(128, torch.bfloat16, 8)  # blocks: multiples of 16
        assert not pa.flash_varlen_ok(128, torch.bfloat16, 16, torch.float16)  # one dtype
        flash_varlen.register(None)
        assert not pa.flash_varlen_ok(128)
    finally:
        flash_varlen.register(before)


# decode rows (one and two queries) and a chunk over a cached prefix, with freed gaps
HQ, HKV, D, BS = 4, 2, 32, 16
SEQS = [(40, 1), (33, 1), (50, 2), (60, 40)]  # q_thr 32: the last row is a prefill
KEPT, GAP = [8, 0, 16, 10], [24, 0, 40, 20]
TUNING = {"prefill_config": {"block_m": 16, "block_n": 16},
          "decode_config": {"block_n": 16, "num_splits": 2}}


def _inputs():
    gen = torch.Generator().manual_seed(7)
    paged = build_paged_kv([s for s, _ in SEQS], HKV, D, BS, torch.bfloat16, gen, KEPT, GAP)
    q_lens = [ql for _, ql in SEQS]
    q = torch.randn(sum(q_lens), HQ, D, generator=gen).to(torch.bfloat16)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    n = len(SEQS)
    q_ref = torch.randn(n, HQ, D, generator=gen).to(torch.bfloat16)
    for s in range(n):  # cos 1 on heads 0 and 2 of each sequence's first query
        q_ref[s, [0, 2]] = q[int(qsl[s]), [0, 2]]
    calib = ops.Calibration(q_ref=q_ref, o_e=torch.randn(n, HQ, D, generator=gen),
                            lse_e=torch.randn(n, HQ, generator=gen) + 2,
                            enabled=torch.tensor([True, False, True, True]),
                            tau=torch.full((n,), 0.5))
    return paged, q, qsl, calib


def _strided(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a non-contiguous tensor of the same dtype."""
    wide = torch.zeros(*t.shape, 2, dtype=t.dtype)
    wide[..., 0] = t
    return wide[..., 0]


def _attend(paged, q, qsl, calib, masks, block_table=None, seq_lens=None, **kw):
    return ops.paged_attention(
        q, paged.kv_cache, paged.block_table if block_table is None else block_table,
        paged.seq_lens if seq_lens is None else seq_lens, qsl, 0.125, calibration=calib,
        out=torch.full_like(q, float("nan")), **masks, **TUNING, **kw)


@needs_triton
def test_converted_inputs_give_the_same_result():
    """int64 / non-contiguous index tensors, float64 / non-contiguous calibration tensors and
    every form of ``tau`` give exactly the output and hits of the kernel-ready inputs; so do the
    host copies of the lengths (the decode dispatch then reads ``max_query_len``)."""
    paged, q, qsl, calib = _inputs()
    masks = {"kept_end": torch.tensor(KEPT, dtype=torch.int32),
             "gap_end": torch.tensor(GAP, dtype=torch.int32)}
    want, want_hits = _attend(paged, q, qsl, calib, masks)
    assert not torch.isnan(want).any()
    assert want_hits.any() and not want_hits.all()

    def same(got):
        out, hits = got
        assert torch.equal(out, want) and torch.equal(hits, want_hits)

    same(_attend(paged, q, qsl.long(), calib, {k: v.long() for k, v in masks.items()},
                 block_table=paged.block_table.long(), seq_lens=paged.seq_lens.long()))
    same(_attend(paged, q, _strided(qsl), calib, {k: _strided(v) for k, v in masks.items()},
                 seq_lens=_strided(paged.seq_lens)))
    for tau in (0.5, torch.tensor(0.5), torch.tensor([0.5]), torch.full((4,), 0.5).double(),
                _strided(torch.full((4,), 0.5))):
        same(_attend(paged, q, qsl, ops.Calibration(calib.q_ref, calib.o_e, calib.lse_e,
                                                    calib.enabled, tau), masks))
    same(_attend(paged, q, qsl, ops.Calibration(
        _strided(calib.q_ref), _strided(calib.o_e.double()), calib.lse_e.double(),
        calib.enabled, calib.tau), masks))
    host = {"host_query_start_loc": qsl.tolist(), "host_seq_lens": paged.seq_lens.tolist()}
    same(_attend(paged, q, qsl, calib, masks, **host))
    same(_attend(paged, q, qsl, calib, masks, max_query_len=40, **host))


@needs_triton
@pytest.mark.parametrize("max_query_len", [2, 3, None])  # 3: an upper bound
def test_decode_step_with_host_lengths(max_query_len):
    """A decode step (every query length within the decode kernel's rows) with the host copies:
    the same output whether the longest query length is given (no scan) or derived."""
    paged, q, qsl, _ = _inputs()
    seqs = SEQS[:3]  # one or two queries each
    t = sum(ql for _, ql in seqs)
    q, qsl = q[:t], qsl[:4]
    sub = type(paged)(paged.kv_cache, paged.block_table[:3], paged.seq_lens[:3], [], 0)
    masks = {"sink": torch.tensor([4, 0, 8], dtype=torch.int32),
             "window": torch.tensor([16, 0, 12], dtype=torch.int32),
             "kept_end": torch.tensor(KEPT[:3], dtype=torch.int32),
             "gap_end": torch.tensor(GAP[:3], dtype=torch.int32)}
    want, _ = _attend(sub, q, qsl, None, masks)
    got, _ = _attend(sub, q, qsl, None, masks, max_query_len=max_query_len,
                     host_query_start_loc=qsl.tolist(), host_seq_lens=sub.seq_lens.tolist())
    assert not torch.isnan(want).any()
    assert torch.equal(got, want)
