"""The CPU path of unmasked attention: whole prompts through torch SDPA, the rest (decode steps,
chunks over a cached prefix) through the float32 reference, in one batch."""

from __future__ import annotations

import pytest
import torch

from attention_backends.kernels import ops
from attention_backends.kernels import reference as ref


def _paged(lens, hkv, d, bs, dtype, gen):
    blocks = [(n + bs - 1) // bs for n in lens]
    perm = torch.randperm(sum(blocks) + 3, generator=gen)
    kv = torch.randn(sum(blocks) + 3, hkv, bs, 2 * d, generator=gen).to(dtype)
    table = torch.zeros(len(lens), max(blocks), dtype=torch.int32)
    at = 0
    for s, b in enumerate(blocks):
        table[s, :b] = perm[at:at + b].to(torch.int32)
        at += b
    return kv, table


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mixed_batch_matches_the_reference(dtype):
    gen = torch.Generator().manual_seed(5)
    hq, hkv, d, bs = 8, 2, 64, 16
    seqs = [(90, 90), (120, 1), (70, 30), (33, 33), (200, 2)]  # (seq_len, q_len)
    kv, table = _paged([n for n, _ in seqs], hkv, d, bs, dtype, gen)
    q = torch.randn(sum(ql for _, ql in seqs), hq, d, generator=gen).to(dtype)
    qsl = torch.tensor([0] + [ql for _, ql in seqs]).cumsum(0).to(torch.int32)
    lens = torch.tensor([n for n, _ in seqs], dtype=torch.int32)
    want, _ = ref.paged_attention_ref(q, kv, table, lens, qsl, 0.125)
    out = torch.full_like(q, float("nan"))
    got, hits = ops.paged_attention(q, kv, table, lens, qsl, 0.125, out=out)
    assert hits is None and got.data_ptr() == out.data_ptr()
    assert not torch.isnan(got).any()
    err = float((got.double() - want.double()).norm() / want.double().norm())
    assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5), err
