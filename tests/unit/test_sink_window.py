"""Sink + window attention as sliding-window attention over virtual block tables
(kernels.sink_window), run through vLLM's CPU kernel, against the float32 reference: decode rows
and prefill chunks of several lengths, sinks of 0, 1 and 2 blocks, in one batch."""

from __future__ import annotations

import pytest
import torch

from attention_backends.kernels import kv_layout as kvl
from attention_backends.kernels import reference as ref
from attention_backends.kernels import sink_window as sw
from tests.kernels.kvcache_builder import rel_err
from tests.unit.vllm_cpu_cache import isa_for, writer

HQ, HKV, D, BS = 4, 2, 64, 32
vllm_ops = pytest.importorskip("vllm._custom_ops")


def _isa(dtype: torch.dtype) -> str:
    return isa_for(dtype, BS, D)


# (seq_len, q_len, sink, window)
ROWS = [
    (900, 1, 32, 64),  # decode, one sink block
    (700, 1, 0, 96),  # decode, no sink: a plain sliding window
    (300, 40, 0, 5),  # no sink, a window shorter than a block
    (100, 1, 64, 64),  # decode that sees everything (below sink + window)
    (1000, 400, 64, 96),  # chunk over a prefix: several virtual sequences
    (450, 450, 32, 128),  # a whole prompt: the dense start, then windowed chunks
    (333, 7, 32, 256),  # a short chunk straddling sink + window
]


def test_only_whole_sink_blocks_and_windows_of_a_block_are_planned():
    assert sw.can_plan(0, 1, BS) and sw.can_plan(2 * BS, 5 * BS + 3, BS)
    assert not sw.can_plan(4, 4 * BS, BS) and not sw.can_plan(BS, BS - 1, BS)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_vllm_kernel_on_the_plan_is_sparse_attention(dtype, tol):
    gen = torch.Generator().manual_seed(31)
    isa = _isa(dtype)
    layout = kvl.probe("vllm", writer(isa), BS, D, dtype)
    blocks = [(n + BS - 1) // BS for n, *_ in ROWS]
    perm = torch.randperm(sum(blocks) + 4, generator=gen)
    cache = torch.zeros(sum(blocks) + 4, HKV, BS, 2 * D, dtype=dtype)
    table = torch.zeros(len(ROWS), max(blocks), dtype=torch.int32)
    at = 0
    for s, ((n, *_), b) in enumerate(zip(ROWS, blocks, strict=True)):
        table[s, :b] = perm[at:at + b].to(torch.int32)
        at += b
        slots = table[s, :b].long()[:, None] * BS + torch.arange(BS)
        kv = torch.randn(n, HKV, 2 * D, generator=gen).to(dtype)
        writer(isa)(kv[..., :D], kv[..., D:], cache, slots.flatten()[:n])
    q_lens = [r[1] for r in ROWS]
    q = torch.randn(sum(q_lens), HQ, D, generator=gen).to(dtype)
    qsl = [0, *torch.tensor(q_lens).cumsum(0).tolist()]
    lens, sinks, windows = ([r[i] for r in ROWS] for i in (0, 2, 3))
    want, _ = ref.paged_attention_ref(
        q, cache, table, torch.tensor(lens, dtype=torch.int32),
        torch.tensor(qsl, dtype=torch.int32), 0.125,
        sink=torch.tensor(sinks, dtype=torch.int32),
        window=torch.tensor(windows, dtype=torch.int32), kv_layout=layout)

    plans = sw.plan_sink_window(range(len(ROWS)), qsl, lens, sinks, windows, table, BS)
    assert sorted(r for p in plans for r in p.rows) == list(range(len(ROWS)))
    got = torch.full_like(q, float("nan"))
    kc, vc = cache.view(cache.shape[0], HKV, 2 * BS, D).chunk(2, dim=2)
    for plan in plans:
        num = plan.seq_lens.shape[0]
        md = vllm_ops.cpu_attn_get_scheduler_metadata(
            num_reqs=num, num_heads=HQ, num_kv_heads=HKV, head_dim=D, seq_lens=plan.seq_lens,
            dtype=dtype, query_start_loc=plan.query_start_loc, causal=True,
            sliding_window_size=plan.sliding_window, isa=isa, enable_kv_split=False)
        out = torch.empty(plan.tokens.numel(), HQ, D, dtype=dtype)
        vllm_ops.cpu_attention_with_kv_cache(
            query=q.index_select(0, plan.tokens), key_cache=kc, value_cache=vc, output=out,
            query_start_loc=plan.query_start_loc, seq_lens=plan.seq_lens, scale=0.125,
            causal=True, alibi_slopes=None, sliding_window=plan.sliding_window,
            block_table=plan.block_table, softcap=0.0, scheduler_metadata=md, s_aux=None)
        got.index_copy_(0, plan.tokens, out)
    for s in range(len(ROWS)):  # row by row: one wrong window must not hide in the batch
        assert rel_err(got[qsl[s]:qsl[s + 1]], want[qsl[s]:qsl[s + 1]]) < tol, ROWS[s]
