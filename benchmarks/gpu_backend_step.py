"""The backends' shared attention step (`vllm_glue.attention.run_attention`) on the GPU, no vLLM.

What vLLM's model runner would drive per layer, driven here directly: the per-step routing
metadata (`FluxBatch`, built from the request registry and each request's `extra_args`), KV
writes, one `ops.paged_attention` call for a mixed batch (full, sparse, compressed rows), the
CaliDrop compression after the step that completes each prompt, then decode steps with gap
masking and calibration. On CUDA tensors every op is a Triton kernel.

1. Check: the same two steps (prefill, then decode) run on the GPU (Triton, bf16) and on the CPU
   (float32 PyTorch references, from the same bf16 inputs); outputs, compacted KV and
   calibration hits are compared.
2. Time (GPU only): one layer's decode step for B requests at context L, through
   `run_attention` (host metadata + kernel) and through the bare kernel, against dense SDPA.

    python3 benchmarks/gpu_backend_step.py [--small] [--out DIR]

`--small` runs the check at CPU-friendly sizes (Triton interpreter not needed: on CPU both
sides use the references, so it only checks the harness); the GPU run uses Llama-3.1-8B heads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import torch
from timing import cuda_ms  # benchmarks/timing.py (the script's own folder)

from attention_backends.flux.request_state import BatchRow, FluxRegistry
from attention_backends.kernels import ops
from attention_backends.vllm_glue.attention import run_attention, write_kv
from attention_backends.vllm_glue.metadata import build_step_metadata
from kv_policies.eviction.runtime import get_runtime

HQ, HKV, D = 32, 8, 128


def _metadata(step, qsl, seq_lens, block_table, num_tokens: int, max_query_len: int,
              max_seq_len: int) -> SimpleNamespace:
    """What a backend's metadata gives ``run_attention``."""
    return SimpleNamespace(step=step, query_start_loc=qsl, seq_lens=seq_lens,
                           block_table=block_table, num_actual_tokens=num_tokens,
                           max_query_len=max_query_len, max_seq_len=max_seq_len)
LAYER = SimpleNamespace(layer_name="model.layers.1.self_attn.attn", _flux_layer_idx=1)
NUM_LAYERS = 2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class Batch:
    """Requests with paged KV in one cache; the same instance is replayed on two devices."""

    def __init__(self, specs: dict[str, dict | None], prompt_len: int, block_size: int,
                 hq: int, hkv: int, d: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = list(specs)
        self.extra = specs
        self.p, self.bs, self.hq, self.hkv, self.d = prompt_len, block_size, hq, hkv, d
        n = len(self.ids)
        blocks_per = (prompt_len + 8) // block_size + 1
        perm = torch.randperm(n * blocks_per + 4, generator=g)[: n * blocks_per]
        self.block_table = perm.view(n, blocks_per).to(torch.int32)
        self.num_blocks = n * blocks_per + 4
        self.prefill = [(torch.randn(prompt_len, h, d, generator=g) for h in (hq, hkv, hkv))
                        for _ in self.ids]
        self.prefill = [tuple(t.to(torch.bfloat16) for t in trio) for trio in self.prefill]
        self.decode = [tuple(torch.randn(1, h, d, generator=g).to(torch.bfloat16)
                             for h in (hq, hkv, hkv)) for _ in self.ids]

    def slots(self, row: int, start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        return self.block_table[row, pos // self.bs].long() * self.bs + pos % self.bs

    def _poison_freed_blocks(self, fb, bt: torch.Tensor, kv: torch.Tensor) -> None:
        """What vLLM does with freed blocks (hands them to other requests): garbage them, so a
        read of the gap would show up as NaN in the decode output."""
        for row, plan in enumerate(fb.eviction.plans):
            if plan is not None:
                blocks = bt[row, list(plan.freed_blocks)].long()
                kv[blocks] = float("nan")

    def run(self, device: str, tag: str) -> dict:
        reg = FluxRegistry()
        ids = [f"{tag}-{r}" for r in self.ids]
        extra = {f"{tag}-{r}": e for r, e in self.extra.items()}
        kv = torch.full((self.num_blocks, self.hkv, self.bs, 2 * self.d), float("nan"),
                        dtype=torch.bfloat16, device=device)
        bt = self.block_table.to(device)
        scale = self.d ** -0.5
        res = {}
        for step, (num_computed, q_len, data) in enumerate(
                [(0, self.p, self.prefill), (self.p, 1, self.decode)]):
            rows = [BatchRow(i, self.p, num_computed, extra.get(i)) for i in ids]
            qsl = torch.arange(len(ids) + 1, dtype=torch.int32) * q_len
            fb = build_step_metadata(len(ids), qsl, rows, reg, NUM_LAYERS, self.bs)
            q = torch.cat([t[0] for t in data]).to(device)
            k = torch.cat([t[1] for t in data]).to(device)
            v = torch.cat([t[2] for t in data]).to(device)
            slots = torch.cat([self.slots(i, num_computed, num_computed + q_len)
                               for i in range(len(ids))]).to(device)
            write_kv(k, v, kv, slots)
            seq_lens = torch.full((len(ids),), num_computed + q_len, dtype=torch.int32,
                                  device=device)
            out = torch.full_like(q, float("nan"))
            run_attention(LAYER, q, kv, _metadata(fb, qsl.to(device), seq_lens, bt, q.shape[0],
                                                  q_len, num_computed + q_len), scale, out)
            res[f"out{step}"] = out.float().cpu()
            if step == 0:
                self._poison_freed_blocks(fb, bt, kv)
        rt = get_runtime()
        res["kv"] = kv.float().cpu()
        res["compressed"] = [rt.is_compressed(i, 1) for i in ids]
        for i in ids:
            rt.release(i)
        return res


def check(prompt_len: int, block_size: int, hq: int, hkv: int, d: int, sink: int, window: int,
          budget: int, seed: int) -> dict:
    specs = {
        "full": None,
        "sparse": {"flux": {"mode": "sparse", "sink": sink, "window": window}},
        "calidrop": {"kv_policy": {"name": "calidrop", "budget": budget, "window": 32,
                                   "pool_kernel": 7, "tau": -1.0}},
        "sparse+snapkv": {"flux": {"mode": "sparse", "sink": sink, "window": window},
                          "kv_policy": {"name": "snapkv", "budget": budget, "window": 32,
                                        "pool_kernel": 7}},
    }
    batch = Batch(specs, prompt_len, block_size, hq, hkv, d, seed)
    gpu = batch.run("cuda" if torch.cuda.is_available() else "cpu", "dev")
    ref = batch.run("cpu", "ref")
    names = list(specs)
    report = {"prompt_len": prompt_len, "rows": {}}
    for i, name in enumerate(names):
        rows = slice(i * prompt_len, (i + 1) * prompt_len)
        row = {
            "prefill_rel_err": rel_err(gpu["out0"][rows], ref["out0"][rows]),
            "decode_rel_err": rel_err(gpu["out1"][i], ref["out1"][i]),
            "compressed": gpu["compressed"][i],
            "nan_free": bool(torch.isfinite(gpu["out0"][rows]).all()
                             and torch.isfinite(gpu["out1"][i]).all()),
        }
        if gpu["compressed"][i]:
            # kept KV per head, compacted into slots [0, budget): same tokens on both sides?
            s = batch.slots(i, 0, budget)
            blk, off = s // block_size, s % block_size
            kept_dev = gpu["kv"][blk, :, off, :d]
            kept_ref = ref["kv"][blk, :, off, :d]
            same = (kept_dev - kept_ref).abs().amax(-1) == 0
            row["kept_slots_identical"] = float(same.float().mean())
        report["rows"][name] = row
    return report


def time_decode(batch: int, ctx: int, block_size: int, reps: int = 50) -> dict:
    """One layer's decode step at batch x ctx through run_attention vs the bare kernel vs SDPA."""
    dev = "cuda"
    blocks_per = ctx // block_size + 1
    nb = batch * blocks_per
    kv = torch.randn(nb, HKV, block_size, 2 * D, device=dev, dtype=torch.bfloat16)
    bt = torch.randperm(nb, device=dev).view(batch, blocks_per).to(torch.int32)
    q = torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    qsl = torch.arange(batch + 1, dtype=torch.int32)
    out = torch.empty_like(q)
    scale = D ** -0.5

    def event_ms(fn) -> float:
        return cuda_ms(fn, reps=reps, warm=5)

    res = {}
    for mode, extra in [("full", None),
                        ("sparse", {"flux": {"mode": "sparse", "sink": 128, "window": 2048}})]:
        reg = FluxRegistry()
        rows = [BatchRow(f"t{i}", ctx - 1, ctx - 1, extra) for i in range(batch)]
        qsl_dev = qsl.to(dev)

        fb = build_step_metadata(batch, qsl, rows, reg, NUM_LAYERS, block_size)
        md = _metadata(fb, qsl_dev, seq_lens, bt, batch, 1, ctx)

        def step(md=md):
            run_attention(LAYER, q, kv, md, scale, out)

        def metadata(reg=reg, rows=rows):
            build_step_metadata(batch, qsl, rows, reg, NUM_LAYERS, block_size)

        # run_attention: once per layer; build_step_metadata: once per step (all layers share it)
        res[f"{mode}_run_attention_us"] = 1e3 * event_ms(step)
        res[f"{mode}_metadata_per_step_us"] = 1e3 * event_ms(metadata)
        sink = window = None
        if mode == "sparse":
            sink = torch.full((batch,), 128, dtype=torch.int32, device=dev)
            window = torch.full((batch,), 2048, dtype=torch.int32, device=dev)

        def kernel(s=sink, w=window, qd=qsl_dev, m=fb.max_kv_tokens[1]):
            ops.paged_attention(q, kv, bt, seq_lens, qd, scale, sink=s, window=w, out=out,
                                max_query_len=1, max_seq_len=ctx, max_kv_tokens=m)

        res[f"{mode}_kernel_us"] = 1e3 * event_ms(kernel)
    kd = torch.randn(batch, HKV, ctx, D, device=dev, dtype=torch.bfloat16)
    vd = torch.randn_like(kd)
    qd = q.view(batch, HQ, 1, D)
    res["sdpa_dense_us"] = 1e3 * event_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
        qd, kd, vd, enable_gqa=True))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.small or not torch.cuda.is_available():
        checks = [check(300, 16, 8, 2, 64, 8, 64, 96, seed=0)]
        timings = []
    else:
        checks = [check(p, 16, HQ, HKV, D, 128, 2048, 2048, seed=p) for p in (4096, 16384)]
        timings = [{"batch": b, "ctx": L, **time_decode(b, L, 16)}
                   for b, L in [(1, 32768), (8, 32768), (32, 32768)]]
    result = {"checks": checks, "timings": timings}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_backend_step.json").write_text(json.dumps(result, indent=2))
    print("check: prompt | row | prefill err | decode err | compressed | kept identical | finite")
    for c in checks:
        for name, r in c["rows"].items():
            print(f"  {c['prompt_len']:>6} | {name:<14} | {r['prefill_rel_err']:.2e} | "
                  f"{r['decode_rel_err']:.2e} | {r['compressed']!s:<5} | "
                  f"{r.get('kept_slots_identical', float('nan')):.4f} | {r['nan_free']}")
    if timings:
        print("decode, one layer (us): B | L | full: run_attention / kernel | "
              "sparse: run_attention / kernel | SDPA dense | metadata per step (full / sparse)")
        for t in timings:
            print(f"  {t['batch']:>3} | {t['ctx']} | {t['full_run_attention_us']:.1f} / "
                  f"{t['full_kernel_us']:.1f} | {t['sparse_run_attention_us']:.1f} / "
                  f"{t['sparse_kernel_us']:.1f} | {t['sdpa_dense_us']:.1f} | "
                  f"{t['full_metadata_per_step_us']:.0f} / {t['sparse_metadata_per_step_us']:.0f}")


if __name__ == "__main__":
    main()
