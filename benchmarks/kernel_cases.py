"""Test data and measures shared by the attention-kernel benchmarks (gpu_kernels.py,
gpu_sweep.py): a paged KV cache in vLLM's layout with its blocks in random physical order, the
same keys and values gathered contiguously (SDPA / FlexAttention inputs), the relative error
against a reference, and the FLOP count of a prefill. Scripts import it from their own folder."""

from __future__ import annotations

import torch


def paged_kv_cache(batch: int, length: int, block_size: int, seed: int, num_kv_heads: int,
                   head_dim: int, device, dtype: torch.dtype):
    """Random paged KV for `batch` sequences of `length` slots: ``(kv, block_table, null)``.

    ``kv [batch * nblk + 1, num_kv_heads, block_size, 2 * head_dim]`` (K then V in the last
    dimension, ``nblk = ceil(length / block_size)``), drawn from a generator seeded with `seed`;
    ``block_table [batch, nblk]`` int32, a random permutation of the blocks; the extra physical
    block ``null`` (the last) is all-NaN and stands for freed / null blocks."""
    g = torch.Generator(device=device).manual_seed(seed)
    nblk = -(-length // block_size)
    kv = torch.randn(batch * nblk + 1, num_kv_heads, block_size, 2 * head_dim, device=device,
                     dtype=dtype, generator=g)
    null = batch * nblk
    kv[null] = float("nan")
    perm = torch.randperm(batch * nblk, device=device, generator=g).to(torch.int32)
    return kv, perm.view(batch, nblk).contiguous(), null


def contiguous_kv(kv, bt, length):
    """``[B, Hkv, length, D]`` K and V gathered from the paged cache `kv` through the block
    table `bt` (SDPA / FlexAttention inputs)."""
    x = kv[bt.long()]  # [B, nblk, Hkv, bs, 2D]
    b, nblk, h, bs, d2 = x.shape
    x = x.permute(0, 2, 1, 3, 4).reshape(b, h, nblk * bs, d2)[:, :, :length]
    return x[..., :d2 // 2].contiguous(), x[..., d2 // 2:].contiguous()


def rel_err(a, b) -> float:
    """``||a - b|| / ||b||`` in float64 (the denominator at least 1e-30)."""
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def prefill_flops(length: int, ctx: int, sink: int, window: int, num_q_heads: int,
                  head_dim: int) -> float:
    """``4 * Hq * D *`` (the visible keys summed over the queries at slots ``[ctx, length)``):
    causal, or the first `sink` keys plus the last `window` (the query's own included) when
    `window` > 0."""
    p = torch.arange(ctx, length, dtype=torch.float64)
    vis = p + 1
    if window > 0:
        vis = torch.clamp(p + 1, max=sink) + torch.clamp(torch.clamp(p + 1 - sink, max=window),
                                                         min=0)
    return 4.0 * num_q_heads * head_dim * float(vis.sum())
