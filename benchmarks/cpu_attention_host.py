"""Host time of one layer's attention call on a decode step of the GPU path
(`vllm_glue.attention.attend` -> `ops.paged_attention` -> `paged_attention_triton`), the Triton
launch itself left out.

B requests decode one token each over 30K-token prompts, mixing sparse (sink 128 + window
2048), calidrop (budget 2048, compressed, calibrated at every layer) and plain rows, with
Llama-3.1-8B heads (32 query heads, 8 KV heads, head size 128, bf16, blocks of 16). The step
metadata is built once (a decode step of one batch reuses it, see
`benchmarks/cpu_step_metadata.py`); each layer's call is then timed over 32 layers.

The wrapper runs on CPU tensors with `FLUXSERVE_FORCE_TRITON=1`, so every line of Python
between `attend` and the kernel launch runs, with the two decode kernels (`_decode_kernel`,
`_decode_reduce_kernel`) replaced by no-ops: the launch (Triton's argument binding, a few tens
of µs in eager mode) is not counted, nor is the device work of the small torch ops on the way,
which on the GPU each cost a kernel launch (see docs/benchmarks.md). No KV is read, so the
cache holds a few blocks only.

    python3 benchmarks/cpu_attention_host.py [--batch 32] [--steps 50] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time
from types import SimpleNamespace

os.environ["FLUXSERVE_FORCE_TRITON"] = "1"  # before the ops module reads it (it reads per call)

import torch  # noqa: E402

from attention_backends.flux.request_state import BatchRow, FluxRegistry  # noqa: E402
from attention_backends.kernels import paged_attention as pa  # noqa: E402
from attention_backends.vllm_glue.attention import attend  # noqa: E402
from attention_backends.vllm_glue.metadata import build_step_metadata  # noqa: E402
from kv_policies.eviction.policies.calidrop import LayerCalibration  # noqa: E402
from kv_policies.eviction.runtime import RequestKVState, get_runtime  # noqa: E402

LAYERS, HQ, HKV, D, BLOCK = 32, 32, 8, 128, 16
PROMPT = 30000
CALIDROP = {"name": "calidrop", "budget": 2048, "window": 32, "pool_kernel": 7, "tau": 0.9}


class NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **meta)`` does nothing."""

    def __getitem__(self, grid):
        return self._launch

    @staticmethod
    def _launch(*args, **kwargs) -> None:
        return None


def extra_args(i: int) -> dict | None:
    return ({"flux": {"mode": "sparse", "sink": 128, "window": 2048}} if i % 3 == 0
            else {"kv_policy": CALIDROP} if i % 3 == 1 else None)


def setup(batch: int):
    """The decode step's inputs: (layers, q, kv_cache, md, scale, out)."""
    reg, rt = FluxRegistry(), get_runtime()
    computed = PROMPT + 100
    rows = [BatchRow(f"r{i}", PROMPT, computed, extra_args(i)) for i in range(batch)]
    gen = torch.Generator().manual_seed(0)
    # The calibration summaries that compress_layer leaves for each (calidrop request, layer)
    # when its prompt completes (computing them for real means 30K-token prompts' KV).
    for r in rows:
        if r.extra_args and "kv_policy" in r.extra_args:
            plan = rt.plan_for(r.req_id, CALIDROP, PROMPT, BLOCK)
            state = RequestKVState(plan=plan, policy="calidrop")
            for li in range(LAYERS):
                state.layers[li] = LayerCalibration(
                    q_ref=torch.randn(HQ, D, generator=gen).to(torch.bfloat16),
                    o_e=torch.randn(HQ, D, generator=gen), lse_e=torch.randn(HQ, generator=gen),
                    tau=CALIDROP["tau"])
                state.compressed_layers.add(li)
            rt._states[r.req_id] = state
    qsl = torch.arange(batch + 1, dtype=torch.int32)
    step = build_step_metadata(batch, qsl, rows, reg, LAYERS, BLOCK, rt, none_when_dense=True)
    seq = computed + 1
    seq_lens = torch.full((batch,), seq, dtype=torch.int32)
    md = SimpleNamespace(
        num_actual_tokens=batch, max_query_len=1, max_seq_len=seq, query_start_loc=qsl,
        seq_lens=seq_lens, block_table=torch.zeros(batch, -(-seq // BLOCK), dtype=torch.int32),
        slot_mapping=torch.zeros(batch, dtype=torch.int64), step=step,
        query_start_loc_cpu=qsl.tolist(), seq_lens_cpu=seq_lens.tolist())
    layers = [SimpleNamespace(layer_name=f"model.layers.{i}.self_attn.attn", _flux_layer_idx=i)
              for i in range(LAYERS)]
    q = torch.randn(batch, HQ, D, generator=gen).to(torch.bfloat16)
    kv_cache = torch.zeros(4, HKV, BLOCK, 2 * D, dtype=torch.bfloat16)
    return layers, q, kv_cache, md, D ** -0.5, torch.empty_like(q)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the calls")
    args = ap.parse_args()
    pa._decode_kernel = pa._decode_reduce_kernel = NoLaunch()
    layers, q, kv_cache, md, scale, out = setup(args.batch)

    def run(steps: int) -> None:
        for _ in range(steps):
            for layer in layers:
                attend(layer, q, kv_cache, md, scale, out)

    run(2)
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        run(args.steps)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    t0 = time.perf_counter()
    run(args.steps)
    us = (time.perf_counter() - t0) / (args.steps * LAYERS) * 1e6
    print(f"attend (decode, launch stubbed): {us:.1f} us per layer, {us * LAYERS / 1e3:.2f} ms "
          f"per step of {LAYERS} layers, B={args.batch}")


if __name__ == "__main__":
    main()
