#!/usr/bin/env python3
"""One compressed (CaliDrop) row's decode on the CPU against the dense decode of the same row,
per layer call: where the compressed path starts to pay.

A row of ``L`` slots compressed to its first ``budget`` slots plus this step's token decodes
through ``kernels.compressed_decode.decode_row`` (vLLM's CPU kernel on the kept blocks with
each query head run twice, the slots around the gap and CaliDrop's evicted part in float32);
the dense row runs vLLM's kernel once over all ``L`` slots. Both on the same cache (vLLM's CPU
layout, bf16, blocks of 128 as vLLM's CPU backend picks). Each timing cycles through copies of
the cache that together hold 96 MiB (``COLD_BYTES``, three times this machine's last-level
cache), so that every call reads its KV from memory, as one layer of a real model does: a
single copy of a 16K row of the embedded model (8 MiB) would sit in the cache and flatter the
dense call. Also timed: the kernel call of the compressed path alone (``2 * Hq`` heads over the
kept blocks) and the float32 rest alone.

Head shapes: the embedded model's (4 query heads, 2 KV heads, head size 64) and Llama-3.1-8B's
(32, 8, 128). Median of ``--reps`` calls after ``reps / 2`` untimed ones, and one untimed case
per head shape first: run it on a quiet machine; only the ratios mean something across
machines.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/cpu_compressed_decode.py \
        [--lengths 4096 8192 16384] [--budget 2048] [--reps 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attention_backends.kernels import compressed_decode as cd  # noqa: E402
from attention_backends.kernels import kv_layout as kvl  # noqa: E402
from tests.unit.vllm_cpu_cache import isa_for, writer  # noqa: E402

BS = 128
DTYPE = torch.bfloat16
HEADS = {"embedded model (4/2/64)": (4, 2, 64), "Llama-3.1-8B (32/8/128)": (32, 8, 128)}
ONE_QUERY = torch.tensor([0, 1], dtype=torch.int32)
COLD_BYTES = 96 << 20  # KV bytes cycled through per timing: 3x this machine's 32 MiB L3


def median_us(fns: list, reps: int) -> float:
    """Median time of one call, calling ``fns`` in turn (each on its own copy of the cache)."""
    for i in range(max(20, reps // 2)):
        fns[i % len(fns)]()
    times = []
    for i in range(reps):
        fn = fns[i % len(fns)]
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def case(hq: int, hkv: int, d: int, length: int, budget: int, reps: int) -> dict:
    from vllm import _custom_ops as vllm_ops

    gen = torch.Generator().manual_seed(length + hq)
    isa = isa_for(DTYPE, BS, d)
    layout = kvl.probe("vllm", writer(isa), BS, d, DTYPE)
    nb = -(-length // BS)
    slots = torch.arange(nb * BS)
    # copies of the row's cache, used in turn, together larger than the last-level cache: each
    # call reads its KV from memory, as a layer of a real model does
    copies = max(1, -(-COLD_BYTES // (nb * BS * hkv * 2 * d * 2)))
    caches = []
    for _ in range(copies):
        cache = torch.empty(nb, hkv, BS, 2 * d, dtype=DTYPE)
        kv = torch.randn(nb * BS, hkv, 2 * d, generator=gen).to(DTYPE)
        writer(isa)(kv[..., :d], kv[..., d:], cache, slots)
        caches.append(cache)
    row = torch.randperm(nb, generator=gen).to(torch.int32)  # scattered physical blocks
    scale = d ** -0.5
    q = torch.randn(hq, d, generator=gen).to(DTYPE)
    evicted = (torch.randn(hq, d, generator=gen), torch.randn(hq, generator=gen) + 3.0)

    def kernel(q3, table, lens, s_aux=None) -> list:
        """One runner per cache copy (the scheduler metadata built once, as the backend caches
        it per step)."""
        md = vllm_ops.cpu_attn_get_scheduler_metadata(
            num_reqs=1, num_heads=q3.shape[1], num_kv_heads=hkv, head_dim=d, seq_lens=lens,
            dtype=DTYPE, query_start_loc=ONE_QUERY, causal=True, sliding_window_size=-1,
            isa=isa, enable_kv_split=False)
        out = q3.new_empty(q3.shape)
        runs = []
        for cache in caches:
            key_cache, value_cache = cache.view(nb, hkv, 2 * BS, d).chunk(2, dim=2)

            def run(q3=q3, s_aux=s_aux, key_cache=key_cache, value_cache=value_cache):
                vllm_ops.cpu_attention_with_kv_cache(
                    query=q3, key_cache=key_cache, value_cache=value_cache, output=out,
                    query_start_loc=ONE_QUERY, seq_lens=lens, scale=scale, causal=True,
                    alibi_slopes=None, sliding_window=-1, block_table=table, softcap=0.0,
                    scheduler_metadata=md, s_aux=s_aux)
                return out
            runs.append(run)
        return runs

    dense = kernel(q[None], row[None], torch.tensor([length], dtype=torch.int32))
    plan = cd.plan_compressed_decode(length, budget, length - 1, BS)
    table = row.index_select(0, torch.tensor(plan.bulk_blocks))[None].contiguous()
    lens = torch.tensor([plan.bulk_len], dtype=torch.int32)
    bulk = kernel(cd.duplicate_heads(q[None]), table, lens, torch.zeros(2 * hq))
    compressed = [lambda c=c, b=b: cd.decode_row(q, c, layout, row, plan, scale, evicted, b)
                  for c, b in zip(caches, bulk, strict=True)]
    rest = [lambda c=c: cd.rest_attention(q, c, layout, row, plan.rest_ranges, scale, evicted)
            for c in caches]
    return {"dense": median_us(dense, reps), "compressed": median_us(compressed, reps),
            "kernel, doubled heads": median_us(bulk, reps), "rest": median_us(rest, reps),
            "kernel, kept blocks once": median_us(kernel(q[None], table, lens), reps),
            "copies": copies}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"torch threads {torch.get_num_threads()}, blocks of {BS}, budget {args.budget}; "
          "µs per layer call (median)")
    print(f"{'heads':26s} {'L':>6s} {'dense':>8s} {'compr.':>8s} {'2x heads':>8s} "
          f"{'1x heads':>8s} {'rest':>7s} {'copies':>6s}  dense / compressed")
    for name, (hq, hkv, d) in HEADS.items():
        # one untimed case first: the first one of a process runs slow (allocator, threads)
        case(hq, hkv, d, min(args.lengths), args.budget, max(20, args.reps // 4))
        for length in args.lengths:
            r = case(hq, hkv, d, length, args.budget, args.reps)
            print(f"{name:26s} {length:6d} {r['dense']:8.1f} {r['compressed']:8.1f} "
                  f"{r['kernel, doubled heads']:8.1f} {r['kernel, kept blocks once']:8.1f} "
                  f"{r['rest']:7.1f} {r['copies']:6d}  {r['dense'] / r['compressed']:.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
