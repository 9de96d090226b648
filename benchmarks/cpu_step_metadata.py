"""Host time of the per-step routing metadata (`build_flux_batch`), which runs on the CPU once
per model step whatever the device: a decode step of B requests mixing sparse, calidrop and
plain rows, 32 layers.

    python3 benchmarks/cpu_step_metadata.py [--batch 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from attention_backends.metadata import build_flux_batch
from attention_backends.request_state import BatchRow, FluxRegistry


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=500)
    args = ap.parse_args()
    b = args.batch
    calidrop = {"name": "calidrop", "budget": 2048, "window": 32, "pool_kernel": 7, "tau": 0.9,
                "sink": 4}
    extra = {f"r{i}": ({"flux": {"mode": "sparse", "sink": 128, "window": 2048}} if i % 3 == 0
                       else {"kv_policy": calidrop} if i % 3 == 1 else None) for i in range(b)}
    reg = FluxRegistry()
    reg.set_batch([BatchRow(f"r{i}", 30000, 30100) for i in range(b)])
    qsl = torch.arange(b + 1, dtype=torch.int32)
    for _ in range(20):
        build_flux_batch(b, qsl, reg, 32, extra.get, 16)
    t = time.perf_counter()
    for _ in range(args.steps):
        build_flux_batch(b, qsl, reg, 32, extra.get, 16)
    print(f"build_flux_batch: {(time.perf_counter() - t) / args.steps * 1e6:.0f} us per step, "
          f"B={b}")


if __name__ == "__main__":
    main()
