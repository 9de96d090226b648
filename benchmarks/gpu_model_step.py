"""Model-level effect of Flux sparse layers and CaliDrop on an H200: a Llama-3.1-8B-shaped
decoder (32 layers, hidden 4096, 32 q / 8 KV heads of 128, MLP 14336, random bf16 weights) with
attention through our kernels (`ops.paged_attention`) against the same model with dense torch SDPA.

Decode: one step for B sequences at context L, CUDA-graph captured (weights, KV and metadata are
static), per attention variant: SDPA dense (contiguous KV), ours dense, ours with 90 % / 100 %
of layers sparse (sink 128 + window 2048), ours compressed (budget 2048: kept slots, freed gap,
the live tail) with calibration. Prefill: one prompt of L tokens, eager, SDPA causal vs ours
dense vs ours all-sparse. All layers share one paged KV cache (same bytes read per layer as 32
separate caches; it does not fit in L2 either way). RoPE and norms are left out (a few µs).

    python3 benchmarks/gpu_model_step.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import cuda_ms  # benchmarks/timing.py (the script's own folder)

from attention_backends.kernels import ops

LAYERS, HID, HQ, HKV, D, MLP = 32, 4096, 32, 8, 128, 14336
BS = 16
SINK, WINDOW, BUDGET = 128, 2048, 2048


class Model:
    def __init__(self, dev: str) -> None:
        g = torch.Generator(device=dev).manual_seed(0)

        def w(*shape):
            return (torch.randn(*shape, device=dev, generator=g) * 0.02).to(torch.bfloat16)

        self.layers = [dict(qkv=w(HID, (HQ + 2 * HKV) * D), o=w(HQ * D, HID),
                            gu=w(HID, 2 * MLP), down=w(MLP, HID)) for _ in range(LAYERS)]

    def mlp(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        gate, up = (x @ p["gu"]).chunk(2, -1)
        return (F.silu(gate) * up) @ p["down"]

    def split(self, x: torch.Tensor, p: dict):
        qkv = x @ p["qkv"]
        q, k, v = qkv.split([HQ * D, HKV * D, HKV * D], -1)
        return q.view(-1, HQ, D), k.view(-1, HKV, D), v.view(-1, HKV, D)


def sdpa(q, k, v, causal: bool) -> torch.Tensor:
    """Dense torch SDPA on its fast kernels only (never the math fallback)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                      SDPBackend.EFFICIENT_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def graphed(fn):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def decode(model: Model, batch: int, ctx: int) -> dict:
    dev = "cuda"
    scale = D ** -0.5
    blocks = ctx // BS + 1
    kv = torch.randn(batch * blocks, HKV, BS, 2 * D, device=dev, dtype=torch.bfloat16)
    bt = torch.randperm(batch * blocks, device=dev).view(batch, blocks).to(torch.int32)
    seq = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    k_dense = torch.randn(batch, HKV, ctx, D, device=dev, dtype=torch.bfloat16)
    v_dense = torch.randn_like(k_dense)
    x0 = torch.randn(batch, HID, device=dev, dtype=torch.bfloat16)
    sink = torch.full((batch,), SINK, dtype=torch.int32, device=dev)
    win = torch.full((batch,), WINDOW, dtype=torch.int32, device=dev)
    kept = torch.full((batch,), BUDGET, dtype=torch.int32, device=dev)
    gap = torch.full((batch,), ctx - 1, dtype=torch.int32, device=dev)
    calib = ops.Calibration(
        q_ref=torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16),
        o_e=torch.randn(batch, HQ, D, device=dev), lse_e=torch.randn(batch, HQ, device=dev),
        enabled=torch.ones(batch, dtype=torch.bool, device=dev),
        tau=torch.full((batch,), 0.5, device=dev))  # a tensor, as serving passes it
    out = torch.empty(batch, HQ, D, device=dev, dtype=torch.bfloat16)

    def ours(sparse_layers: set[int], compressed: bool):
        def attn(i, q):
            kw = {"max_query_len": 1, "max_seq_len": ctx}
            if i in sparse_layers:
                kw.update(sink=sink, window=win, max_kv_tokens=SINK + WINDOW + 1)
            if compressed:
                kw.update(kept_end=kept, gap_end=gap, calibration=calib,
                          max_kv_tokens=min(kw.get("max_kv_tokens", ctx), BUDGET + 1))
            ops.paged_attention(q, kv, bt, seq, qsl, scale, out=out, **kw)
            return out
        return attn

    def dense_sdpa(i, q):
        return sdpa(q.view(batch, HQ, 1, D), k_dense, v_dense, False).view(batch, HQ, D)

    def step(attn):
        def run():
            x = x0
            for i, p in enumerate(model.layers):
                q, _, _ = model.split(x, p)
                x = x + attn(i, q).reshape(batch, HQ * D) @ p["o"]
                x = x + model.mlp(x, p)
            return x
        return run

    ninety = set(range(LAYERS)) - {0, 1, 2}  # 29 of 32 layers sparse (~90 %)
    variants = {
        "sdpa_dense": dense_sdpa,
        "ours_dense": ours(set(), False),
        "ours_sparse_90pct": ours(ninety, False),
        "ours_sparse_all": ours(set(range(LAYERS)), False),
        "ours_calidrop_2048": ours(set(), True),
    }
    res = {"batch": batch, "ctx": ctx}
    for name, attn in variants.items():
        res[f"{name}_ms"] = cuda_ms(graphed(step(attn)))
    res["mlp_and_proj_only_ms"] = cuda_ms(graphed(step(lambda i, q: q)))
    return res


def prefill(model: Model, length: int, reps: int) -> dict:
    dev = "cuda"
    scale = D ** -0.5
    blocks = length // BS
    kv = torch.empty(blocks, HKV, BS, 2 * D, device=dev, dtype=torch.bfloat16)
    bt = torch.arange(blocks, device=dev, dtype=torch.int32)[None]
    seq = torch.tensor([length], dtype=torch.int32, device=dev)
    qsl = torch.tensor([0, length], dtype=torch.int32, device=dev)
    x0 = torch.randn(length, HID, device=dev, dtype=torch.bfloat16) * 0.1
    out = torch.empty(length, HQ, D, device=dev, dtype=torch.bfloat16)
    s1, w1 = (torch.tensor([v], dtype=torch.int32, device=dev) for v in (SINK, WINDOW))

    def run(kind: str):
        def go():
            x = x0
            for p in model.layers:
                q, k, v = model.split(x, p)
                if kind == "sdpa":
                    o = sdpa(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                             v.transpose(0, 1)[None], True)[0].transpose(0, 1)
                else:
                    view = kv.view(blocks, HKV, BS, 2 * D)
                    view[..., :D] = k.view(blocks, BS, HKV, D).transpose(1, 2)
                    view[..., D:] = v.view(blocks, BS, HKV, D).transpose(1, 2)
                    # dense: no masks at all, as the backend passes for a full-attention batch
                    sw = (s1, w1) if kind == "sparse" else (None, None)
                    o = ops.paged_attention(q, kv, bt, seq, qsl, scale, sink=sw[0], window=sw[1],
                                            out=out, max_query_len=length,
                                            max_seq_len=length)[0]
                x = x + o.reshape(length, HQ * D) @ p["o"]
                x = x + model.mlp(x, p)
            return x
        return go

    res = {"length": length}
    for kind in ("sdpa", "dense", "sparse"):
        res[f"{kind}_ms"] = cuda_ms(run(kind), reps=reps, warm=1)
    res["mlp_and_proj_only_ms"] = cuda_ms(lambda: [model.mlp(model.split(x0, p)[0].reshape(
        length, -1) @ p["o"], p) for p in model.layers], reps=reps, warm=1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--only", choices=["decode", "prefill"], default=None)
    args = ap.parse_args()
    model = Model("cuda")
    dec, pre = [], []
    for b, L in [] if args.only == "prefill" else [(1, 131072), (8, 32768), (32, 32768)]:
        dec.append(decode(model, b, L))
        print(json.dumps(dec[-1]), flush=True)
    for L, reps in [] if args.only == "decode" else [(32768, 3), (131072, 2)]:
        pre.append(prefill(model, L, reps))
        print(json.dumps(pre[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_model_step.json").write_text(json.dumps({"decode": dec, "prefill": pre},
                                                             indent=2))
    print("decode step, 32 layers, CUDA graph (ms): B | L | SDPA dense | ours dense | "
          "90% sparse | all sparse | calidrop 2048 | non-attention part")
    for r in dec:
        print(f"  {r['batch']:>3} | {r['ctx']:>6} | {r['sdpa_dense_ms']:.2f} | "
              f"{r['ours_dense_ms']:.2f} | {r['ours_sparse_90pct_ms']:.2f} | "
              f"{r['ours_sparse_all_ms']:.2f} | {r['ours_calidrop_2048_ms']:.2f} | "
              f"{r['mlp_and_proj_only_ms']:.2f}")
    print("prefill, one prompt, 32 layers, eager (ms): L | SDPA causal | ours dense | "
          "ours all sparse | non-attention part")
    for r in pre:
        print(f"  {r['length']:>6} | {r['sdpa_ms']:.0f} | {r['dense_ms']:.0f} | "
              f"{r['sparse_ms']:.0f} | {r['mlp_and_proj_only_ms']:.0f}")


if __name__ == "__main__":
    main()
