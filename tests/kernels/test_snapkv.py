"""SnapKV scoring, kept-set selection, evicted-set partial attention and KV compaction:
Triton kernels (interpreted on CPU) vs the float32 references, references vs float64 brute
force, and the CaliDrop pipeline end to end."""

from __future__ import annotations

import math

import pytest
import torch
from kvcache_builder import TOL, build_paged_kv, needs_triton, rel_err

from attention_backends.kernels import ops
from attention_backends.kernels import reference as ref


def _setup(seed, dtype, hq, hkv, d, bs, length, w):
    gen = torch.Generator().manual_seed(seed)
    paged = build_paged_kv([length], hkv, d, bs, dtype, gen)
    q_obs = torch.randn(w, hq, d, generator=gen).to(dtype)
    return gen, paged, q_obs


def _brute_scores(q_obs, kv, length, scale, pool):
    """float64 SnapKV scores from the logical K [L, Hkv, D]."""
    w, hq, d = q_obs.shape
    hkv = kv.shape[1]
    g = hq // hkv
    per_head = torch.zeros(hq, length, dtype=torch.float64)
    for h in range(hq):
        k = kv[:, h // g, :d].to(torch.float64)
        for i in range(w):
            p = length - w + i
            sc = (k[:p + 1] @ q_obs[i, h].to(torch.float64)) * scale
            per_head[h, :p + 1] += torch.softmax(sc, 0)
    pooled = torch.empty_like(per_head)
    r = pool // 2
    for j in range(length):
        pooled[:, j] = per_head[:, max(0, j - r):j + r + 1].amax(1)
    return pooled.reshape(hkv, g, length).sum(1)


# (dtype, hq, hkv, d, bs, prompt_len, w, pool)
SCORE_CASES = [
    (torch.bfloat16, 4, 4, 64, 16, 77, 8, 7),
    (torch.float16, 8, 2, 128, 32, 96, 16, 5),
    (torch.bfloat16, 8, 1, 64, 16, 50, 4, 1),
]


@needs_triton
@pytest.mark.parametrize("case", range(len(SCORE_CASES)))
def test_snapkv_scores(case):
    dtype, hq, hkv, d, bs, length, w, pool = SCORE_CASES[case]
    _, paged, q_obs = _setup(1000 + case, dtype, hq, hkv, d, bs, length, w)
    row = paged.block_table[0]
    scale = 1 / math.sqrt(d)
    got = ops.snapkv_scores(q_obs, paged.kv_cache, row, length, scale, pool)
    want = ref.snapkv_scores_ref(q_obs, paged.kv_cache, row, length, scale, pool)
    assert got.shape == (hkv, length) and got.dtype == torch.float32
    assert not torch.isnan(got).any()
    assert rel_err(got, want) < 1e-3
    brute = _brute_scores(q_obs, paged.logical[0], length, scale, pool)
    assert rel_err(want, brute) < 1e-5


def test_select_kept():
    gen = torch.Generator().manual_seed(1100)
    scores = torch.rand(3, 40, generator=gen)
    scores[0, 5] = 10.0  # must be kept
    budget, window = 12, 4
    kept = ops.select_kept(scores, budget, window)
    assert kept.shape == (3, budget)
    assert torch.equal(kept, kept.sort(-1).values)
    for h in range(3):
        ks = set(kept[h].tolist())
        assert set(range(36, 40)) <= ks
        head = kept[h][kept[h] < 36]
        top = torch.topk(scores[h, :36], budget - window).indices
        assert set(head.tolist()) == set(top.tolist())
    assert 5 in kept[0].tolist()


@pytest.mark.parametrize("budget,window", [(40, 4), (41, 4), (4, 4), (3, 4)])
def test_select_kept_rejects_bad_budget(budget, window):
    """The caller skips eviction when the prompt fits the budget; select_kept refuses it."""
    with pytest.raises(ValueError):
        ops.select_kept(torch.rand(2, 40), budget, window)


def _kept_idx(gen, hkv, length, budget, window):
    scores = torch.rand(hkv, length, generator=gen)
    return ops.select_kept(scores, budget, window)


@needs_triton
@pytest.mark.parametrize("dtype,hq,hkv,d,bs,length,budget", [
    (torch.bfloat16, 8, 2, 64, 16, 100, 30),
    (torch.float16, 4, 4, 128, 32, 64, 20),
    (torch.bfloat16, 8, 1, 64, 16, 45, 10),
])
def test_evicted_partial(dtype, hq, hkv, d, bs, length, budget):
    gen, paged, _ = _setup(1200 + length, dtype, hq, hkv, d, bs, length, 1)
    kept = _kept_idx(gen, hkv, length, budget, 4)
    q_ref = torch.randn(hq, d, generator=gen).to(dtype)
    row = paged.block_table[0]
    o_e, lse_e = ops.evicted_partial(q_ref, paged.kv_cache, row, kept, length, 0.2)
    r_o, r_lse = ref.evicted_partial_ref(q_ref, paged.kv_cache, row, kept, length, 0.2)
    assert o_e.dtype == torch.float32 and lse_e.dtype == torch.float32
    assert o_e.shape == (hq, d) and lse_e.shape == (hq,)
    assert rel_err(o_e, r_o) < TOL[dtype]
    assert (lse_e - r_lse).abs().max() < 1e-3
    # reference vs float64 brute force
    kv = paged.logical[0].to(torch.float64)
    g = hq // hkv
    for h in range(hq):
        ev = [j for j in range(length) if j not in set(kept[h // g].tolist())]
        sc = (kv[ev, h // g, :d] @ q_ref[h].to(torch.float64)) * 0.2
        assert abs(float(torch.logsumexp(sc, 0)) - float(r_lse[h])) < 1e-4
        o = torch.softmax(sc, 0) @ kv[ev, h // g, d:]
        assert rel_err(r_o[h], o) < 1e-5


@needs_triton
@pytest.mark.parametrize("bs", [16, 32])
def test_compact_kv(bs):
    dtype, hkv, d, length, budget = torch.bfloat16, 3, 64, 90, 37
    gen = torch.Generator().manual_seed(1300 + bs)
    paged = build_paged_kv([length], hkv, d, bs, dtype, gen)
    kept = _kept_idx(gen, hkv, length, budget, 5)
    row = paged.block_table[0]
    got = paged.kv_cache.clone()
    ops.compact_kv(got, row, kept)
    want = paged.kv_cache.clone()
    ref.compact_kv_ref(want, row, kept)
    assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
    # semantics, from the logical KV: slot j of head h holds old slot kept[h, j]
    logical = paged.logical[0]
    for h in range(hkv):
        for j in range(budget):
            blk, off = int(row[j // bs]), j % bs
            assert torch.equal(got[blk, h, off], logical[int(kept[h, j]), h])
    # slots from the budget on are untouched
    for j in range(budget, length):
        blk, off = int(row[j // bs]), j % bs
        assert torch.equal(got[blk, :, off], paged.kv_cache[blk, :, off])


@pytest.mark.parametrize("force_triton", [pytest.param(True, marks=needs_triton), False])
def test_calidrop_pipeline_exact_for_reference_query(force_triton, monkeypatch):
    """Score, select, evict, compact, then decode: a decode query equal to q_ref with
    calibration reproduces dense attention over the whole uncompressed prompt."""
    if not force_triton:
        monkeypatch.delenv("FLUXSERVE_FORCE_TRITON", raising=False)
    dtype, hq, hkv, d, bs = torch.float16, 8, 2, 64, 16
    prompt_len, budget, win, w = 75, 24, 4, 8
    gen = torch.Generator().manual_seed(1400 + force_triton)
    paged = build_paged_kv([prompt_len + 1], hkv, d, bs, dtype, gen)  # + 1 decode token
    row = paged.block_table[0]
    q_obs = torch.randn(w, hq, d, generator=gen).to(dtype)
    scale = 1 / math.sqrt(d)
    scores = ops.snapkv_scores(q_obs, paged.kv_cache, row, prompt_len, scale, 5)
    kept = ops.select_kept(scores, budget, win)
    q_ref = q_obs[-1]
    o_e, lse_e = ops.evicted_partial(q_ref, paged.kv_cache, row, kept, prompt_len, scale)

    q = q_ref[None].clone()  # the decode query equals the reference query
    qsl = torch.tensor([0, 1], dtype=torch.int32)
    seq_lens = torch.tensor([prompt_len + 1], dtype=torch.int32)
    dense, _ = ops.paged_attention(q, paged.kv_cache, paged.block_table, seq_lens, qsl, scale)

    kv = paged.kv_cache
    ops.compact_kv(kv, row, kept)
    # free the wholly evicted blocks: poison them, as if reused by another request
    for b in range(-(-budget // bs), prompt_len // bs):
        kv[int(row[b])] = float("nan")
    calib = ops.Calibration(q_ref=q_ref[None], o_e=o_e[None], lse_e=lse_e[None],
                            enabled=torch.tensor([True]), tau=0.99)
    masks = {"kept_end": torch.tensor([budget], dtype=torch.int32),
             "gap_end": torch.tensor([prompt_len], dtype=torch.int32)}
    out = torch.full_like(q, float("nan"))
    got, hits = ops.paged_attention(q, kv, paged.block_table, seq_lens, qsl, scale,
                                    calibration=calib, out=out, **masks)
    assert hits.all()
    assert rel_err(got, dense) < TOL[dtype]
    kept_only, _ = ops.paged_attention(q, kv, paged.block_table, seq_lens, qsl, scale, **masks)
    assert rel_err(kept_only, dense) > 10 * TOL[dtype]  # the calibration term matters
