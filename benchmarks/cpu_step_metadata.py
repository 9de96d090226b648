"""Host time of the per-step metadata (`build_step_metadata`: routing and eviction parts), which
runs on the CPU once per model step whatever the device: a decode step of B requests mixing
sparse, calidrop and plain rows, 32 layers.

    python3 benchmarks/cpu_step_metadata.py [--batch 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from attention_backends.flux.request_state import BatchRow, FluxRegistry
from attention_backends.vllm_glue.metadata import build_step_metadata


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=500)
    args = ap.parse_args()
    b = args.batch
    calidrop = {"name": "calidrop", "budget": 2048, "window": 32, "pool_kernel": 7, "tau": 0.9}
    extra = {f"r{i}": ({"flux": {"mode": "sparse", "sink": 128, "window": 2048}} if i % 3 == 0
                       else {"kv_policy": calidrop} if i % 3 == 1 else None) for i in range(b)}
    reg = FluxRegistry()
    rows = [BatchRow(f"r{i}", 30000, 30100, extra[f"r{i}"]) for i in range(b)]
    qsl = torch.arange(b + 1, dtype=torch.int32)
    for _ in range(20):
        build_step_metadata(b, qsl, rows, reg, 32, 16)
    t = time.perf_counter()
    for _ in range(args.steps):
        build_step_metadata(b, qsl, rows, reg, 32, 16)
    print(f"build_step_metadata: {(time.perf_counter() - t) / args.steps * 1e6:.0f} us per step, "
          f"B={b}")


if __name__ == "__main__":
    main()
