"""Sink + window attention as plain sliding-window attention over virtual block tables.

A causal paged-attention kernel with a sliding window ``W'`` shows the query at the last slot
``p'`` of a sequence the slots ``(p' - W', p']`` of that sequence, as listed by its block
table (vLLM's CPU kernel is one). Sparse attention shows the query at slot ``p`` the first
``sink`` slots and the slots ``(p - window, p]``. When ``sink`` is a whole number of blocks
(``k`` blocks, 0 included) and ``window`` at least one block, the second is the first over a
*virtual* sequence of real blocks, with ``W' = sink + window`` (with no sink, the real
sequence itself, for any window):

- queries below ``sink + window`` see every slot before them: the real table (``W'`` hides
  nothing there);
- further queries go in chunks ``[c0, c1)`` with ``c1 <= b0 * bs + window`` (``b0``: the block
  of ``c0``, ``bs`` the block size). The virtual table is the real blocks from the one holding
  ``c0 - window + 1`` up to ``b0 - 1``, then the ``k`` sink blocks, then the real blocks from
  ``b0`` up to the one holding ``c1 - 1``. Its slots before the sink blocks are the only ones
  ``W'`` can hide, and it hides exactly those at or before ``p - window``; the sink blocks and
  what follows them lie inside every query's window (that is what bounds ``c1``).

Attention does not depend on where a key sits in the sequence once RoPE is applied (K is
stored rotated), so the result is the sparse attention of the real sequence. No vLLM import:
the plan is index arithmetic; the CPU backend hands it to vLLM's kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SinkWindowPlan:
    """Virtual sequences for the sliding-window kernel, covering every query of ``rows``.

    ``tokens [T']`` int64: the batch positions of the queries, in virtual-sequence order;
    ``query_start_loc [V + 1]`` int32 over them; ``seq_lens [V]`` int32 and ``block_table
    [V, max_blocks]`` int32 (physical blocks; unused entries 0) of the virtual sequences;
    ``sliding_window``: the kernel's window, ``sink + window`` of every row of the plan.
    """

    rows: list[int]
    sliding_window: int
    tokens: Tensor
    query_start_loc: Tensor
    seq_lens: Tensor
    block_table: Tensor
    max_query_len: int
    max_seq_len: int


def can_plan(sink: int, window: int, block_size: int) -> bool:
    """Whether ``plan_sink_window`` takes a row with this sink and window: no sink and any
    window (the kernel's own sliding window on the real table), or a sink of whole blocks and a
    window of at least one block."""
    if sink == 0:
        return window >= 1
    return sink > 0 and sink % block_size == 0 and window >= block_size


def _virtual_rows(ctx: int, seq_len: int, sink: int, window: int, bs: int,
                  real: list[int]) -> list[tuple[int, int, list[int], int]]:
    """``(q0, q1, blocks, virtual seq_len)`` for the row's queries at slots ``[ctx, seq_len)``
    (``real``: its physical blocks)."""
    if sink == 0:  # a plain sliding window: the real table, all queries at once
        return [(ctx, seq_len, real, seq_len)]
    out = []
    k = sink // bs
    p = ctx
    while p < seq_len:
        if p < sink + window:
            c1 = min(seq_len, sink + window)
            out.append((p, c1, real[:(c1 - 1) // bs + 1], c1))
        else:
            b0 = p // bs
            c1 = min(seq_len, b0 * bs + window)
            bw = (p - window + 1) // bs
            blocks = real[bw:b0] + real[:k] + real[b0:(c1 - 1) // bs + 1]
            out.append((p, c1, blocks, (b0 - bw) * bs + sink + c1 - b0 * bs))
        p = c1
    return out


def plan_sink_window(rows: Sequence[int], query_start_loc: Sequence[int],
                     seq_lens: Sequence[int], sink: Sequence[int], window: Sequence[int],
                     block_table: Tensor, block_size: int) -> list[SinkWindowPlan]:
    """One plan per distinct ``sink + window`` among ``rows`` (each of which must pass
    ``can_plan``). ``query_start_loc``, ``seq_lens``, ``sink``, ``window``: host ints per batch
    row; ``block_table [num_rows, max_blocks]``."""
    groups: dict[int, list[int]] = {}
    for r in rows:
        if not can_plan(sink[r], window[r], block_size):
            raise ValueError(f"row {r}: sink {sink[r]} / window {window[r]} cannot be planned "
                             f"with block size {block_size}")
        groups.setdefault(sink[r] + window[r], []).append(r)
    plans = []
    for w, group in groups.items():
        tokens: list[Tensor] = []
        qsl, lens, tables = [0], [], []
        for r in group:
            q_len = query_start_loc[r + 1] - query_start_loc[r]
            ctx = seq_lens[r] - q_len
            real = block_table[r, :(seq_lens[r] - 1) // block_size + 1].tolist()
            for q0, q1, blocks, virtual_len in _virtual_rows(ctx, seq_lens[r], sink[r],
                                                             window[r], block_size, real):
                t0 = query_start_loc[r] + q0 - ctx
                tokens.append(torch.arange(t0, t0 + q1 - q0))
                qsl.append(qsl[-1] + q1 - q0)
                lens.append(virtual_len)
                tables.append(blocks)
        width = max(len(t) for t in tables)
        plans.append(SinkWindowPlan(
            rows=group, sliding_window=w, tokens=torch.cat(tokens),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            seq_lens=torch.tensor(lens, dtype=torch.int32),
            block_table=torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                     dtype=torch.int32),
            max_query_len=max(b - a for a, b in zip(qsl, qsl[1:], strict=False)),
            max_seq_len=max(lens)))
    return plans
