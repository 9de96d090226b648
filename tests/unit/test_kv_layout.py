"""KV layouts (kernels.kv_layout): probing an opaque writer, and every CPU op reading and writing a
cache in another layout exactly as in the slot-major one.

Layouts checked: vLLM's CPU VEC layout (K transposed per block, then V: affine, read through
strided views) and a random permutation of each block (read through the offset tables, as
vLLM's packed AMX layout would be)."""

from __future__ import annotations

import pytest
import torch

from attention_backends.kernels import kv_layout as kvl
from attention_backends.kernels import ops
from attention_backends.kernels import reference as ref
from tests.kernels.kvcache_builder import build_paged_kv

BS, D, HQ, HKV = 16, 32, 8, 2


def _vec(bs: int, d: int) -> kvl.KVLayout:
    j = torch.arange(bs)[:, None]
    c = torch.arange(d)[None, :]
    return kvl.from_offsets("vec", c * bs + j, bs * d + j * d + c)


def _permuted(bs: int, d: int, seed: int = 3) -> kvl.KVLayout:
    perm = torch.randperm(2 * bs * d, generator=torch.Generator().manual_seed(seed))
    return kvl.from_offsets("permuted", perm[:bs * d].reshape(bs, d),
                            perm[bs * d:].reshape(bs, d))


LAYOUTS = {"vec": _vec, "permuted": _permuted}


def _relayout(kv: torch.Tensor, layout: kvl.KVLayout) -> torch.Tensor:
    """The same K/V (poisoned slots included) in ``layout``."""
    nb, hkv, bs, d2 = kv.shape
    out = torch.zeros_like(kv)
    b, h, j = torch.meshgrid(torch.arange(nb), torch.arange(hkv), torch.arange(bs),
                             indexing="ij")
    kvl.write_slots(out, layout, b, h, j, kv[..., :d2 // 2], kv[..., d2 // 2:])
    return out


def test_layouts_are_told_apart():
    assert kvl.slot_major(BS, D).is_slot_major
    vec, perm = _vec(BS, D), _permuted(BS, D)
    assert not vec.is_slot_major and vec.k_affine == (1, BS, 0)
    assert vec.v_affine == (D, 1, BS * D)
    assert perm.k_affine is None and perm.v_affine is None


def test_offsets_that_are_not_a_permutation_are_refused():
    vec = _vec(BS, D)
    with pytest.raises(ValueError, match="not a permutation"):
        kvl.from_offsets("clash", vec.k_offsets, vec.k_offsets)
    with pytest.raises(ValueError, match="not a permutation"):
        kvl.from_offsets("out of range", vec.k_offsets, vec.v_offsets + 1)


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_probe_finds_the_layout_a_writer_uses(name, dtype):
    bs, d = 32, 64  # 2048 elements per side: three base-16 passes
    truth = LAYOUTS[name](bs, d)

    def write(k, v, cache, slots):
        zeros = torch.zeros_like(slots)
        kvl.write_slots(cache, truth, zeros, zeros, slots, k[:, 0], v[:, 0])

    got = kvl.probe(name, write, bs, d, dtype)
    assert torch.equal(got.k_offsets, truth.k_offsets)
    assert torch.equal(got.v_offsets, truth.v_offsets)


def test_probe_refuses_a_writer_that_does_not_store_what_it_is_given():
    def quantizing(k, v, cache, slots):
        cache[0, 0, slots, :D] = (k[:, 0] > 8).to(cache.dtype)
        cache[0, 0, slots, D:] = (v[:, 0] > 8).to(cache.dtype)

    with pytest.raises(ValueError, match="layout q"):
        kvl.probe("q", quantizing, BS, D, torch.bfloat16)


def _masked_batch(gen: torch.Generator, dtype: torch.dtype):
    """A batch with a sparse decode row, a compressed decode row with calibration, a sparse
    prefill chunk over a cached prefix, and a plain row."""
    lens = [150, 130, 120, 40]
    q_lens = [1, 1, 37, 5]
    kept_end, gap_end = [0, 48, 0, 0], [0, 100, 0, 0]
    pk = build_paged_kv(lens, HKV, D, BS, dtype, gen, kept_end=kept_end, gap_end=gap_end)
    q = torch.randn(sum(q_lens), HQ, D, generator=gen).to(dtype)
    qsl = torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32)
    calib = ops.Calibration(
        q_ref=q[torch.tensor([0, 1, 2, 39])].clone(),
        o_e=torch.randn(4, HQ, D, generator=gen), lse_e=torch.randn(4, HQ, generator=gen),
        enabled=torch.tensor([False, True, False, False]), tau=-1.0)
    masks = dict(sink=torch.tensor([4, 0, 8, 0], dtype=torch.int32),
                 window=torch.tensor([24, 0, 32, 0], dtype=torch.int32),
                 kept_end=torch.tensor(kept_end, dtype=torch.int32),
                 gap_end=torch.tensor(gap_end, dtype=torch.int32), calibration=calib)
    return pk, q, qsl, masks


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_masked_attention_reads_any_layout_as_slot_major(name, dtype):
    gen = torch.Generator().manual_seed(11)
    pk, q, qsl, masks = _masked_batch(gen, dtype)
    layout = LAYOUTS[name](BS, D)
    other = _relayout(pk.kv_cache, layout)
    want, want_hits = ops.paged_attention(q, pk.kv_cache, pk.block_table, pk.seq_lens, qsl,
                                          0.125, **masks)
    got, hits = ops.paged_attention(q, other, pk.block_table, pk.seq_lens, qsl, 0.125,
                                    kv_layout=layout, **masks)
    assert not torch.isnan(want).any()
    assert torch.equal(got, want) and torch.equal(hits, want_hits)
    assert bool(hits[1].all()) and not bool(hits[0].any())  # the calibrated row merged


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_eviction_ops_read_and_write_any_layout_as_slot_major(name):
    gen = torch.Generator().manual_seed(12)
    length, budget = 100, 40
    pk = build_paged_kv([length], HKV, D, BS, torch.float32, gen)
    layout = LAYOUTS[name](BS, D)
    other = _relayout(pk.kv_cache, layout)
    row = pk.block_table[0]
    q_obs = torch.randn(8, HQ, D, generator=gen)
    scores = ops.snapkv_scores(q_obs, pk.kv_cache, row, length, 0.125, 5)
    assert torch.equal(ops.snapkv_scores(q_obs, other, row, length, 0.125, 5, layout), scores)
    kept = ops.select_kept(scores, budget, 8)
    want = ops.evicted_partial(q_obs[-1], pk.kv_cache, row, kept, length, 0.125)
    got = ops.evicted_partial(q_obs[-1], other, row, kept, length, 0.125, layout)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))

    before = other.clone()
    ops.compact_kv(pk.kv_cache, row, kept)
    ops.compact_kv(other, row, kept, layout)
    slots = torch.arange(budget)
    want_k, want_v = ref.gather_kv(pk.kv_cache, row, slots)
    got_k, got_v = ref.gather_kv(other, row, slots, layout)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    old_k, old_v = ref.gather_kv(before, row, torch.arange(length), layout)
    for h in range(HKV):  # head h's slot j now holds its old slot kept[h, j]
        assert torch.equal(got_k[h], old_k[h, kept[h]])
        assert torch.equal(got_v[h], old_v[h, kept[h]])


def test_the_triton_path_refuses_another_layout(monkeypatch):
    gen = torch.Generator().manual_seed(13)
    pk, q, qsl, _ = _masked_batch(gen, torch.float32)
    monkeypatch.setenv(ops.FORCE_TRITON_ENV, "1")
    with pytest.raises(ValueError, match="slot-major"):
        ops.paged_attention(q, pk.kv_cache, pk.block_table, pk.seq_lens, qsl, 0.125,
                            kv_layout=_vec(BS, D))
    with pytest.raises(ValueError, match="slot-major"):
        ops.compact_kv(pk.kv_cache, pk.block_table[0], torch.zeros(HKV, 4, dtype=torch.int64),
                       _vec(BS, D))
