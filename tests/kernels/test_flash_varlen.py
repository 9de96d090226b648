"""The FlashAttention varlen paths (``kernels.flash_varlen``): FlashAttention's contract stood in
by its float32 reference (``reference.flash_varlen_ref``, itself checked against the paged
reference here), the sink-merge kernel in Triton's interpreter, and the dispatch in
``ops.paged_attention``. On the GPU the vLLM glue registers FlashAttention-3 itself and the H200
sweep (benchmarks/gpu_sweep.py) checks it the same way against the float32 reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from kvcache_builder import TOL, build_paged_kv, needs_triton, rel_err

from attention_backends.kernels import ops
from attention_backends.kernels import reference as ref


def _i32(xs):
    return torch.tensor(xs, dtype=torch.int32)


def _inputs(seed, seqs, hq=8, hkv=2, d=64, bs=16, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    paged = build_paged_kv([n for n, _ in seqs], hkv, d, bs, dtype, gen)
    q_lens = [ql for _, ql in seqs]
    q = torch.randn(sum(q_lens), hq, d, generator=gen).to(dtype)
    qsl = _i32([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    return paged, q, qsl


def _sparse_through_flash(paged, q, qsl, scale, sinks, windows, prefill_config=None,
                          decode_config=None):
    """``ops.paged_attention`` with the sink + window mask, ``sparse_backend = "flash"`` and
    the host copies the glue passes, into a NaN-poisoned buffer; returns ``(got, want)``, want
    the float32 paged reference."""
    masks = {"sink": _i32(sinks), "window": _i32(windows)}
    got, _ = ops.paged_attention(
        q, paged.kv_cache, paged.block_table, paged.seq_lens, qsl, scale,
        out=torch.full_like(q, float("nan")),
        prefill_config={"sparse_backend": "flash", **(prefill_config or {})},
        decode_config=decode_config, host_window=windows, host_sink=sinks,
        host_query_start_loc=qsl.tolist(), host_seq_lens=paged.seq_lens.tolist(), **masks)
    want, _ = ref.paged_attention_ref(q, paged.kv_cache, paged.block_table, paged.seq_lens,
                                      qsl, scale, **masks)
    return got, want


@pytest.fixture
def flash_ref(monkeypatch):
    """FlashAttention's contract, registered as the vLLM glue registers the real kernel; calls
    are recorded."""
    from attention_backends.kernels import flash_varlen

    calls = []

    def fn(**kw):
        calls.append({k: v for k, v in kw.items() if k in ("causal", "window_size")})
        return ref.flash_varlen_ref(**kw)

    flash_varlen.register(fn)
    yield calls
    flash_varlen.register(None)


SEQS = [(70, 70), (100, 37), (33, 1), (129, 129), (60, 2), (20, 20)]


@pytest.mark.parametrize("window", [1, 5, 16, 40, 500])
def test_reference_contract_matches_paged_reference(window):
    """The stand-in's bottom-right causal window is the band ``(p - W, p]`` of the paged
    reference with sink 0, and plain causal attention without a window."""
    paged, q, qsl = _inputs(5, SEQS)
    k, v = paged.kv_cache.transpose(1, 2).split(q.shape[2], dim=-1)
    n = len(SEQS)
    for win in (window, None):
        got, lse = ref.flash_varlen_ref(
            q=q, k=k, v=v, cu_seqlens_q=qsl, max_seqlen_q=129, seqused_k=paged.seq_lens,
            max_seqlen_k=129, softmax_scale=0.125, causal=True, block_table=paged.block_table,
            window_size=[win - 1, 0] if win else None, return_softmax_lse=True)
        masks = {"sink": _i32([0] * n), "window": _i32([win] * n)} if win else {}
        want, _ = ref.paged_attention_ref(q, paged.kv_cache, paged.block_table, paged.seq_lens,
                                          qsl, 0.125, **masks)
        assert rel_err(got, want) < TOL[torch.bfloat16]
        assert torch.isfinite(lse).all() and lse.shape == (q.shape[1], q.shape[0])


@needs_triton
@pytest.mark.parametrize("hints", [True, False])
@pytest.mark.parametrize("window,sinks", [
    (16, [4, 4, 2, 8, 0, 3]),       # sinks differ per row, one without
    (5, [16, 1, 33, 20, 7, 2]),     # sinks longer than the window, and than a sequence
    (40, [4, 4, 4, 4, 4, 4]),       # a window longer than some sequences
    (1, [3, 0, 2, 1, 64, 5]),       # the band is the query's own key
])
def test_sink_window_through_flash(flash_ref, hints, window, sinks):
    """``sparse_backend = "flash"``: a batch of whole prompts, a chunk over a cached prefix
    and decode rows, all with one window, go through the band call plus the sink merge and
    equal the float32 paged reference with the sink + window mask (output NaN-poisoned)."""
    paged, q, qsl = _inputs(11 + window, SEQS)
    n = len(SEQS)
    masks = {"sink": _i32(sinks), "window": _i32([window] * n)}
    out = torch.full_like(q, float("nan"))
    kw = {"host_sink": sinks} if hints else {}
    got, hits = ops.paged_attention(
        q, paged.kv_cache, paged.block_table, paged.seq_lens, qsl, 0.125, out=out,
        prefill_config={"sparse_backend": "flash"}, host_window=[window] * n,
        host_query_start_loc=qsl.tolist(), host_seq_lens=paged.seq_lens.tolist(), **masks, **kw)
    assert got.data_ptr() == out.data_ptr() and hits is None
    assert flash_ref == [{"causal": True, "window_size": [window - 1, 0]}]
    want, _ = ref.paged_attention_ref(q, paged.kv_cache, paged.block_table, paged.seq_lens,
                                      qsl, 0.125, **masks)
    assert not torch.isnan(got).any()
    assert rel_err(got, want) < TOL[torch.bfloat16]


@needs_triton
def test_sink_merge_gqa_shapes(flash_ref):
    """Head size 128 and 8 q heads per KV head, blocks of 32, fp16; long enough that the sink
    merge runs several token tiles per sequence."""
    seqs = [(300, 300), (200, 90), (150, 1)]
    paged, q, qsl = _inputs(3, seqs, hq=8, hkv=1, d=128, bs=32, dtype=torch.float16)
    got, want = _sparse_through_flash(paged, q, qsl, 0.09, [32, 70, 5], [48] * 3)
    assert rel_err(got, want) < TOL[torch.float16]


@needs_triton
@pytest.mark.parametrize("seqs", [SEQS, [(40, 1), (33, 1), (129, 1)]])
def test_dense_through_flash(flash_ref, seqs):
    """``dense_backend = "flash"`` (a step with prefills) and decode ``backend = "flash"`` (a
    decode batch): one causal call over the paged cache, written into the caller's buffer."""
    paged, q, qsl = _inputs(21, seqs)
    out = torch.full_like(q, float("nan"))
    got, _ = ops.paged_attention(q, paged.kv_cache, paged.block_table, paged.seq_lens, qsl,
                                 0.125, out=out, prefill_config={"dense_backend": "flash"},
                                 decode_config={"backend": "flash"})
    assert got.data_ptr() == out.data_ptr()
    assert flash_ref == [{"causal": True}]
    want, _ = ref.paged_attention_ref(q, paged.kv_cache, paged.block_table, paged.seq_lens,
                                      qsl, 0.125)
    assert rel_err(got, want) < TOL[torch.bfloat16]


@needs_triton
@pytest.mark.parametrize("case", ["windows differ", "no host windows", "full row", "gap",
                                  "calibration", "not chosen"])
def test_flash_not_taken(flash_ref, case):
    """Rows FlashAttention's single window cannot express, compressed KV, calibration, or a
    table that does not name "flash": our Triton kernels run, with the same result."""
    seqs = [(70, 70), (100, 37), (33, 1)]
    paged, q, qsl = _inputs(31, seqs)
    n = len(seqs)
    sinks, windows = [4, 4, 2], [16, 16, 16]
    cfg = {"sparse_backend": "flash", "block_m": 16, "block_n": 16}
    masks: dict = {"sink": _i32(sinks), "window": _i32(windows)}
    kw: dict = {"host_window": windows}
    calib = None
    if case == "windows differ":
        windows = [16, 8, 16]
        masks["window"], kw["host_window"] = _i32(windows), windows
    elif case == "no host windows":
        kw = {}
    elif case == "full row":
        windows = [16, 0, 16]
        masks["window"], kw["host_window"] = _i32(windows), windows
    elif case == "gap":
        masks.update(kept_end=_i32([0, 40, 0]), gap_end=_i32([0, 50, 0]))
    elif case == "calibration":
        gen = torch.Generator().manual_seed(1)
        calib = ops.Calibration(q_ref=q[qsl[1:].long() - 1].clone(),
                                o_e=torch.randn(n, 8, 64, generator=gen),
                                lse_e=torch.randn(n, 8, generator=gen),
                                enabled=torch.tensor([True, False, True]), tau=0.5)
    else:
        cfg = {"block_m": 16, "block_n": 16}
    got, _ = ops.paged_attention(q, paged.kv_cache, paged.block_table, paged.seq_lens, qsl,
                                 0.125, out=torch.full_like(q, float("nan")),
                                 prefill_config=cfg, decode_config={"block_n": 16},
                                 calibration=calib, **masks, **kw)
    assert flash_ref == []
    want, _ = ref.paged_attention_ref(q, paged.kv_cache, paged.block_table, paged.seq_lens,
                                      qsl, 0.125, calibration=calib, **masks)
    assert rel_err(got, want) < TOL[torch.bfloat16]


@needs_triton
@pytest.mark.parametrize("seqs,windows,taken", [
    # decode rows around a contiguous run of prefills: full rows, other windows
    ([(33, 1), (70, 70), (100, 37), (60, 2), (40, 1)], [0, 16, 16, 5, 0], True),
    # one prefill among full decode rows
    ([(33, 1), (129, 129), (40, 1)], [0, 24, 0], True),
    # prefills not contiguous: our kernels
    ([(70, 70), (33, 1), (100, 37)], [16, 0, 16], False),
])
def test_prefill_rows_through_flash(flash_ref, seqs, windows, taken):
    """A sparse prompt chunk keeps FlashAttention when the step's other rows (decodes) are full
    or have other windows: the prefill rows go there as views of the batch, the decode rows
    through our decode kernel; the result equals the float32 paged reference."""
    paged, q, qsl = _inputs(41 + len(seqs), seqs)
    got, want = _sparse_through_flash(paged, q, qsl, 0.125, [3, 4, 2, 8, 1][:len(seqs)],
                                      windows, {"block_m": 16, "block_n": 16}, {"block_n": 16})
    prefill_windows = {w for (_, ql), w in zip(seqs, windows, strict=True) if ql > 64 // 4}
    assert flash_ref == ([{"causal": True, "window_size": [prefill_windows.pop() - 1, 0]}]
                         if taken else [])
    assert not torch.isnan(got).any()
    assert rel_err(got, want) < TOL[torch.bfloat16]


def test_prefill_range():
    from attention_backends.kernels.flash_varlen import prefill_range

    qsl = [0, 1, 71, 108, 110, 111]  # q_lens 1, 70, 37, 2, 1
    assert prefill_range(qsl, [0, 16, 16, 5, 0], 16, 5) == (1, 3, 16)
    assert prefill_range(qsl, [0, 16, 8, 5, 0], 16, 5) is None  # windows differ
    assert prefill_range(qsl, [0, 16, 0, 5, 0], 16, 5) is None  # a full prefill
    assert prefill_range(qsl, None, 16, 5) is None
    assert prefill_range([0, 70, 71, 108], [16, 0, 16], 16, 3) is None  # not contiguous
    assert prefill_range([0, 1, 2], [16, 16], 16, 2) is None  # no prefill


@needs_triton
def test_float32_stays_on_our_kernels(flash_ref):
    """FlashAttention takes 16-bit inputs: a float32 model's steps never go there, whatever the
    table says."""
    seqs = [(70, 70), (33, 1)]
    paged, q, qsl = _inputs(51, seqs, dtype=torch.float32)
    masks = {"sink": _i32([4, 4]), "window": _i32([16, 16])}
    got, _ = ops.paged_attention(
        q, paged.kv_cache, paged.block_table, paged.seq_lens, qsl, 0.125,
        prefill_config={"sparse_backend": "flash", "dense_backend": "flash", "block_m": 16,
                        "block_n": 16}, decode_config={"block_n": 16},
        host_window=[16, 16], host_sink=[4, 4], host_query_start_loc=qsl.tolist(),
        host_seq_lens=paged.seq_lens.tolist(), **masks)
    assert flash_ref == []
    want, _ = ref.paged_attention_ref(q, paged.kv_cache, paged.block_table, paged.seq_lens,
                                      qsl, 0.125, **masks)
    assert rel_err(got, want) < TOL[torch.float32]


# ------------------------------------------------------------------ properties over random batches

_GROUPS = [(1, 1), (2, 1), (4, 1), (8, 1), (4, 2), (8, 2)]  # (Hq, Hkv): group sizes 1, 2, 4, 8


@st.composite
def _sparse_batches(draw):
    """A small step: rows with a cached prefix (0 for whole prompts) and 0 (padding) to ~80
    queries, per-row sinks (0, inside, past the window, past the sequence), one window for the
    flash rows (1 up to past every sequence); ``mixed`` gives the decode rows other windows
    (0 = full attention) so that only the prefill rows can go to FlashAttention."""
    hq, hkv = draw(st.sampled_from(_GROUPS))
    n = draw(st.integers(1, 4))
    q_thr = max(1, 64 // (hq // hkv))
    rows = []
    for _ in range(n):
        kind = draw(st.sampled_from(["prefill", "decode", "empty"]))
        q_len = {"prefill": draw(st.integers(q_thr + 1, q_thr + 24)),
                 "decode": draw(st.integers(1, min(q_thr, 4))), "empty": 0}[kind]
        ctx = draw(st.integers(0 if kind != "decode" else 1, 40))
        rows.append((ctx + q_len, q_len))
    window = draw(st.integers(1, 90))
    sinks = [draw(st.integers(0, 100)) for _ in range(n)]
    mixed = draw(st.booleans())
    windows = [window if not mixed or ql > q_thr else draw(st.sampled_from([0, 3, window + 1]))
               for _, ql in rows]
    return {"hq": hq, "hkv": hkv, "rows": rows, "sinks": sinks, "windows": windows,
            "dtype": draw(st.sampled_from([torch.float16, torch.bfloat16])),
            "d": draw(st.sampled_from([64, 128, 256])), "bs": draw(st.sampled_from([16, 32])),
            "block_t": draw(st.sampled_from([16, 64])),
            "seed": draw(st.integers(0, 2**16))}


@needs_triton
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=_sparse_batches())
def test_sink_window_property(flash_ref, monkeypatch, case):
    """Any batch the dispatch sends to FlashAttention (uniform window: the whole step; else its
    contiguous prefill rows) equals the float32 paged reference with the sink + window mask,
    NaN-poisoned cache slots and output included; token tiles of 16 and 64 queries in the
    sink merge (tiles straddling the band edge)."""
    from attention_backends.kernels import flash_varlen

    monkeypatch.setattr(flash_varlen, "SINK_BLOCK_T", case["block_t"])
    note(repr(case))
    flash_ref.clear()
    rows = case["rows"]
    paged, q, qsl = _inputs(case["seed"], rows, hq=case["hq"], hkv=case["hkv"], d=case["d"],
                            bs=case["bs"], dtype=case["dtype"])
    windows = case["windows"]
    got, want = _sparse_through_flash(paged, q, qsl, 0.125, case["sinks"], windows,
                                      {"block_m": 16, "block_n": 16},
                                      {"backend": "flash", "block_n": 16})
    if len(set(windows)) == 1 and windows[0] > 0 and q.shape[0]:  # (padding alone: no launch)
        assert flash_ref == [{"causal": True, "window_size": [windows[0] - 1, 0]}]
    assert not torch.isnan(got).any()
    assert rel_err(got, want) < TOL[case["dtype"]]


@needs_triton
@pytest.mark.parametrize("case", ["block size 8", "kv dtype", "out dtype"])
def test_flash_refused_for_shapes_it_cannot_take(flash_ref, case):
    """Blocks of 8 slots (vLLM's FlashAttention takes multiples of 16), a KV cache or output
    buffer of another dtype than q: our kernels run (the stand-in raises, as FlashAttention
    does, on all of these), with the reference's result."""
    seqs = [(70, 70), (33, 1)]
    paged, q, qsl = _inputs(61, seqs, bs=8 if case == "block size 8" else 16)
    kv_cache = paged.kv_cache.to(torch.float16) if case == "kv dtype" else paged.kv_cache
    out = torch.full_like(q, float("nan"), dtype=torch.float16 if case == "out dtype" else None)
    sinks, windows = [4, 2], [16, 16]
    masks = {"sink": _i32(sinks), "window": _i32(windows)}
    for cfg_extra, m in (({"sparse_backend": "flash"}, masks),
                         ({"dense_backend": "flash"}, {})):
        flash_ref.clear()
        got, _ = ops.paged_attention(
            q, kv_cache, paged.block_table, paged.seq_lens, qsl, 0.125, out=out,
            prefill_config={**cfg_extra, "block_m": 16, "block_n": 16},
            decode_config={"backend": "flash", "block_n": 16},
            host_window=windows if m else None, host_sink=sinks if m else None,
            host_query_start_loc=qsl.tolist(), host_seq_lens=paged.seq_lens.tolist(), **m)
        assert flash_ref == []
        want, _ = ref.paged_attention_ref(q, kv_cache, paged.block_table, paged.seq_lens, qsl,
                                          0.125, **m)
        assert rel_err(got, want) < TOL[torch.bfloat16]


def test_reference_refuses_what_flash_refuses():
    """The stand-in holds FlashAttention's limits, so a dispatch that sends it something
    FlashAttention cannot take fails here as it would on the GPU."""
    paged, q, qsl = _inputs(7, [(40, 40)], d=64, bs=16)
    k, v = paged.kv_cache.transpose(1, 2).split(64, dim=-1)
    kw = {"cu_seqlens_q": qsl, "max_seqlen_q": 40, "seqused_k": paged.seq_lens,
          "max_seqlen_k": 40, "softmax_scale": 0.125, "causal": True,
          "block_table": paged.block_table}
    ref.flash_varlen_ref(q=q, k=k, v=v, **kw)
    with pytest.raises(ValueError, match="16-bit"):
        ref.flash_varlen_ref(q=q.float(), k=k.float(), v=v.float(), **kw)
    with pytest.raises(ValueError, match="16-bit"):
        ref.flash_varlen_ref(q=q, k=k.half(), v=v.half(), **kw)
    with pytest.raises(ValueError, match="block size 8"):
        ref.flash_varlen_ref(q=q, k=k[:, :8], v=v[:, :8], **kw)
    with pytest.raises(ValueError, match="exceed"):
        ref.flash_varlen_ref(q=q, k=k, v=v, **{**kw, "max_seqlen_q": 39})
    with pytest.raises(ValueError, match="exceed"):
        ref.flash_varlen_ref(q=q, k=k, v=v, **{**kw, "max_seqlen_k": 39})
    q5 = torch.zeros(40, 8, 512, dtype=q.dtype)
    kv5 = torch.zeros(k.shape[0], 16, 2, 512, dtype=q.dtype)
    with pytest.raises(ValueError, match="head size 512"):
        ref.flash_varlen_ref(q=q5, k=kv5, v=kv5, **kw)


@needs_triton
def test_sink_window_lse_of_empty_rows_not_read(flash_ref):
    """FlashAttention writes ``lse = +inf`` for a row without keys (the stand-in does too); the
    band always holds the query's own key, so the merge never meets one: a query at p = W - 1
    (band from key 0), p = W (sink key 0 outside), p = sink + W - 1 (every sink key outside),
    window 1, and a sink past the sequence."""
    seqs = [(1, 1), (17, 17), (40, 40), (7, 1), (3, 2)]
    paged, q, qsl = _inputs(71, seqs, hq=4, hkv=1)
    got, want = _sparse_through_flash(paged, q, qsl, 0.125, [5, 1, 24, 50, 9], [16] * 5)
    assert flash_ref
    assert not torch.isnan(got).any()
    assert rel_err(got, want) < TOL[torch.bfloat16]


@needs_triton
@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=_sparse_batches())
def test_dense_property(flash_ref, case):
    """A dense layer's step (whole prompts, chunks over a cached prefix, decodes, padding rows)
    goes to FlashAttention in one causal call and equals the float32 paged reference."""
    note(repr(case))
    flash_ref.clear()
    rows = case["rows"]
    paged, q, qsl = _inputs(case["seed"], rows, hq=case["hq"], hkv=case["hkv"], d=case["d"],
                            bs=case["bs"], dtype=case["dtype"])
    out = torch.full_like(q, float("nan"))
    got, _ = ops.paged_attention(
        q, paged.kv_cache, paged.block_table, paged.seq_lens, qsl, 0.125, out=out,
        prefill_config={"dense_backend": "flash"}, decode_config={"backend": "flash"},
        host_query_start_loc=qsl.tolist(), host_seq_lens=paged.seq_lens.tolist())
    assert flash_ref == ([{"causal": True}] if q.shape[0] else [])
    want, _ = ref.paged_attention_ref(q, paged.kv_cache, paged.block_table, paged.seq_lens,
                                      qsl, 0.125)
    assert not torch.isnan(got).any()
    assert rel_err(got, want) < TOL[case["dtype"]]
