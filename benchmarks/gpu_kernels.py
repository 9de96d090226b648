#!/usr/bin/env python3
"""Check every attention kernel against its float32 reference at Llama-3.1-8B head shapes
(32 q heads, 8 KV heads, head_dim 128, bf16), then time it against torch SDPA and the floors.

GPU (H200)::

    PYTHONUNBUFFERED=1 python benchmarks/gpu_kernels.py --out "$OUT"

CPU smoke run of the script logic (tiny shapes, Triton interpreter)::

    TRITON_INTERPRET=1 FLUXSERVE_FORCE_TRITON=1 python benchmarks/gpu_kernels.py --smoke

Floors: bytes / 4.28 TB/s (measured device copy bandwidth) and FLOPs / 707 TFLOP/s (measured bf16
GEMM), whichever is larger. Timings: ``triton.testing.do_bench`` median (L2 flushed before every
run, eager launches; it zeroes a buffer) and, for decode, a CUDA-graph replay median with the L2
emptied by ``timing.flush_l2`` (a read, since v11).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from kernel_cases import contiguous_kv, paged_kv_cache, prefill_flops, rel_err
from timing import cuda_graph_us

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from attention_backends.kernels import ops  # noqa: E402
from attention_backends.kernels import reference as ref  # noqa: E402

HQ, HKV, D = 32, 8, 128
DT = torch.bfloat16
BW = 4.28e12
PEAK = 707e12
SCALE = 1 / math.sqrt(D)
KV_TOKEN_BYTES = HKV * 2 * D * 2  # one layer, one token: 4 KiB

# measured earlier on the same kind of machine (benchmarks/results/baselines), microseconds
BASE = {
    "sdpa_decode": {(1, 8192): 22.7, (1, 32768): 50.3, (1, 131072): 139.4, (8, 8192): 80.4,
                    (8, 32768): 257.2, (8, 131072): 962.5, (32, 8192): 252.1,
                    (32, 32768): 959.0},
    "sdpa_prefill": {8192: 899.5, 32768: 14610.4, 131072: 258994.0},
    "flex_sw_prefill": {8192: 694.5, 32768: 2956.4, 131072: 12148.9},
    "flex_sw_decode": {(8, 32768): 225.6, (8, 131072): 156.4, (32, 32768): 116.6},
}


class Setup:
    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.dev = torch.device("cpu" if smoke else "cuda")
        if smoke:
            self.sink, self.window, self.budget, self.obs = 4, 32, 32, 8
            self.decode_cases = [(1, 160), (3, 96)]
            self.prefill_lens = [200]
            self.snap_lens = [150]
        else:
            self.sink, self.window, self.budget, self.obs = 128, 2048, 2048, 32
            self.decode_cases = [(1, 8192), (1, 32768), (1, 131072), (8, 8192), (8, 32768),
                                 (8, 131072), (32, 8192), (32, 32768)]
            self.prefill_lens = [8192, 32768, 131072]
            self.snap_lens = [32768, 131072]
        self.flush = None if smoke else torch.empty(256 << 20, dtype=torch.int8, device="cuda")


S: Setup
RESULTS: list[dict] = []
LOG = []


def log(msg: str) -> None:
    print(msg, flush=True)
    LOG.append(msg)


# ----------------------------------------------------------------------------- timing


def bench_eager(fn, rep_ms: int = 100) -> float:
    """Median microseconds (triton.testing.do_bench: L2 flushed before each run)."""
    if S.smoke:
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median") * 1e3


def bench_graph(fn, reps: int = 50) -> float:
    """Median microseconds of a CUDA-graph replay of fn, L2 flushed before each replay."""
    if S.smoke:
        return float("nan")
    return cuda_graph_us(fn, S.flush, reps)


def floor_us(nbytes: float, flops: float) -> float:
    return max(nbytes / BW, flops / PEAK) * 1e6


def record(**kw):
    RESULTS.append(kw)
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items()]
    log("  ".join(parts))


# ----------------------------------------------------------------------------- data


def build_cache(batch: int, length: int, bs: int, seed: int):
    """Random paged KV (kernel_cases.paged_kv_cache) at this script's head shapes."""
    return paged_kv_cache(batch, length, bs, seed, HKV, D, S.dev, DT)


def sdpa(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                SDPBackend.EFFICIENT_ATTENTION]
    if S.smoke:
        backends = [SDPBackend.MATH]
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=SCALE,
                                              enable_gqa=True)


def i32(vals):
    return torch.tensor(vals, dtype=torch.int32, device=S.dev)


# ----------------------------------------------------------------------------- decode


def decode_masks(mode, batch, length):
    """(mask kwargs, KV tokens each sequence reads)."""
    if mode == "dense":
        return {}, length
    if mode == "sparse":
        return ({"sink": i32([S.sink] * batch), "window": i32([S.window] * batch)},
                min(length, S.sink + S.window))
    # compressed: prompt of length-1 compacted into [0, budget), gap [budget, length-1),
    # this step's token at slot length-1
    return ({"kept_end": i32([S.budget] * batch), "gap_end": i32([length - 1] * batch)},
            S.budget + 1)


def poison_gap(kv, bt, bs, batch, length, null):
    """Compressed layout: freed blocks -> the NaN block; stale slots of partial blocks -> NaN."""
    bt = bt.clone()
    first_freed = -(-S.budget // bs)
    last_freed = (length - 1) // bs
    bt[:, first_freed:last_freed] = null
    blk = (length - 1) // bs
    off_hi = (length - 1) % bs
    if blk >= first_freed and off_hi > 0:
        lo = max(0, S.budget - blk * bs)
        for s in range(batch):
            kv[int(bt[s, blk]), :, lo:off_hi] = float("nan")
    return bt


def make_calibration(q, batch, g):
    q_ref = q.clone()  # every decode query is its own reference: every head hits
    return ops.Calibration(
        q_ref=q_ref,
        o_e=torch.randn(batch, HQ, D, device=S.dev, generator=g),
        lse_e=torch.randn(batch, HQ, device=S.dev, generator=g) + 5.0,
        enabled=torch.ones(batch, dtype=torch.bool, device=S.dev),
        tau=torch.full((batch,), 0.9, device=S.dev),  # a tensor, as serving passes it
    )


def run_decode(mode, batch, length, bs, kv, bt, dcfg, tag="", check=True, sdpa_us=None):
    g = torch.Generator(device=S.dev).manual_seed(batch * 7 + length)
    q = torch.randn(batch, HQ, D, device=S.dev, dtype=DT, generator=g)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=S.dev)
    seq_lens = i32([length] * batch)
    masks, ntok = decode_masks(mode, batch, length)
    calib = make_calibration(q, batch, g) if mode == "compressed" else None
    out = torch.full_like(q, float("nan"))

    def fn():
        return ops.paged_attention(q, kv, bt, seq_lens, qsl, SCALE, calibration=calib, out=out,
                                   max_query_len=1, max_seq_len=length, max_kv_tokens=ntok,
                                   decode_config=dcfg, **masks)

    err = float("nan")
    if check:
        got, hits = fn()
        torch.cuda.synchronize() if not S.smoke else None
        assert not torch.isnan(got).any(), "NaN in output (unwritten row or stale slot read)"
        want, want_hits = ref.paged_attention_ref(q, kv, bt, seq_lens, qsl, SCALE,
                                                  calibration=calib, **masks)
        err = rel_err(got, want)
        assert err < 1e-2, f"rel err {err}"
        if calib is not None:
            assert torch.equal(hits, want_hits) and bool(hits.all())
    t_eager = bench_eager(fn)
    t_graph = bench_graph(fn)
    nbytes = batch * ntok * KV_TOKEN_BYTES + batch * HQ * D * 2 * 2
    flops = 4.0 * batch * HQ * D * ntok
    fl = floor_us(nbytes, flops)
    best = min(t_eager, t_graph) if not math.isnan(t_graph) else t_eager
    rec = dict(kind="decode", mode=mode, B=batch, L=length, bs=bs, tag=tag, err=err,
               us_eager=t_eager, us_graph=t_graph, floor_us=fl, MB=nbytes / 1e6,
               TBps_graph=nbytes / (best * 1e-6) / 1e12,
               pct_floor=100 * fl / best)
    if sdpa_us is not None:
        rec["sdpa_us"] = sdpa_us
        rec["x_vs_sdpa"] = sdpa_us / best
    record(**rec)
    return rec


def sdpa_decode_time(batch, length, kv, bt):
    k, v = contiguous_kv(kv, bt, length)
    q = torch.randn(batch, HQ, 1, D, device=S.dev, dtype=DT)

    def fn():
        return sdpa(q, k, v, False)

    te = bench_eager(fn)
    tg = bench_graph(fn)
    rec = dict(kind="sdpa_decode", B=batch, L=length, us_eager=te, us_graph=tg,
               base_us=BASE["sdpa_decode"].get((batch, length), float("nan")))
    record(**rec)
    return te if math.isnan(tg) else min(te, tg)


# ----------------------------------------------------------------------------- prefill


def run_prefill(mode, length, bs, kv, bt, pcfg, ctx=0, tag="", check=True, sdpa_us=None,
                rep_ms=200):
    g = torch.Generator(device=S.dev).manual_seed(length + ctx)
    q_len = length - ctx
    q = torch.randn(q_len, HQ, D, device=S.dev, dtype=DT, generator=g)
    qsl = i32([0, q_len])
    seq_lens = i32([length])
    masks = {} if mode == "dense" else {"sink": i32([S.sink]), "window": i32([S.window])}
    out = torch.full_like(q, float("nan"))

    def fn():
        return ops.paged_attention(q, kv, bt, seq_lens, qsl, SCALE, out=out,
                                   max_query_len=q_len, max_seq_len=length,
                                   prefill_config=pcfg, **masks)

    err = float("nan")
    if check:
        got, _ = fn()
        assert not torch.isnan(got).any(), "NaN in output"
        errs = []
        n = min(64, q_len)
        for i0 in sorted({0, (q_len // 2) // n * n, q_len - n}):
            sub_q = q[i0:i0 + n]
            want, _ = ref.paged_attention_ref(sub_q, kv, bt, i32([ctx + i0 + n]), i32([0, n]),
                                              SCALE, **masks)
            errs.append(rel_err(got[i0:i0 + n], want))
        err = max(errs)
        assert err < 1e-2, f"rel err {errs}"
    t = bench_eager(fn, rep_ms=rep_ms)
    sink, window = (0, 0) if mode == "dense" else (S.sink, S.window)
    flops = prefill_flops(length, ctx, sink, window, HQ, D)
    nbytes = q_len * HQ * D * 2 * 2 + length * KV_TOKEN_BYTES
    fl = floor_us(nbytes, flops)
    rec = dict(kind="prefill", mode=mode, L=length, ctx=ctx, bs=bs, tag=tag, err=err, us=t,
               floor_us=fl, TFLOPs=flops / (t * 1e-6) / 1e12, pct_floor=100 * fl / t)
    if sdpa_us is not None:
        rec["sdpa_us"] = sdpa_us
        rec["x_vs_sdpa"] = sdpa_us / t
    if mode == "sparse" and length in BASE["flex_sw_prefill"]:
        rec["x_vs_flex"] = BASE["flex_sw_prefill"][length] / t
    record(**rec)
    return rec


def sdpa_prefill_time(length, kv, bt):
    k, v = contiguous_kv(kv, bt, length)
    q = torch.randn(1, HQ, length, D, device=S.dev, dtype=DT)
    t = bench_eager(lambda: sdpa(q, k, v, True), rep_ms=200)
    record(kind="sdpa_prefill", L=length, us=t,
           base_us=BASE["sdpa_prefill"].get(length, float("nan")))
    return t


# ----------------------------------------------------------------------------- snapkv


def run_snapkv(length, bs):
    kv, bt, _ = build_cache(1, length, bs, seed=length + 3)
    row = bt[0]
    g = torch.Generator(device=S.dev).manual_seed(length)
    q_obs = torch.randn(S.obs, HQ, D, device=S.dev, dtype=DT, generator=g)

    scores = ops.snapkv_scores(q_obs, kv, row, length, SCALE, 7)
    want = ref.snapkv_scores_ref(q_obs, kv, row, length, SCALE, 7)
    e1 = rel_err(scores, want)
    assert e1 < 1e-2, e1
    t1 = bench_eager(lambda: ops.snapkv_scores(q_obs, kv, row, length, SCALE, 7))
    kbytes = length * HKV * D * 2
    record(kind="snapkv_scores", L=length, err=e1, us=t1, floor_us=floor_us(kbytes, 0))

    kept = ops.select_kept(scores, S.budget, S.obs)
    t2 = bench_eager(lambda: ops.select_kept(scores, S.budget, S.obs))
    record(kind="select_kept", L=length, us=t2)

    q_ref = q_obs[-1]
    o_e, lse_e = ops.evicted_partial(q_ref, kv, row, kept, length, SCALE)
    r_o, r_lse = ref.evicted_partial_ref(q_ref, kv, row, kept, length, SCALE)
    e3 = max(rel_err(o_e, r_o), float((lse_e - r_lse).abs().max()))
    assert e3 < 1e-2, e3
    t3 = bench_eager(lambda: ops.evicted_partial(q_ref, kv, row, kept, length, SCALE))
    record(kind="evicted_partial", L=length, err=e3, us=t3,
           floor_us=floor_us(length * KV_TOKEN_BYTES, 0))

    mine = kv.clone()
    ops.compact_kv(mine, row, kept)
    theirs = kv.clone()
    ref.compact_kv_ref(theirs, row, kept)
    same = torch.equal(mine.nan_to_num(3.0), theirs.nan_to_num(3.0))
    assert same
    del theirs
    t4 = bench_eager(lambda: ops.compact_kv(mine, row, kept))
    moved = 2 * HKV * S.budget * 2 * D * 2 * 2  # read+write, through a temp
    record(kind="compact_kv", L=length, exact=same, us=t4, floor_us=floor_us(moved, 0))


# ----------------------------------------------------------------------------- sweeps


# one definition of the swept configs: benchmarks/gpu_sweep.py
from gpu_sweep import DECODE_CONFIGS, PREFILL_CONFIGS  # noqa: E402


def guarded(name, fn, *a, **kw):
    try:
        return fn(*a, **kw)
    except Exception as e:  # keep going: one failed case must not lose the whole run
        log(f"FAILED {name}: {type(e).__name__}: {e}")
        LOG.append(traceback.format_exc())
        RESULTS.append({"kind": "failure", "name": name, "error": f"{type(e).__name__}: {e}"})
        return None


def sweep_decode(bs):
    if S.smoke:
        return DECODE_CONFIGS[0]
    cases = [("dense", 8, 32768), ("sparse", 32, 32768), ("sparse", 8, 32768),
             ("dense", 1, 131072)]
    totals = {i: 0.0 for i in range(len(DECODE_CONFIGS))}
    for mode, b, length in cases:
        kv, bt, null = build_cache(b, length, bs, seed=11)
        if mode == "compressed":
            bt = poison_gap(kv, bt, bs, b, length, null)
        times = {}
        for i, cfg in enumerate(DECODE_CONFIGS):
            r = guarded(f"sweep decode {i}", run_decode, mode, b, length, bs, kv, bt, cfg,
                        tag=f"sweep{i}", check=(i == 0))
            times[i] = r["us_graph"] if r else float("inf")
        best = min(times.values())
        for i in times:
            totals[i] += times[i] / best
        del kv, bt
        torch.cuda.empty_cache()
    win = min(totals, key=totals.get)
    log(f"decode sweep bs={bs}: scores {totals} -> config {win}: {DECODE_CONFIGS[win]}")
    # split-count anatomy of SA decode with the chosen config (1 split: no reduce launch)
    for b in (8,):
        kv, bt, _ = build_cache(b, 32768, bs, seed=13)
        for ns in (1, 2, 4, 8, 16):
            guarded("split anatomy", run_decode, "sparse", b, 32768, bs, kv, bt,
                    dict(DECODE_CONFIGS[win], num_splits=ns), tag=f"sweep-splits{ns}",
                    check=False)
        del kv, bt
    return DECODE_CONFIGS[win]


def sweep_prefill(bs):
    if S.smoke:
        for cfg in PREFILL_CONFIGS[:3]:  # exercise the mask modes once
            kv, bt, _ = build_cache(1, 200, bs, seed=12)
            guarded("smoke sweep", run_prefill, "sparse", 200, bs, kv, bt,
                    dict(cfg, block_m=16, block_n=16), check=cfg["mask_mode"] != 2, tag="sweep")
        return dict(PREFILL_CONFIGS[0], block_m=16, block_n=16)
    cases = [("sparse", 32768), ("dense", 8192)]
    totals = {i: 0.0 for i in range(len(PREFILL_CONFIGS))}
    for mode, length in cases:
        kv, bt, _ = build_cache(1, length, bs, seed=12)
        times = {}
        for i, cfg in enumerate(PREFILL_CONFIGS):
            unsafe = cfg["mask_mode"] == 2
            r = guarded(f"sweep prefill {i}", run_prefill, mode, length, bs, kv, bt, cfg,
                        tag=f"sweep{i}", check=not unsafe, rep_ms=100)
            times[i] = float("inf") if (r is None or unsafe) else r["us"]
        best = min(times.values())
        for i in times:
            totals[i] += times[i] / best
        del kv, bt
    win = min(totals, key=totals.get)
    log(f"prefill sweep bs={bs}: scores {totals} -> config {win}: {PREFILL_CONFIGS[win]}")
    return PREFILL_CONFIGS[win]


# ----------------------------------------------------------------------------- main


def main():
    global S
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--skip", default="", help="comma list: sweep,decode,prefill,snapkv,bs64")
    args = ap.parse_args()
    S = Setup(args.smoke)
    skip = set(filter(None, args.skip.split(",")))
    t_start = time.time()
    if not S.smoke:
        log(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
            f"triton {__import__('triton').__version__}")
    bs = 16
    dcfg = None
    pcfg = None
    if "sweep" not in skip:
        pcfg = guarded("prefill sweep", sweep_prefill, bs)
        dcfg = guarded("decode sweep", sweep_decode, bs)
    if S.smoke:
        pcfg = pcfg or dict(PREFILL_CONFIGS[0], block_m=16, block_n=16)

    if "decode" not in skip:
        for batch, length in S.decode_cases:
            kv, bt, null = build_cache(batch, length, bs, seed=batch + length)
            sd = guarded(f"sdpa decode {batch} {length}", sdpa_decode_time, batch, length, kv,
                         bt)
            for mode in ("dense", "sparse", "compressed"):
                if mode == "compressed":
                    bt = poison_gap(kv, bt, bs, batch, length, null)
                guarded(f"decode {mode} {batch} {length}", run_decode, mode, batch, length, bs,
                        kv, bt, dcfg, sdpa_us=sd)
            del kv, bt
            if not S.smoke:
                torch.cuda.empty_cache()

    if "prefill" not in skip:
        for length in S.prefill_lens:
            kv, bt, _ = build_cache(1, length, bs, seed=length)
            sd = guarded(f"sdpa prefill {length}", sdpa_prefill_time, length, kv, bt)
            for mode in ("dense", "sparse"):
                guarded(f"prefill {mode} {length}", run_prefill, mode, length, bs, kv, bt, pcfg,
                        sdpa_us=sd)
            if length == S.prefill_lens[1 if len(S.prefill_lens) > 1 else 0]:
                ctx = length * 3 // 4  # chunked prefill: last quarter attends a cached prefix
                for mode in ("dense", "sparse"):
                    guarded(f"prefill chunk {mode} {length}", run_prefill, mode, length, bs, kv,
                            bt, pcfg, ctx=ctx, tag="chunk")
            del kv, bt
            if not S.smoke:
                torch.cuda.empty_cache()

    if "snapkv" not in skip:
        for length in S.snap_lens:
            guarded(f"snapkv {length}", run_snapkv, length, bs)

    if "bs64" not in skip and not S.smoke:
        b64 = 64
        for batch, length in [(8, 32768), (32, 32768)]:
            kv, bt, null = build_cache(batch, length, b64, seed=5)
            for mode in ("dense", "sparse", "compressed"):
                if mode == "compressed":
                    bt = poison_gap(kv, bt, b64, batch, length, null)
                guarded(f"decode bs64 {mode}", run_decode, mode, batch, length, b64, kv, bt,
                        dcfg, tag="bs64")
            del kv, bt
        kv, bt, _ = build_cache(1, 32768, b64, seed=6)
        guarded("prefill bs64", run_prefill, "sparse", 32768, b64, kv, bt, pcfg, tag="bs64")
        del kv, bt

    elapsed = time.time() - t_start
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_kernels.json"), "w") as f:
        json.dump({"decode_config": dcfg, "prefill_config": pcfg, "elapsed_s": elapsed,
                   "results": RESULTS}, f, indent=1, default=str)
    with open(os.path.join(args.out, "gpu_kernels.log"), "w") as f:
        f.write("\n".join(LOG))
    summary()
    print(f"elapsed {elapsed:.0f} s; decode config {dcfg}; prefill config {pcfg}")


def summary():
    print("\n==== summary (us; graph = CUDA-graph replay; floor = max(bytes/BW, flops/peak)) ====")
    print(f"{'case':34s} {'eager':>9s} {'graph':>9s} {'floor':>8s} {'%floor':>6s} "
          f"{'TB/s':>6s} {'sdpa':>9s} {'x sdpa':>7s} {'err':>8s}")
    for r in RESULTS:
        if r.get("tag", "").startswith("sweep"):
            continue
        k = r["kind"]
        if k == "decode":
            name = f"dec {r['mode']} B{r['B']} L{r['L'] // 1024}K bs{r['bs']}"
            print(f"{name:34s} {r['us_eager']:9.1f} {r['us_graph']:9.1f} {r['floor_us']:8.1f} "
                  f"{r['pct_floor']:6.0f} {r['TBps_graph']:6.2f} {r.get('sdpa_us', 0):9.1f} "
                  f"{r.get('x_vs_sdpa', 0):7.2f} {r['err']:8.1e}")
        elif k == "prefill":
            name = f"pre {r['mode']} L{r['L'] // 1024}K ctx{r['ctx'] // 1024}K bs{r['bs']}"
            print(f"{name:34s} {r['us']:9.0f} {'':>9s} {r['floor_us']:8.0f} "
                  f"{r['pct_floor']:6.0f} {r['TFLOPs']:5.0f}T {r.get('sdpa_us', 0):9.0f} "
                  f"{r.get('x_vs_sdpa', 0):7.2f} {r['err']:8.1e}")
        elif k in ("snapkv_scores", "select_kept", "evicted_partial", "compact_kv"):
            print(f"{k + ' L' + str(r['L'] // 1024) + 'K':34s} {r['us']:9.1f} {'':>9s} "
                  f"{r.get('floor_us', 0):8.1f}")
        elif k == "failure":
            print(f"FAILED {r['name']}: {r['error'][:150]}")


if __name__ == "__main__":
    main()
