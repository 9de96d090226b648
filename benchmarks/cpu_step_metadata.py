"""Host time of the per-step metadata (`build_step_metadata`: routing and eviction parts), which
runs on the CPU once per model step whatever the device: decode steps of B requests mixing
sparse, calidrop and plain rows (30K-token prompts, one token each per step), 32 layers.

Two cases, each timed over ``--steps`` steps after 20 warm-up steps:

- ``one batch``: the same requests in the same order, each step one token further (the rows'
  ``num_computed`` advance, as in serving); the steps of a decode run between two batch changes;
- ``new order``: the same requests rotated by one row every step, so no step can reuse the one
  before (what a step costs when the batch changes).

    python3 benchmarks/cpu_step_metadata.py [--batch 32] [--steps 500]
"""

from __future__ import annotations

import argparse
import time

import torch

from attention_backends.flux.request_state import BatchRow, FluxRegistry
from attention_backends.vllm_glue.metadata import build_step_metadata

PROMPT = 30000
LAYERS = 32
BLOCK = 16
WARMUP = 20


def extra_args(i: int) -> dict | None:
    """Request ``i``'s ``extra_args``: sparse, calidrop and plain in turn."""
    calidrop = {"name": "calidrop", "budget": 2048, "window": 32, "pool_kernel": 7, "tau": 0.9}
    return ({"flux": {"mode": "sparse", "sink": 128, "window": 2048}} if i % 3 == 0
            else {"kv_policy": calidrop} if i % 3 == 1 else None)


def time_steps(batch: int, steps: int, rotate: bool) -> float:
    """Mean µs per ``build_step_metadata`` call over ``steps`` decode steps (rows built
    beforehand, outside the timing)."""
    reg = FluxRegistry()
    extra = [extra_args(i) for i in range(batch)]
    qsl = torch.arange(batch + 1, dtype=torch.int32)
    plan = []
    for t in range(WARMUP + steps):
        order = [(i + t) % batch for i in range(batch)] if rotate else range(batch)
        plan.append([BatchRow(f"r{i}", PROMPT, PROMPT + 100 + t, extra[i]) for i in order])
    for rows in plan[:WARMUP]:
        build_step_metadata(batch, qsl, rows, reg, LAYERS, BLOCK)
    t0 = time.perf_counter()
    for rows in plan[WARMUP:]:
        build_step_metadata(batch, qsl, rows, reg, LAYERS, BLOCK)
    return (time.perf_counter() - t0) / steps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=500)
    args = ap.parse_args()
    for name, rotate in (("one batch", False), ("new order", True)):
        us = time_steps(args.batch, args.steps, rotate)
        print(f"build_step_metadata, {name}: {us:.1f} us per step, B={args.batch}")


if __name__ == "__main__":
    main()
