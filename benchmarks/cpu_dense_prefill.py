"""CPU: one layer's dense prefill of a whole prompt through torch SDPA against the float32
reference, side by side in one run (the smoke-test model's heads: 4 q / 2 KV of 64, bf16,
block size 128). Prints the ratio; CPU absolute times are not figures to quote.

    python3 benchmarks/cpu_dense_prefill.py [--tokens 2668]
"""

from __future__ import annotations

import argparse
import time

import torch

from attention_backends.kernels import reference as ref
from attention_backends.kernels.sdpa_prefill import dense_prefill_sdpa


def _seconds(fn, reps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2668)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    n, hq, hkv, d, bs = args.tokens, 4, 2, 64, 128
    blocks = n // bs + 1
    kv = torch.randn(blocks, hkv, bs, 2 * d).bfloat16()
    table = torch.arange(blocks, dtype=torch.int32)[None]
    q = torch.randn(n, hq, d).bfloat16()
    lens = torch.tensor([n], dtype=torch.int32)
    qsl = torch.tensor([0, n], dtype=torch.int32)
    out = torch.empty_like(q)
    t_ref = _seconds(lambda: ref.paged_attention_ref(q, kv, table, lens, qsl, 0.125), args.reps)
    t_sdpa = _seconds(lambda: dense_prefill_sdpa(q, kv, table, lens, qsl, 0.125, out, 1,
                                                 whole_batch=True), args.reps)
    print(f"{n} tokens: SDPA path is {t_ref / t_sdpa:.1f}x faster than the float32 reference")


if __name__ == "__main__":
    main()
