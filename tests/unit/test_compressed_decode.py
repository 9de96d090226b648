"""Compressed decode rows through vLLM's CPU kernel (kernels.compressed_decode): the split into
the kernel's bulk and the float32 rest covers exactly the visible slots, and the kernel with
its heads doubled and the rest (merged with CaliDrop's evicted part) as its sink logit gives
the float32 reference's attention, with the gap's slots poisoned with NaN."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_backends.kernels import compressed_decode as cd
from attention_backends.kernels import kv_layout as kvl
from attention_backends.kernels import ops
from attention_backends.kernels import reference as ref
from tests.kernels.kvcache_builder import rel_err
from tests.unit.vllm_cpu_cache import isa_for, writer

HQ, HKV, D, BS = 4, 2, 64, 32
SCALE = D ** -0.5
vllm_ops = pytest.importorskip("vllm._custom_ops")


def _slots(blocks: list[int], length: int) -> set[int]:
    """The first ``length`` slots of ``blocks``, in the kernel's order."""
    return set([b * BS + j for b in blocks for j in range(BS)][:length])


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 12 * BS), st.integers(1, 6 * BS), st.integers(0, 5 * BS))
def test_bulk_and_rest_are_the_visible_slots(kept_end, gap, decoded):
    gap_end = kept_end + gap
    seq_len = gap_end + decoded + 1
    plan = cd.plan_compressed_decode(seq_len, kept_end, gap_end, BS)
    visible = set(range(kept_end)) | set(range(gap_end, seq_len))
    bulk = _slots(plan.bulk_blocks, plan.bulk_len)
    rest = {s for lo, hi in plan.rest_ranges for s in range(lo, hi)}
    assert len(bulk) == plan.bulk_len and bulk | rest == visible and not bulk & rest
    assert {s for lo, hi in plan.visible for s in range(lo, hi)} == visible
    assert len(plan.rest_blocks) <= 2 and all(lo // BS in plan.rest_blocks
                                              and (hi - 1) // BS in plan.rest_blocks
                                              for lo, hi in plan.rest_ranges)


def test_a_plan_needs_a_query_after_the_gap():
    with pytest.raises(ValueError, match="kept_end"):
        cd.plan_compressed_decode(100, 40, 100, BS)
    with pytest.raises(ValueError, match="kept_end"):
        cd.plan_compressed_decode(100, 60, 50, BS)


def _isa(dtype: torch.dtype) -> str:
    return isa_for(dtype, BS, D)


# (seq_len, kept_end, gap_end): aligned or not at either end, decode inside the gap's end
# block or past it, a kept region shorter than a block (no bulk before the gap), a gap inside
# one block
ROWS = [
    (700, 256, 650), (520, 100, 500), (300, 64, 290), (131, 20, 100), (90, 40, 60),
    (1000, 320, 960), (161, 31, 129),
    (110, 20, 100),  # no whole block anywhere: no kernel call
]


def _kernel(isa, dtype, q, cache, table, length, s_aux):
    kc, vc = cache.view(cache.shape[0], HKV, 2 * BS, D).chunk(2, dim=2)
    qsl = torch.tensor([0, 1], dtype=torch.int32)
    lens = torch.tensor([length], dtype=torch.int32)
    md = vllm_ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=q.shape[1], num_kv_heads=HKV, head_dim=D, seq_lens=lens,
        dtype=dtype, query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa,
        enable_kv_split=False)
    out = torch.full_like(q, float("nan"))
    vllm_ops.cpu_attention_with_kv_cache(
        query=q, key_cache=kc, value_cache=vc, output=out, query_start_loc=qsl, seq_lens=lens,
        scale=SCALE, causal=True, alibi_slopes=None, sliding_window=-1, block_table=table,
        softcap=0.0, scheduler_metadata=md, s_aux=s_aux)
    return out


@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_kernel_with_the_rest_as_sink_logit_is_the_reference(dtype, tol, calibrated):
    gen = torch.Generator().manual_seed(5)
    isa = _isa(dtype)
    layout = kvl.probe("vllm", writer(isa), BS, D, dtype)
    blocks = [(n + BS - 1) // BS for n, *_ in ROWS]
    perm = torch.randperm(sum(blocks), generator=gen)
    cache = torch.zeros(sum(blocks), HKV, BS, 2 * D, dtype=dtype)
    table = torch.zeros(len(ROWS), max(blocks), dtype=torch.int32)
    at = 0
    for s, ((n, kept_end, gap_end), b) in enumerate(zip(ROWS, blocks, strict=True)):
        table[s, :b] = perm[at:at + b].to(torch.int32)
        at += b
        slots = (table[s, :b].long()[:, None] * BS + torch.arange(BS)).flatten()
        kv = torch.randn(b * BS, HKV, 2 * D, generator=gen).to(dtype)
        kv[kept_end:gap_end] = float("nan")  # the gap: stale, never to be read
        # past the sequence, in its last block: not read by a kernel that respects seq_len
        # (vLLM's may multiply them by a zero weight, so garbage, not NaN)
        kv[n:] = 1e3
        writer(isa)(kv[..., :D], kv[..., D:], cache, slots)
    q = torch.randn(len(ROWS), HQ, D, generator=gen).to(dtype)
    lens, kept, gaps = (torch.tensor([r[i] for r in ROWS], dtype=torch.int32) for i in range(3))
    calib = None
    if calibrated:  # merged at every head (tau -1)
        calib = ops.Calibration(
            q_ref=q.clone(), o_e=torch.randn(len(ROWS), HQ, D, generator=gen),
            lse_e=torch.randn(len(ROWS), HQ, generator=gen) * 3 + 4,
            enabled=torch.ones(len(ROWS), dtype=torch.bool), tau=-1.0)
    want, _ = ref.paged_attention_ref(
        q, cache, table, lens, torch.arange(len(ROWS) + 1, dtype=torch.int32), SCALE,
        kept_end=kept, gap_end=gaps, calibration=calib, kv_layout=layout)

    for s, (n, kept_end, gap_end) in enumerate(ROWS):
        plan = cd.plan_compressed_decode(n, kept_end, gap_end, BS)
        evicted = (calib.o_e[s], calib.lse_e[s]) if calibrated else None
        bulk_table = table[s].index_select(0, torch.tensor(plan.bulk_blocks, dtype=torch.int64))
        calls = []

        def bulk(q2, s_aux, plan=plan, bulk_table=bulk_table, calls=calls):
            calls.append(q2.shape)
            return _kernel(isa, dtype, q2, cache, bulk_table[None], plan.bulk_len, s_aux)

        got = cd.decode_row(q[s], cache, layout, table[s], plan, SCALE, evicted, bulk)
        assert calls == ([(1, 2 * HQ, D)] if plan.bulk_len else []), ROWS[s]
        assert rel_err(got, want[s]) < tol, ROWS[s]
        if plan.bulk_len:  # a zero bulk output (w undefined): the whole row in float32
            zero = cd.decode_row(q[s], cache, layout, table[s], plan, SCALE, evicted,
                                 lambda q2, s_aux: torch.zeros_like(q2))
            assert rel_err(zero, want[s]) < tol, ROWS[s]


def test_a_zero_bulk_output_is_reported():
    out = torch.ones(2 * HQ, D)
    merged = cd.merge_bulk(out, torch.full((HQ, D), 5.0))
    assert torch.equal(merged, torch.ones(HQ, D))  # w = 1 at every head: the bulk alone
    out[2] = 0.0  # head 1: o_A = 0, w undefined
    assert cd.merge_bulk(out, torch.full((HQ, D), 5.0)) is None


def test_the_rest_reads_any_layout():
    """Through strided views (affine layouts) or the offset tables (others): the same result."""
    gen = torch.Generator().manual_seed(9)
    cache = torch.randn(6, HKV, BS, 2 * D, generator=gen)
    perm = torch.randperm(2 * BS * D, generator=gen)
    permuted = kvl.from_offsets("permuted", perm[:BS * D].reshape(BS, D),
                                perm[BS * D:].reshape(BS, D))
    same = torch.zeros_like(cache)
    b, h, j = torch.meshgrid(torch.arange(6), torch.arange(HKV), torch.arange(BS),
                             indexing="ij")
    kvl.write_slots(same, permuted, b, h, j, cache[..., :D], cache[..., D:])
    row = torch.tensor([4, 0, 5, 2], dtype=torch.int32)
    q = torch.randn(HQ, D, generator=gen)
    ranges = [(40, 64), (70, 90)]  # two blocks: the kept end, the gap's end
    want = cd.rest_attention(q, cache, kvl.slot_major(BS, D), row, ranges, SCALE)
    got = cd.rest_attention(q, same, permuted, row, ranges, SCALE)
    for a, b_ in zip(got, want, strict=True):
        assert torch.allclose(a, b_, atol=1e-5)
    # the evicted part as one more key, where it applies (head 1 not)
    o_e, lse_e = torch.randn(HQ, D, generator=gen), torch.tensor([1.0, float("-inf"), 3.0, 0.5])
    merged = [cd.rest_attention(q, c, lay, row, ranges, SCALE, (o_e, lse_e))
              for c, lay in ((cache, kvl.slot_major(BS, D)), (same, permuted))]
    expect = ref.lse_merge(want[0], want[1], o_e, lse_e), torch.logaddexp(want[1], lse_e)
    for o, lse in merged:
        assert torch.allclose(o, expect[0], atol=1e-5) and torch.allclose(lse, expect[1])
        assert torch.equal(o[1], want[0][1])
    slots = torch.cat([torch.arange(lo, hi) for lo, hi in ranges])
    phys = row.long()[slots // BS]
    k, v = cache[phys, :, slots % BS, :D], cache[phys, :, slots % BS, D:]  # [n, Hkv, D]
    scores = torch.einsum("hgd,nhd->hgn", q.view(HKV, HQ // HKV, D), k) * SCALE
    o = torch.einsum("hgn,nhd->hgd", scores.softmax(-1), v).reshape(HQ, D)
    assert torch.allclose(want[0], o, atol=1e-5)
    assert torch.allclose(want[1], scores.logsumexp(-1).reshape(HQ), atol=1e-5)


def _torch_sinks(ignore_s_aux: bool):
    def attend(q, k, v, s_aux):
        hkv, d = k.shape[1], k.shape[2]
        scores = torch.einsum("hgd,nhd->hgn", q[0].float().view(hkv, -1, d), k.float()) * d ** -.5
        scores = scores.reshape(q.shape[1], -1)
        if not ignore_s_aux:
            scores = torch.cat([scores, s_aux[:, None]], 1)
        p = scores.softmax(-1)[:, :k.shape[0]].view(hkv, -1, k.shape[0])
        return torch.einsum("hgn,nhd->hgd", p, v.float()).reshape(1, q.shape[1], d).to(q.dtype)
    return attend


def test_the_sink_logit_meaning_is_checked():
    cd.check_sink_logit(_torch_sinks(False), D, torch.bfloat16)
    with pytest.raises(RuntimeError, match="s_aux"):
        cd.check_sink_logit(_torch_sinks(True), D, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vllms_kernel_passes_the_sink_logit_check(dtype):
    from attention_backends.vllm_glue.backend_cpu import FluxCPUAttentionImpl

    impl = FluxCPUAttentionImpl.__new__(FluxCPUAttentionImpl)
    impl.head_size = D
    impl.check_sink_logit(_isa(dtype), dtype)  # raises if vLLM's sinks meant something else
