"""Builds paged KV caches for the kernel tests, with poisoned (NaN) slots wherever nothing may
be read: freed gap blocks (stale block-table entries point at a NaN block), gap slots inside
partially kept blocks, slots past each sequence's end, and unused blocks."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import pytest
import torch

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed")


@dataclass
class PagedKV:
    kv_cache: torch.Tensor  # [num_blocks, Hkv, bs, 2D]
    block_table: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    logical: list[torch.Tensor]  # per sequence [L, Hkv, 2D], finite everywhere (gap too)
    nan_block: int  # physical block filled with NaN; stale entries point here


def build_paged_kv(lens: list[int], hkv: int, d: int, bs: int, dtype: torch.dtype,
                   gen: torch.Generator, kept_end: list[int] | None = None,
                   gap_end: list[int] | None = None, spare_blocks: int = 3) -> PagedKV:
    n = len(lens)
    kept_end = kept_end or [0] * n
    gap_end = gap_end or [0] * n
    blocks_per = [(length + bs - 1) // bs for length in lens]
    max_blocks = max(blocks_per) + 1
    num_blocks = sum(blocks_per) + spare_blocks + 1
    kv = torch.full((num_blocks, hkv, bs, 2 * d), float("nan"), dtype=dtype)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    nan_block = perm.pop()
    table = torch.full((n, max_blocks), nan_block, dtype=torch.int32)
    logical = []
    for s, length in enumerate(lens):
        x = torch.randn(length, hkv, 2 * d, generator=gen).to(dtype)
        logical.append(x)
        for b in range(blocks_per[s]):
            lo, hi = b * bs, min(length, (b + 1) * bs)
            if lo >= kept_end[s] and hi <= gap_end[s]:
                continue  # freed: the stale entry keeps pointing at the NaN block
            phys = perm.pop()
            table[s, b] = phys
            for j in range(lo, hi):
                if kept_end[s] <= j < gap_end[s]:
                    continue  # stale slot of a partially kept block: stays NaN
                kv[phys, :, j - lo] = x[j]
    return PagedKV(kv, table, torch.tensor(lens, dtype=torch.int32), logical, nan_block)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.to(torch.float64)
    ref = ref.to(torch.float64)
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


TOL = {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 1e-4}
