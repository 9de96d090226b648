"""Paged attention: Triton kernels (interpreted on CPU) vs the float32 reference, and the
reference vs a brute-force float64 implementation of the mask formula."""

from __future__ import annotations

import math

import pytest
import torch
from kvcache_builder import TOL, build_paged_kv, needs_triton, rel_err

from attention_backends.kernels import ops
from attention_backends.kernels import reference as ref


def _i32(xs):
    return None if xs is None else torch.tensor(xs, dtype=torch.int32)


def _make_inputs(seed, dtype, hq, hkv, d, bs, seqs, kept_end=None, gap_end=None):
    """seqs: list of (seq_len, q_len). Returns (paged, q, query_start_loc)."""
    gen = torch.Generator().manual_seed(seed)
    lens = [length for length, _ in seqs]
    paged = build_paged_kv(lens, hkv, d, bs, dtype, gen, kept_end, gap_end)
    q_lens = [ql for _, ql in seqs]
    q = torch.randn(sum(q_lens), hq, d, generator=gen).to(dtype)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32)
    return paged, q, qsl


def _run_both(paged, q, qsl, scale, masks, calibration=None, **tuning):
    out = torch.full_like(q, float("nan"))
    got, hits = ops.paged_attention(q, paged.kv_cache, paged.block_table, paged.seq_lens, qsl,
                                    scale, calibration=calibration, out=out, **masks, **tuning)
    assert got.data_ptr() == out.data_ptr()
    want, want_hits = ref.paged_attention_ref(q, paged.kv_cache, paged.block_table,
                                              paged.seq_lens, qsl, scale,
                                              calibration=calibration, **masks)
    assert not torch.isnan(got).any(), "output not fully written (or a stale slot was read)"
    assert not torch.isnan(want).any()
    return got, hits, want, want_hits


def _check(got, want, dtype):
    err = rel_err(got, want)
    assert err < TOL[dtype], f"relative error {err:.2e} >= {TOL[dtype]:.0e}"


SMALL_TILES = {"prefill_config": {"block_m": 16, "block_n": 16},
               "decode_config": {"block_n": 16}}

# (dtype, hq, hkv, d, bs, seqs [(seq_len, q_len)], tuning)
DENSE_CASES = [
    # GQA 1: q_len up to 64 goes to the decode kernel, 100 to prefill
    (torch.bfloat16, 2, 2, 64, 16, [(37, 1), (64, 1), (70, 40), (130, 100), (33, 3)],
     SMALL_TILES),
    # GQA 4, head_dim 128, fp16, blocks of 32, real tile sizes
    (torch.float16, 8, 2, 128, 32, [(64, 1), (45, 45), (90, 30), (33, 3), (1, 1)], {}),
    # GQA 8, ends off block boundaries, chunked prefill with a cached prefix
    (torch.bfloat16, 8, 1, 64, 16, [(37, 1), (81, 50), (48, 48), (50, 2), (17, 9)],
     SMALL_TILES),
    # GQA 3: a group does not divide the row tile
    (torch.bfloat16, 6, 2, 64, 16, [(50, 1), (70, 30), (33, 33), (40, 4)], SMALL_TILES),
]


@needs_triton
@pytest.mark.parametrize("case", range(len(DENSE_CASES)))
def test_dense_mixed_batch(case):
    dtype, hq, hkv, d, bs, seqs, tuning = DENSE_CASES[case]
    paged, q, qsl = _make_inputs(100 + case, dtype, hq, hkv, d, bs, seqs)
    got, _, want, _ = _run_both(paged, q, qsl, 1 / math.sqrt(d), {}, **tuning)
    _check(got, want, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_prefill_through_sdpa(dtype):
    """The dense prefill path on torch SDPA: whole prompts, GQA, ragged, sequence ends off
    block boundaries; decode rows are left to the decode kernel; a chunk over a cached prefix
    sends the batch back to the Triton kernel."""
    from attention_backends.kernels.sdpa_prefill import dense_prefill_sdpa

    chunked, q1, qsl1 = _make_inputs(901, dtype, 8, 2, 64, 16, [(70, 70), (100, 37)])
    assert dense_prefill_sdpa(q1, chunked.kv_cache, chunked.block_table, chunked.seq_lens,
                              qsl1, 0.125, torch.empty_like(q1), q_thr=4,
                              whole_batch=True) is None
    seqs = [(70, 70), (100, 100), (33, 1), (129, 129), (64, 64)]
    paged, q, qsl = _make_inputs(900, dtype, 8, 2, 64, 16, seqs)
    want, _ = ref.paged_attention_ref(q, paged.kv_cache, paged.block_table, paged.seq_lens, qsl,
                                      0.125)
    out = torch.full_like(q, float("nan"))
    assert dense_prefill_sdpa(q, paged.kv_cache, paged.block_table, paged.seq_lens, qsl, 0.125,
                              out, q_thr=4, whole_batch=True) == [0, 1, 3, 4]
    prefill_rows = torch.ones(q.shape[0], dtype=torch.bool)
    prefill_rows[int(qsl[2]):int(qsl[3])] = False  # the decode row: not this path's job
    assert torch.isnan(out[~prefill_rows]).all()
    _check(out[prefill_rows], want[prefill_rows], dtype)


def _new_kv(paged, seqs, hkv, d):
    """This step's K and V [T, Hkv, D]: the last q_len slots of every sequence."""
    rows = [paged.logical[s][length - q_len:] for s, (length, q_len) in enumerate(seqs)]
    x = torch.cat(rows)
    return x[..., :d].contiguous(), x[..., d:].contiguous()


@needs_triton
@pytest.mark.parametrize("chunks", [False, True])
@pytest.mark.parametrize("hints", [False, True])
def test_dense_prefill_dispatch(monkeypatch, chunks, hints):
    """Dense prefill batches through SDPA from ``ops.paged_attention``: whole prompts (their
    K/V from ``new_kv`` or gathered), and chunks over a cached prefix split into a prefix part
    and a causal square merged by log-sum-exp (Triton merge kernel); decode rows stay on the
    decode kernel; host copies of the lengths replace the device reads."""
    from attention_backends.kernels import paged_attention as pa

    taken = []
    real = pa.dense_prefill_sdpa

    def spy(*a, **kw):
        r = real(*a, **kw)
        taken.append(r)
        return r

    monkeypatch.setattr(pa, "dense_prefill_sdpa", spy)
    dtype, hq, hkv, d = torch.bfloat16, 8, 2, 64
    seqs = [(70, 70), (100, 37), (33, 1), (129, 129), (90, 20)] if chunks else \
        [(70, 70), (33, 1), (129, 129), (64, 64)]
    paged, q, qsl = _make_inputs(950 + chunks + 2 * hints, dtype, hq, hkv, d, 16, seqs)
    kw = {}
    if hints:
        kw = {"host_query_start_loc": qsl.tolist(), "host_seq_lens": paged.seq_lens.tolist(),
              "new_kv": _new_kv(paged, seqs, hkv, d), "max_query_len": None}
    cfg = {"dense_backend": "sdpa", "chunk_backend": "sdpa" if chunks else "triton",
           "block_m": 16, "block_n": 16}
    got, _, want, _ = _run_both(paged, q, qsl, 0.125, {}, prefill_config=cfg,
                                decode_config={"block_n": 16}, **kw)
    _check(got, want, dtype)
    prefill = [s for s, (_, q_len) in enumerate(seqs) if q_len > 16]
    assert taken == [prefill]


# (prompt length, sink, window): prompt shorter than sink + window (one causal call), whole
# chunks only, a partial last chunk, no sink, a sink of 1, an odd window, GQA 4 and 3
PIECES_CASES = [(30, 4, 16, 8, 2), (20 + 16 * 3, 4, 16, 8, 2), (117, 4, 16, 8, 2),
                (96, 0, 16, 8, 2), (97, 1, 8, 8, 2), (150, 5, 7, 6, 2), (260, 16, 32, 8, 1)]


@needs_triton
@pytest.mark.parametrize("impl", ["math", None])
@pytest.mark.parametrize("triton_merge", [True, False])
@pytest.mark.parametrize("case", range(len(PIECES_CASES)))
def test_sparse_prefill_pieces(case, triton_merge, impl):
    """Sink + window prefill of one whole prompt from causal squares merged by log-sum-exp (the
    band of each chunk reversed into a causal square), against the float32 reference: with the
    float32 math kernel and torch's CPU flash kernel (cuDNN's stand-ins), both merges."""
    from attention_backends.kernels.sdpa_prefill import sparse_prefill_pieces

    length, sink, window, hq, hkv = PIECES_CASES[case]
    dtype, d = torch.bfloat16, 64
    paged, q, qsl = _make_inputs(980 + case, dtype, hq, hkv, d, 16, [(length, length)])
    x = paged.logical[0]
    out = torch.full_like(q, float("nan"))
    sparse_prefill_pieces(q, x[..., :d], x[..., d:], sink, window, 0.125, out, impl=impl,
                          triton_merge=triton_merge)
    want, _ = ref.paged_attention_ref(q, paged.kv_cache, paged.block_table, paged.seq_lens, qsl,
                                      0.125, sink=_i32([sink]), window=_i32([window]))
    assert not torch.isnan(out).any(), "a query row was not written"
    _check(out, want, dtype)


def test_sparse_prefill_pieces_rejects_degenerate_masks():
    from attention_backends.kernels.sdpa_prefill import sparse_prefill_pieces

    q = torch.zeros(8, 4, 16)
    for sink, window in ((0, 1), (-1, 4), (4, 0)):
        with pytest.raises(ValueError):
            sparse_prefill_pieces(q, q[:, :2], q[:, :2], sink, window, 0.25, q.clone())


def test_fused_kernel_choice_on_the_cpu():
    """No cuDNN off the GPU: asked for it, the log-sum-exp call runs torch's CPU kernel, and its
    result matches the float32 math kernel (batched, GQA, causal)."""
    from attention_backends.kernels import sdpa_prefill as sp

    assert not sp.cudnn_attention_ok(torch.device("cpu"))
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(3, 8, 40, 32, generator=gen)
    k, v = (torch.randn(3, 2, 40, 32, generator=gen) for _ in range(2))
    before = sp.IMPL_COUNTS["cpu"]
    o, lse = sp._sdpa_lse(q, k, v, True, 0.2, "cudnn")
    assert sp.IMPL_COUNTS["cpu"] == before + 1
    o_ref, lse_ref = sp._sdpa_lse(q, k, v, True, 0.2, "math")
    assert o.shape == o_ref.shape and lse.shape == lse_ref.shape == (3, 8, 40)
    assert torch.allclose(o, o_ref, atol=1e-4) and torch.allclose(lse, lse_ref, atol=1e-4)


def test_pow2_runs():
    from attention_backends.kernels.sdpa_prefill import _pow2_runs

    assert _pow2_runs(0) == []
    assert _pow2_runs(1) == [(0, 1)]
    assert _pow2_runs(62) == [(0, 32), (32, 16), (48, 8), (56, 4), (60, 2)]


@needs_triton
@pytest.mark.parametrize("hints", [False, True])
def test_sparse_prefill_dispatch(monkeypatch, hints):
    """``sparse_backend = "sdpa"``: the sink + window whole prompts of a batch go to the fused
    pieces; a sparse chunk over a cached prefix, a full-attention prompt (window 0) and the
    decode rows stay on the Triton kernels; without the host copies everything stays there."""
    from attention_backends.kernels import paged_attention as pa

    dtype, hq, hkv, d = torch.bfloat16, 8, 2, 64
    seqs = [(70, 70), (100, 37), (33, 1), (129, 129), (90, 90), (60, 2)]
    sink, window = [4, 4, 2, 8, 0, 3], [16, 16, 8, 32, 0, 20]
    paged, q, qsl = _make_inputs(990 + hints, dtype, hq, hkv, d, 16, seqs)
    rows = [slice(int(qsl[s]), int(qsl[s + 1])) for s in range(len(seqs))]
    taken, pieces = [], {}
    real = pa.sparse_prefill_sdpa

    def spy(q_, kv, bt, lens, qsl_, scale, out, *a, **kw):
        r = real(q_, kv, bt, lens, qsl_, scale, out, *a, **kw)
        taken.append(r)
        for s in r:  # keep the pieces' rows; a sentinel shows whether Triton writes them again
            pieces[s] = out[rows[s]].clone()
            out[rows[s]] = 7.0
        return r

    monkeypatch.setattr(pa, "sparse_prefill_sdpa", spy)
    kw = {}
    if hints:
        kw = {"host_query_start_loc": qsl.tolist(), "host_seq_lens": paged.seq_lens.tolist(),
              "new_kv": _new_kv(paged, seqs, hkv, d), "host_sink": sink, "host_window": window}
    cfg = {"sparse_backend": "sdpa", "block_m": 16, "block_n": 16}
    got, _, want, _ = _run_both(paged, q, qsl, 0.125, {"sink": _i32(sink),
                                                       "window": _i32(window)},
                                prefill_config=cfg, decode_config={"block_n": 16}, **kw)
    assert taken == ([[0, 3]] if hints else [])
    for s, o in pieces.items():
        assert torch.equal(got[rows[s]], torch.full_like(o, 7.0)), "Triton redid a prompt"
        got[rows[s]] = o
    _check(got, want, dtype)


@needs_triton
def test_shipped_tuned_table():
    """The sweep's winners shipped with the package parse, name only known settings with sane
    values, and are what the kernels read from their size class up."""
    from attention_backends.kernels import paged_attention as pa
    from attention_backends.kernels.sdpa_prefill import LSE_IMPLS, WHOLE_IMPLS

    table = pa._tuned_table()
    if not table:
        pytest.skip("no tuned_h200.json shipped")
    prefill_keys = set(pa.DEFAULT_PREFILL) | {"lse_impl"}
    for mode, classes in table.get("prefill", {}).items():
        assert mode in ("sparse", "dense")
        for size, cfg in classes.items():
            assert int(size) > 0 and set(cfg) <= prefill_keys, (mode, size, cfg)
            for k in ("block_m", "block_n"):
                if k in cfg:
                    assert cfg[k] in (16, 32, 64, 128, 256)
            assert cfg.get("chunk_backend", "triton") in ("triton", "sdpa")
            assert cfg.get("sparse_backend", "triton") in ("triton", "sdpa", "flash")
            assert cfg.get("dense_backend", "sdpa") in ("triton", "sdpa", "flash")
            assert cfg.get("whole_impl", "cudnn") in WHOLE_IMPLS
            assert cfg.get("lse_impl", "cudnn") in LSE_IMPLS
            pa.tuned_config.cache_clear()
            assert pa.tuned_config("prefill", mode, int(size)) == cfg
    for mode, classes in table.get("decode", {}).items():
        assert mode in ("compressed", "sparse", "dense")
        for size, cfg in classes.items():
            assert set(cfg) <= set(pa.DEFAULT_DECODE) | {"num_splits", "backend"}, (mode, size,
                                                                                   cfg)
            assert cfg.get("backend", "triton") in ("triton", "flash")
            assert mode != "compressed" or cfg.get("backend", "triton") == "triton"
            assert cfg["block_n"] in (16, 32, 64, 128) and cfg["waves"] >= 1
            assert pa.tuned_config("decode", mode, int(size)) == cfg
    pa.tuned_config.cache_clear()


@needs_triton
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("num_splits", [1, 3, 40])
def test_decode_split_counts(num_splits, fused):
    """Split-KV decode: one split (no reduce), several, and more splits than KV tiles; the
    partials merged by the last split to arrive (fused) or by the reduce launch. Run twice: the
    fused path's arrival counters must be back at zero after each launch."""
    dtype = torch.bfloat16
    seqs = [(150, 1), (16, 1), (77, 2), (5, 1), (600, 1)]  # 600: 38 tiles of 16
    paged, q, qsl = _make_inputs(200 + num_splits, dtype, 8, 2, 64, 16, seqs)
    cfg = {"block_n": 16, "num_splits": num_splits, "fused_max_splits": 64 if fused else 0}
    for _ in range(2):
        got, _, want, _ = _run_both(paged, q, qsl, 0.1, {}, max_query_len=2, decode_config=cfg)
        _check(got, want, dtype)
    if fused and num_splits > 1:
        from attention_backends.kernels.paged_attention import _COUNTERS

        assert all(int(c.abs().sum()) == 0 for c in _COUNTERS.values())


PREFILL_LAYOUTS = [
    {"mask_mode": 0, "pack_gqa": True, "block_m": 16, "block_n": 16},
    {"mask_mode": 1, "pack_gqa": True, "block_m": 16, "block_n": 16},
    {"mask_mode": 0, "pack_gqa": False, "block_m": 16, "block_n": 16},
    {"mask_mode": 0, "pack_gqa": True, "block_m": 32, "block_n": 32},
]


@needs_triton
@pytest.mark.parametrize("layout", range(len(PREFILL_LAYOUTS)))
def test_sink_window(layout):
    """Full and partial KV tiles (sink end, window edge, diagonal), with and without GQA packing
    and with every tile masked."""
    dtype = torch.bfloat16
    seqs = [(120, 1), (100, 60), (40, 40), (90, 3), (70, 1), (66, 20), (150, 100), (200, 120)]
    masks = {
        "sink": _i32([4, 8, 0, 16, 3, 0, 5, 32]),
        # window >= length, window of 1 (self only), sink larger than the window hole,
        # sink and window on tile boundaries (the last row)
        "window": _i32([16, 41, 64, 1, 200, 0, 37, 32]),
    }
    paged, q, qsl = _make_inputs(300 + layout, dtype, 8, 2, 64, 16, seqs)
    tuning = {"prefill_config": PREFILL_LAYOUTS[layout], "decode_config": {"block_n": 16}}
    got, _, want, _ = _run_both(paged, q, qsl, 0.125, masks, **tuning)
    _check(got, want, dtype)


@needs_triton
@pytest.mark.parametrize("pack_gqa", [True, False])
def test_chunked_prefill_full_and_partial_tiles(pack_gqa):
    """Chunks over a cached prefix, dense and sparse, with a gap: the full-tile runs of every
    interval are cut at the right tiles (GQA 4 and 3)."""
    for hq, hkv, seed in ((8, 2, 0), (6, 2, 1)):
        dtype = torch.bfloat16
        seqs = [(160, 70), (130, 130), (140, 40), (96, 33)]
        kept_end, gap_end = [0, 0, 24, 0], [0, 0, 60, 0]
        masks = {"sink": _i32([0, 16, 8, 0]), "window": _i32([0, 48, 40, 0]),
                 "kept_end": _i32(kept_end), "gap_end": _i32(gap_end)}
        paged, q, qsl = _make_inputs(350 + seed + 2 * pack_gqa, dtype, hq, hkv, 64, 16, seqs,
                                     kept_end, gap_end)
        tuning = {"prefill_config": {"block_m": 16, "block_n": 16, "pack_gqa": pack_gqa},
                  "decode_config": {"block_n": 16}}
        got, _, want, _ = _run_both(paged, q, qsl, 0.125, masks, **tuning)
        _check(got, want, dtype)


@needs_triton
def test_gap_is_never_read():
    """Gap slots are NaN (partial blocks) and freed blocks' stale entries point at a NaN block."""
    dtype = torch.float16
    seqs = [(90, 1), (100, 3), (70, 1), (64, 1), (120, 24), (48, 1)]
    kept_end = [20, 16, 0, 0, 30, 7]
    gap_end = [75, 97, 0, 0, 80, 47]
    masks = {"kept_end": _i32(kept_end), "gap_end": _i32(gap_end),
             "sink": _i32([0, 4, 0, 2, 4, 0]), "window": _i32([0, 10, 0, 8, 40, 0])}
    paged, q, qsl = _make_inputs(400, dtype, 8, 2, 64, 16, seqs, kept_end, gap_end)
    assert torch.isnan(paged.kv_cache[paged.block_table[0, 2]]).all()  # a freed block
    got, _, want, _ = _run_both(paged, q, qsl, 0.125, masks, **SMALL_TILES)
    _check(got, want, dtype)


@needs_triton
def test_empty_visible_row_is_zero():
    """A query inside the gap with a window of 1 sees nothing: its output is 0."""
    dtype = torch.bfloat16
    seqs = [(40, 2), (30, 1)]
    kept_end, gap_end = [0, 10], [45, 12]
    masks = {"kept_end": _i32(kept_end), "gap_end": _i32(gap_end),
             "window": _i32([1, 0]), "sink": _i32([0, 0])}
    paged, q, qsl = _make_inputs(500, dtype, 4, 2, 64, 16, seqs, kept_end, gap_end)
    got, _, want, _ = _run_both(paged, q, qsl, 0.125, masks, **SMALL_TILES)
    assert torch.equal(got[:2], torch.zeros_like(got[:2]))
    assert torch.equal(want[:2], torch.zeros_like(want[:2]))
    _check(got[2:], want[2:], dtype)


def _calibration(gen, q, qsl, num_seqs, hq, d, hit_heads, enabled, dtype):
    """q_ref equals each sequence's first query on ``hit_heads`` (cos 1) and is random on the
    other heads (cos ~ 0). One head of the first sequence has nothing evicted (lse -inf)."""
    q_ref = torch.randn(num_seqs, hq, d, generator=gen).to(dtype)
    for s in range(num_seqs):
        q_ref[s, hit_heads] = q[int(qsl[s]), hit_heads]
    lse_e = torch.randn(num_seqs, hq, generator=gen) * 2 + 3
    lse_e[0, hit_heads[0]] = float("-inf")
    return ops.Calibration(
        q_ref=q_ref,
        o_e=torch.randn(num_seqs, hq, d, generator=gen),
        lse_e=lse_e,
        enabled=torch.tensor(enabled, dtype=torch.bool),
        tau=0.5,
    )


def _calibrated_batch(seed, calib_seed, dtype, seqs, kept_end, gap_end, hit_heads, enabled,
                      hq=8, hkv=2, d=64):
    """``(paged, q, qsl, masks, calibration)``: a compressed batch (``_make_inputs`` with
    ``seed``, blocks of 16) and ``_calibration`` on it (generator seeded ``calib_seed``)."""
    masks = {"kept_end": _i32(kept_end), "gap_end": _i32(gap_end)}
    paged, q, qsl = _make_inputs(seed, dtype, hq, hkv, d, 16, seqs, kept_end, gap_end)
    gen = torch.Generator().manual_seed(calib_seed)
    calib = _calibration(gen, q, qsl, len(seqs), hq, d, hit_heads, enabled, dtype)
    return paged, q, qsl, masks, calib


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 4, -4])
def test_calibration(num_splits):
    """Calibration merge in the epilogue of the decode kernel (one split), of the fused split-K
    reduce (4) and of the reduce launch (-4: 4 splits, unfused), and of the prefill kernel."""
    dtype, hq = torch.bfloat16, 8
    seqs = [(80, 1), (60, 1), (100, 2), (90, 20), (50, 1)]
    hit_heads = [0, 3, 5]
    paged, q, qsl, masks, calib = _calibrated_batch(
        610 + num_splits, 601, dtype, seqs, [16, 20, 10, 30, 0], [60, 50, 90, 70, 0],
        hit_heads, [True, False, True, True, True])
    tuning = {"prefill_config": {"block_m": 16, "block_n": 16},
              "decode_config": {"block_n": 16, "num_splits": abs(num_splits),
                                "fused_max_splits": 64 if num_splits > 0 else 0}}
    got, hits, want, want_hits = _run_both(paged, q, qsl, 0.125, masks, calib, **tuning)
    _check(got, want, dtype)
    assert hits.dtype == torch.bool and hits.shape == (q.shape[0], hq)
    assert torch.equal(hits, want_hits)
    # the first token of every enabled sequence hits on exactly the hit heads
    for s, on in enumerate(calib.enabled.tolist()):
        row = hits[int(qsl[s])]
        assert row[hit_heads].all().item() == on
        assert not row[[1, 2, 4, 6, 7]].any()
    # calibration changed the hit rows (except where lse_e is -inf), and only them
    plain, _ = ops.paged_attention(q, paged.kv_cache, paged.block_table, paged.seq_lens, qsl,
                                   0.125, **masks, **tuning)
    changed = (got.float() - plain.float()).abs().amax(-1) > 1e-2
    expect = hits.clone()
    expect[0, hit_heads[0]] = False
    assert torch.equal(changed, expect)


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 4, -4])
def test_calibration_inputs_loaded_early(num_splits):
    """A decode batch of one or two queries per sequence (programs of 16 rows, where
    ``calib_early`` takes effect): the calibration inputs loaded before the KV loop give the
    reference's output and hits, on one split, the fused reduce and the reduce launch."""
    dtype = torch.bfloat16
    paged, q, qsl, masks, calib = _calibrated_batch(
        640 + num_splits, 641, dtype, [(80, 1), (60, 1), (100, 2), (50, 1)], [16, 20, 10, 0],
        [60, 50, 90, 0], [1, 4, 6], [True, True, False, True])
    for early in (False, True):
        tuning = {"decode_config": {"block_n": 16, "num_splits": abs(num_splits),
                                    "fused_max_splits": 64 if num_splits > 0 else 0,
                                    "calib_early": early}}
        got, hits, want, want_hits = _run_both(paged, q, qsl, 0.125, masks, calib, **tuning)
        _check(got, want, dtype)
        assert torch.equal(hits, want_hits) and hits[:, [1, 4, 6]].any()


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 3])
def test_calibration_threshold_per_sequence(num_splits):
    """Requests of one batch keep their own tau: 2.0 never hits, -2.0 always hits."""
    dtype = torch.float16
    seqs = [(70, 1), (64, 1), (90, 3), (75, 18)]
    paged, q, qsl, masks, calib = _calibrated_batch(
        700 + num_splits, 701, dtype, seqs, [16, 20, 10, 30], [60, 50, 80, 70], [1, 6],
        [True] * 4)
    calib.tau = torch.tensor([0.5, 2.0, -2.0, 0.5])
    tuning = {"prefill_config": {"block_m": 16, "block_n": 16},
              "decode_config": {"block_n": 16, "num_splits": num_splits}}
    got, hits, want, want_hits = _run_both(paged, q, qsl, 0.125, masks, calib, **tuning)
    _check(got, want, dtype)
    assert torch.equal(hits, want_hits)
    per_seq = [hits[int(qsl[s]):int(qsl[s + 1])] for s in range(len(seqs))]
    assert per_seq[0][0, [1, 6]].all() and not per_seq[0][0, [0, 2, 3, 4, 5, 7]].any()
    assert not per_seq[1].any()
    assert per_seq[2].all()


# ----------------------------------------------------------------------------- reference


def _brute_force(q, logical, seqs, scale, sink, window, kept_end, gap_end, calib):
    """float64, one (token, head) at a time, straight from the mask formula."""
    t_total, hq, d = q.shape
    hkv = logical[0].shape[1]
    g = hq // hkv
    out = torch.zeros(t_total, hq, d, dtype=torch.float64)
    t = 0
    for s, (length, q_len) in enumerate(seqs):
        kv = logical[s].to(torch.float64)
        for i in range(q_len):
            p = length - q_len + i
            vis = torch.tensor([
                j <= p and (j < kept_end[s] or j >= gap_end[s])
                and (window[s] <= 0 or j < sink[s] or j > p - window[s])
                for j in range(length)
            ])
            for h in range(hq):
                k, v = kv[:, h // g, :d], kv[:, h // g, d:]
                qv = q[t, h].to(torch.float64)
                if vis.any():
                    sc = (k[vis] @ qv) * scale
                    lse = torch.logsumexp(sc, 0)
                    o = torch.softmax(sc, 0) @ v[vis]
                else:
                    lse, o = torch.tensor(float("-inf"), dtype=torch.float64), torch.zeros(d)
                if calib is not None and bool(calib.enabled[s]):
                    qr = calib.q_ref[s, h].to(torch.float64)
                    if float(qv @ qr / (qv.norm() * qr.norm())) >= calib.tau:
                        le = calib.lse_e[s, h].to(torch.float64)
                        oe = calib.o_e[s, h].to(torch.float64)
                        m = max(float(lse), float(le))
                        w1, w2 = math.exp(float(lse) - m), math.exp(float(le) - m)
                        o = (o * w1 + oe * w2) / (w1 + w2)
                out[t, h] = o
            t += 1
    return out


@pytest.mark.parametrize("with_calib", [False, True])
def test_reference_vs_bruteforce(with_calib):
    dtype, hq, hkv, d, bs = torch.float32, 4, 2, 16, 8
    seqs = [(30, 1), (27, 10), (19, 19), (40, 2), (24, 1)]
    sink, window = [2, 0, 3, 4, 0], [5, 0, 7, 50, 1]
    kept_end, gap_end = [9, 0, 0, 12, 3], [20, 0, 0, 38, 20]
    paged, q, qsl = _make_inputs(700 + with_calib, dtype, hq, hkv, d, bs, seqs, kept_end,
                                 gap_end)
    calib = None
    if with_calib:
        gen = torch.Generator().manual_seed(702)
        calib = _calibration(gen, q, qsl, len(seqs), hq, d, [0, 2], [True] * 4 + [False],
                             dtype)
    masks = {"sink": _i32(sink), "window": _i32(window), "kept_end": _i32(kept_end),
             "gap_end": _i32(gap_end)}
    want, hits = ref.paged_attention_ref(q, paged.kv_cache, paged.block_table, paged.seq_lens,
                                         qsl, 0.3, calibration=calib, **masks)
    brute = _brute_force(q, paged.logical, seqs, 0.3, sink, window, kept_end, gap_end, calib)
    assert rel_err(want, brute) < 1e-5
    if with_calib:
        assert hits.any() and not hits.all()


def test_reference_dense_matches_sdpa():
    """Dense causal reference on one contiguous prefill equals torch SDPA."""
    gen = torch.Generator().manual_seed(800)
    hq, hkv, d, length = 4, 2, 32, 50
    paged = build_paged_kv([length], hkv, d, 16, torch.float32, gen)
    q = torch.randn(length, hq, d, generator=gen)
    qsl = torch.tensor([0, length], dtype=torch.int32)
    got, hits = ref.paged_attention_ref(q, paged.kv_cache, paged.block_table, paged.seq_lens,
                                        qsl, 1 / math.sqrt(d))
    assert hits is None
    kv = paged.logical[0]
    k = kv[:, :, :d].repeat_interleave(hq // hkv, 1).transpose(0, 1)
    v = kv[:, :, d:].repeat_interleave(hq // hkv, 1).transpose(0, 1)
    want = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k, v,
                                                            is_causal=True).transpose(0, 1)
    assert rel_err(got, want) < 1e-5


def test_cpu_tensors_use_reference_without_force(monkeypatch):
    monkeypatch.delenv("FLUXSERVE_FORCE_TRITON", raising=False)
    paged, q, qsl = _make_inputs(900, torch.float32, 4, 2, 16, 8, [(20, 3)])
    got, _ = ops.paged_attention(q, paged.kv_cache, paged.block_table, paged.seq_lens, qsl, 0.2)
    want, _ = ref.paged_attention_ref(q, paged.kv_cache, paged.block_table, paged.seq_lens, qsl,
                                      0.2)
    assert torch.equal(got, want)


@needs_triton
def test_write_kv_skips_padding_slots():
    """The GPU KV write (Triton): strided K/V views land at their slots, padding (-1) slots
    write nothing, the rest of the cache is untouched; same result as the CPU path."""
    gen = torch.Generator().manual_seed(990)
    hkv, d, bs = 3, 32, 8
    qkv = torch.randn(9, 4 + 2 * hkv, d, generator=gen).to(torch.bfloat16)
    key, value = qkv[:, 4:4 + hkv], qkv[:, 4 + hkv:]
    slots = torch.tensor([5, -1, 17, 0, 31, -1, 8, 9, 22])
    cache = torch.randn(4, hkv, bs, 2 * d, generator=gen).to(torch.bfloat16)
    want = cache.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            want[s // bs, :, s % bs, :d] = key[t]
            want[s // bs, :, s % bs, d:] = value[t]
    got = cache.clone()
    ops.write_kv(key, value, got, slots[:8])  # slot_mapping shorter than key: first 8 tokens
    want[22 // bs, :, 22 % bs] = cache[22 // bs, :, 22 % bs]
    assert torch.equal(got, want)


@needs_triton
def test_tuned_configs_by_size_class(monkeypatch):
    """The sweep's winners apply from their size class up; below the smallest, the defaults."""
    from attention_backends.kernels import paged_attention as pa

    table = {"prefill": {"sparse": {"8192": {"block_n": 32}, "32768": {"block_n": 128}}},
             "decode": {"compressed": {"8": {"waves": 1}}}}
    monkeypatch.setattr(pa, "_tuned_table", lambda: table)
    pa.tuned_config.cache_clear()
    try:
        assert pa.tuned_config("prefill", "sparse", 4096) == {}
        assert pa.tuned_config("prefill", "sparse", 16384) == {"block_n": 32}
        assert pa.tuned_config("prefill", "sparse", 131072) == {"block_n": 128}
        assert pa.tuned_config("prefill", "dense", 131072) == {}
        assert pa.tuned_config("decode", "compressed", 32) == {"waves": 1}
        assert pa.tuned_config("decode", "sparse", 32) == {}
        # the caller's settings override the table's, also on the same keys
        paged, q, qsl = _make_inputs(440, torch.bfloat16, 8, 2, 64, 16, [(40, 1)] * 8)
        got, _, want, _ = _run_both(paged, q, qsl, 0.125, {}, decode_config={"waves": 2})
        _check(got, want, torch.bfloat16)
    finally:
        pa.tuned_config.cache_clear()
