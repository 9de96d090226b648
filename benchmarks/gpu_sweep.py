#!/usr/bin/env python3
"""Issue 13 sweep on one H200: check every kernel variant against the float32 reference, time it
next to FlexAttention and torch SDPA in the same process, pick the winner per shape.

    PYTHONUNBUFFERED=1 timeout 420 python3 benchmarks/gpu_sweep.py --out "$OUT"

(about 3 minutes; no section starts after ``--budget-s`` 300 s, so it ends within 7 minutes;
``--table-from gpu_sweep.json`` prints the ratio table of a saved run.)

Cases (Llama-3.1-8B attention, one layer: 32 q heads, 8 KV heads, head_dim 128, bf16, paged KV
with block_size 16, blocks in random physical order, one all-NaN block standing for freed ones):

1. sparse prefill, sink 128 + window 2048, one prompt of 8K / 32K / 128K tokens: our Triton
   kernel in every config of ``PREFILL_CONFIGS``; our fused-attention pieces
   (``sdpa_prefill.sparse_prefill_pieces``: causal squares merged by log-sum-exp) with cuDNN's
   kernel first, from this step's K/V (the glue path) and from the paged cache, and the same
   pieces on flash; FlexAttention (torch.compile, the same mask as a block mask built once
   outside the timing, contiguous K/V); FlashAttention-2's window (torch's
   ``_flash_attention_forward``) merged with the sink part by log-sum-exp;
2. dense whole-prompt prefill: SDPA on contiguous K/V (torch's default kernel, recorded as
   ``backend``, then cuDNN and flash forced); our dispatch with cuDNN first (``whole_impl``
   "cudnn", the product's default) and with torch's own order ("sdpa", v8's path), each from
   this step's K/V as the vLLM glue passes them and from the paged cache; cuDNN alone without
   the copy into the caller's buffer; our Triton kernel; at 8K, the first call at new lengths
   (cuDNN builds a plan per shape) in fresh processes, cuDNN with and without torch's
   ``TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1``, and flash;
3. chunked prefill, the last 8K of a 32K prompt over its cached 24K: our Triton kernel, our
   SDPA split (prefix + causal square merged by log-sum-exp) with each fused kernel first, with
   and without host lengths (a device sync), SDPA ``causal_lower_right``, FlashAttention-2
   varlen (bottom-right causal), and the sparse chunk;
4. decode over compressed KV (CaliDrop, budget 2048 of a 32K prompt, calibration on) and over
   sink + window, B = 1 / 8 / 32, every config of ``DECODE_CONFIGS`` (CUDA-graph replay, L2
   flushed), against SDPA over the pre-gathered visible keys, the byte floor and a device copy
   of the same bytes; ``--ab-kernel`` adds an earlier kernel file, timed on the same inputs.

The L2 is emptied before every timed run by reading a large buffer (``--flush read``, the
default; ``timing.flush_l2``) or, as before v11, by zeroing it (``--flush write``), which leaves
dirty lines whose write-back lands in the timed run.

Where vLLM is importable (its FlashAttention-3 on Hopper), each section also times our
``kernels.flash_varlen`` paths, registered as the vLLM glue registers them: the sink + window
prefill as FlashAttention's sliding window over the paged cache plus our sink-merge kernel,
dense prompts and chunks as one FlashAttention call writing the caller's buffer, decode
batches (dense, and sink + window) likewise; each is written into the tuned table where it
beats the other paths (``sparse_backend`` / ``dense_backend`` / decode ``backend`` "flash").

Every variant is checked first (fresh random queries, output poisoned with NaN, relative error
against ``reference.paged_attention_ref`` on sampled query rows for prefill and on all rows for
decode, no NaN anywhere); decode variants are checked again after their timing (a race in the
fused split-K reduce would show there). A variant that fails to compile, fails its check or
runs out of memory is recorded as failed and the sweep goes on. Prefill records carry
``first_call_ms`` (the checked call: compiles and cuDNN plan builds included) and ``impls``
(the fused kernels that ran). The tuned table shipped with the package is switched off: every
variant runs the config it names.

Floors (formulas in ``floor_us``): FLOPs = 4 * Hq * D * (visible keys summed over the queries);
bytes = each input read once and the output written once; floor = max(FLOPs / peak,
bytes / bandwidth) with the H200 datasheet figures (989 TFLOP/s dense bf16, 4.8 TB/s), and
again with the ceilings measured in this run (device copy, bf16 GEMM).

Files under ``--out``: ``gpu_sweep.json`` (every record, rewritten after each section, so a
timeout keeps what was done), ``tuned_h200.json`` (the winners, the format of
``attention_backends/kernels/tuned_h200.json``), ``gpu_sweep.log`` (with the ratio table at its
end).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

import timing
import torch
import torch.nn.functional as F
from kernel_cases import contiguous_kv, paged_kv_cache, prefill_flops, rel_err
from timing import cuda_graph_us, flush_l2

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from attention_backends.kernels import (
    ops,  # noqa: E402
    sdpa_prefill,  # noqa: E402
)
from attention_backends.kernels import reference as ref  # noqa: E402

HQ, HKV, D, BS = 32, 8, 128, 16
G = HQ // HKV
DT = torch.bfloat16
SCALE = 1 / math.sqrt(D)
SINK, WINDOW, BUDGET = 128, 2048, 2048
KV_TOKEN_BYTES = HKV * 2 * D * 2  # one layer, one token: 4 KiB
PEAK_SHEET, BW_SHEET = 989e12, 4.8e12  # H200 datasheet: dense bf16, HBM3e

# Prefill configs (mask_mode 0: full and partial KV tiles in separate loops). num_stages 5 is
# the least that gives the K/V loads a third buffer behind the block-table load (TTGIR, Triton
# 3.6: at 3 or 4 stages the indirect load leaves only one tile in flight). 8 warps x 128 rows
# hold one CTA per SM (registers); the 4-warp, 64-row configs fit two (sm90_compile_report:
# config 3 uses 113 KiB of shared memory, two CTAs exactly fill an SM), so one CTA's softmax
# can overlap the other's MMA.
PREFILL_CONFIGS = [
    {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 5, "pack_gqa": True},
    {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 7, "pack_gqa": True},
    {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 5, "pack_gqa": False},
    {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 5, "pack_gqa": True},
    {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 7, "pack_gqa": True},
    {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3, "pack_gqa": True},
    {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3, "pack_gqa": True},
]
PREFILL_CONFIGS = [dict(c, mask_mode=0) for c in PREFILL_CONFIGS]
# Decode configs. Stages 3 leave one K/V buffer (no prefetch), 5 two, 7 three (TTGIR).
DECODE_CONFIGS = [
    {"block_n": 128, "num_warps": 4, "num_stages": 3, "waves": 3},
    {"block_n": 64, "num_warps": 4, "num_stages": 5, "waves": 2},
    {"block_n": 64, "num_warps": 4, "num_stages": 7, "waves": 2},
    {"block_n": 128, "num_warps": 4, "num_stages": 5, "waves": 1},
    {"block_n": 32, "num_warps": 2, "num_stages": 7, "waves": 4},
    {"block_n": 64, "num_warps": 4, "num_stages": 5, "waves": 3},
    # calibration inputs loaded before the KV loop (compressed decode only; 6 is 1 with it)
    {"block_n": 64, "num_warps": 4, "num_stages": 5, "waves": 2, "calib_early": True},
    {"block_n": 64, "num_warps": 4, "num_stages": 4, "waves": 2},
    {"block_n": 64, "num_warps": 4, "num_stages": 4, "waves": 2, "calib_early": True},
    {"block_n": 64, "num_warps": 4, "num_stages": 5, "waves": 4, "calib_early": True},
    {"block_n": 32, "num_warps": 4, "num_stages": 7, "waves": 2, "calib_early": True},
    {"block_n": 128, "num_warps": 8, "num_stages": 3, "waves": 2, "calib_early": True},
]
DECODE_CONFIGS = [dict(c, fused_max_splits=16) for c in DECODE_CONFIGS]
AB_KERNEL = None  # --ab-kernel: an earlier paged_attention.py, timed beside ours

PIECES_GLUE = "ours: cudnn pieces from this step's K/V (glue path)"
FLASH_SW = "ours: flash window + sink merge (paged)"
FLASH_DENSE = "ours: flash from paged cache, into out"
FLASH_CHUNK = "ours: flash paged (bottom-right causal)"
FLASH_ON = False  # a FlashAttention varlen function is registered (register_flash)
RESULTS: list[dict] = []
LOG: list[str] = []
DEV = "cuda"
SMOKE = False
SPARSE_LENGTHS = [32768, 8192, 131072]  # the first also gets the all-masked ablation
DENSE_LENGTHS = [8192, 32768, 131072]
CHUNK = (32768, 24576)  # (prompt length, cached prefix): the last 8K over 24K
DEC_L = 32768
T0 = time.time()
OUT = "."
BUDGET_S = 390.0
CEIL = {"bw": 4.28e12, "peak": 707e12, "measured": False}


def log(msg: str) -> None:
    line = f"[{time.time() - T0:6.1f}s] {msg}"
    print(line, flush=True)
    LOG.append(line)


def record(**kw) -> dict:
    RESULTS.append(kw)
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items()]
    log("  ".join(parts))
    return kw


def save(tuned: dict | None = None) -> None:
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "gpu_sweep.json"), "w") as f:
        json.dump({"elapsed_s": time.time() - T0, "ceilings": CEIL,
                   "prefill_configs": PREFILL_CONFIGS, "decode_configs": DECODE_CONFIGS,
                   "results": RESULTS}, f, indent=1, default=str)
    with open(os.path.join(OUT, "gpu_sweep.log"), "w") as f:
        f.write("\n".join(LOG))
    if tuned is not None:
        with open(os.path.join(OUT, "tuned_h200.json"), "w") as f:
            json.dump(tuned, f, indent=1)


def over_budget(section: str) -> bool:
    if time.time() - T0 > BUDGET_S:
        log(f"SKIPPED {section}: over the time budget")
        RESULTS.append({"kind": "skipped", "name": section})
        return True
    return False


def guarded(name, fn, *a, **kw):
    try:
        return fn(*a, **kw)
    except Exception as e:  # one failed variant must not lose the run
        log(f"FAILED {name}: {type(e).__name__}: {str(e)[:300]}")
        LOG.append(traceback.format_exc())
        RESULTS.append({"kind": "failure", "name": name, "error": f"{type(e).__name__}: {e}"})
        if not SMOKE:
            torch.cuda.synchronize()
            empty_cache()
        return None


# ----------------------------------------------------------------------------- timing


FLUSH = None


def bench(fn, target_ms: float = 60.0, max_reps: int = 40) -> float:
    """Median microseconds over CUDA events, L2 flushed before each run; reps sized from a
    first timed run (at least 3)."""
    if SMOKE:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    fn()
    torch.cuda.synchronize()
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    st.record()
    fn()
    en.record()
    torch.cuda.synchronize()
    first = st.elapsed_time(en)
    reps = max(3, min(max_reps, int(target_ms / max(first, 1e-3))))
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(reps)]
    for a, b in ev:
        flush_l2(FLUSH)
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev) * 1e3


def bench_graph(fn, reps: int = 40) -> float:
    """Median microseconds of a CUDA-graph replay of fn, L2 flushed before each replay."""
    if SMOKE:
        return bench(fn)
    return cuda_graph_us(fn, FLUSH, reps)


def measure_ceilings() -> None:
    """Device copy bandwidth (bytes read + written) and bf16 GEMM rate on random data."""
    src = torch.randn(256 << 20, device=DEV, dtype=DT)  # 512 MiB
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), target_ms=50)
    CEIL["bw"] = 2 * src.numel() * 2 / (t * 1e-6)
    a = torch.randn(8192, 8192, device=DEV, dtype=DT)
    b = torch.randn(8192, 8192, device=DEV, dtype=DT)
    t = bench(lambda: a @ b, target_ms=50)
    CEIL["peak"] = 2 * 8192 ** 3 / (t * 1e-6)
    CEIL["measured"] = True
    record(kind="ceilings", copy_TBps=CEIL["bw"] / 1e12, gemm_TFLOPs=CEIL["peak"] / 1e12,
           flush=timing.FLUSH_MODE)


def empty_cache():
    if not SMOKE:
        torch.cuda.empty_cache()


def floors(nbytes: float, flops: float) -> dict:
    """Floor (us) = max(FLOPs / peak, bytes / bandwidth), on the datasheet and on the measured
    ceilings."""
    return {"floor_us": max(flops / PEAK_SHEET, nbytes / BW_SHEET) * 1e6,
            "floor_meas_us": max(flops / CEIL["peak"], nbytes / CEIL["bw"]) * 1e6}


def i32(vals):
    return torch.tensor(vals, dtype=torch.int32, device=DEV)


# ----------------------------------------------------------------------------- data


def build_cache(batch: int, length: int, seed: int):
    """Random paged KV (kernel_cases.paged_kv_cache) at this run's head shapes and block size."""
    return paged_kv_cache(batch, length, BS, seed, HKV, D, DEV, DT)


def sdpa(q, k, v, causal, **kw):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                      SDPBackend.EFFICIENT_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=SCALE,
                                              enable_gqa=True, **kw)


class Prefill:
    """One prompt of ``length`` slots in the paged cache; queries are the last ``length - ctx``
    slots. Checks compare sampled query rows with the float32 reference."""

    def __init__(self, length: int, ctx: int, sparse: bool, seed: int):
        self.length, self.ctx, self.sparse = length, ctx, sparse
        self.q_len = length - ctx
        self.kv, self.bt, _ = build_cache(1, length, seed)
        self.masks = {"sink": i32([SINK]), "window": i32([WINDOW])} if sparse else {}
        self.seq_lens = i32([length])
        self.qsl = i32([0, self.q_len])
        self.seed = seed
        self.k = self.v = None

    def fresh_q(self, salt: int):
        g = torch.Generator(device=DEV).manual_seed(self.seed * 131 + salt)
        return torch.randn(self.q_len, HQ, D, device=DEV, dtype=DT, generator=g)

    def contiguous(self):
        if self.k is None:
            self.k, self.v = contiguous_kv(self.kv, self.bt, self.length)
        return self.k, self.v

    def check(self, q, got) -> float:
        """Relative error of ``got [q_len, Hq, D]`` on three 64-row samples; NaN fails."""
        assert not torch.isnan(got).any(), "NaN in the output (unwritten row or stale read)"
        n = min(64, self.q_len)
        errs = []
        for i0 in sorted({0, (self.q_len // 2) // n * n, self.q_len - n}):
            want, _ = ref.paged_attention_ref(q[i0:i0 + n], self.kv, self.bt,
                                              i32([self.ctx + i0 + n]), i32([0, n]), SCALE,
                                              **self.masks)
            errs.append(rel_err(got[i0:i0 + n], want))
        err = max(errs)
        assert err < 1e-2, f"relative error {errs}"
        return err

    def flops(self) -> float:
        return prefill_flops(self.length, self.ctx, SINK if self.sparse else 0,
                             WINDOW if self.sparse else 0, HQ, D)

    def nbytes(self) -> float:
        return self.q_len * HQ * D * 2 * 2 + self.length * KV_TOKEN_BYTES

    def ours(self, q, out, pcfg, hints=True, new_kv=None):
        kw = {}
        if hints:
            kw = {"host_query_start_loc": [0, self.q_len], "host_seq_lens": [self.length],
                  "max_query_len": self.q_len, "max_seq_len": self.length}
            if self.sparse:  # as the glue passes them in a prefill step
                kw.update(host_sink=[SINK], host_window=[WINDOW])
        return ops.paged_attention(q, self.kv, self.bt, self.seq_lens, self.qsl, SCALE,
                                   out=out, prefill_config=pcfg, new_kv=new_kv, **self.masks,
                                   **kw)

    def new_kv(self):
        """This step's K and V ``[L, Hkv, D]`` as the vLLM glue passes them (whole prompts)."""
        k, v = self.contiguous()
        return k[0].transpose(0, 1).contiguous(), v[0].transpose(0, 1).contiguous()


def sync():
    if not SMOKE:
        torch.cuda.synchronize()


def time_prefill(case: Prefill, name: str, run, salt: int, check=True, **extra) -> dict:
    """Check ``run(q, out)`` (returns the output) on fresh queries, then time it.
    ``first_call_ms``: wall time of the checked (first) call, which includes compiles and cuDNN
    plan builds for a shape not seen before in the process. ``impls``: the fused kernels
    ``sdpa_prefill._sdpa_lse`` ran in that call."""
    q = case.fresh_q(salt)
    out = torch.full_like(q, float("nan"))
    before = dict(sdpa_prefill.IMPL_COUNTS)
    sync()
    t0 = time.perf_counter()
    got = run(q, out)
    sync()
    first_ms = (time.perf_counter() - t0) * 1e3
    impls = {k: n - before.get(k, 0) for k, n in sdpa_prefill.IMPL_COUNTS.items()
             if n > before.get(k, 0)}
    if impls:
        extra = dict(extra, impls=",".join(f"{k}x{n}" for k, n in impls.items()))
    err = case.check(q, got) if check else float("nan")
    t = bench(lambda: run(q, out))
    fl = floors(case.nbytes(), case.flops())
    return record(kind="prefill", case=f"{'sparse' if case.sparse else 'dense'}",
                  L=case.length, ctx=case.ctx, variant=name, err=err, us=t,
                  TFLOPs=case.flops() / (t * 1e-6) / 1e12,
                  pct_floor=100 * fl["floor_us"] / t, **fl, first_call_ms=first_ms, **extra)


def time_interleaved(case: Prefill, runs: dict, salt: int) -> dict[str, dict]:
    """Time several ``run(q, out)`` in turns, the L2 emptied before each: round ``i`` runs
    every one once, so clock and power drift over the section land on all alike (a reference
    timed minutes before ours, at other clocks, differed by up to 12 % at 32K). Records each
    as ``"interleaved: " + name``; median of the rounds (at least 5, about 200 ms per run)."""
    q = case.fresh_q(salt)
    outs = {n: torch.full_like(q, float("nan")) for n in runs}
    for n, run in runs.items():
        run(q, outs[n])
    sync()
    if SMOKE:
        reps = 1
    else:
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        for n, run in runs.items():
            run(q, outs[n])
        en.record()
        sync()
        reps = max(5, min(30, int(200 * len(runs) / max(st.elapsed_time(en), 1e-3))))
    times: dict[str, list[float]] = {n: [] for n in runs}
    for _ in range(reps):
        for n, run in runs.items():
            if SMOKE:
                t = time.perf_counter()
                run(q, outs[n])
                times[n].append((time.perf_counter() - t) * 1e3)
                continue
            flush_l2(FLUSH)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run(q, outs[n])
            b.record()
            b.synchronize()
            times[n].append(a.elapsed_time(b))
    fl = floors(case.nbytes(), case.flops())
    out = {}
    for n, ts in times.items():
        t = statistics.median(ts) * 1e3
        out[n] = record(kind="prefill", case=f"{'sparse' if case.sparse else 'dense'}",
                        L=case.length, ctx=case.ctx, variant="interleaved: " + n, us=t,
                        TFLOPs=case.flops() / (t * 1e-6) / 1e12, rounds=reps, **fl)
    return out


# ----------------------------------------------------------------------------- sections


def flex_runner(case: Prefill):
    """FlexAttention with the case's mask (block mask built here, once) on contiguous K/V;
    returns run(q, out) -> [q_len, Hq, D]."""
    from torch.nn.attention.flex_attention import create_block_mask

    ctx = case.ctx

    def mask_mod(b, h, q_idx, kv_idx):
        p = q_idx + ctx
        vis = kv_idx <= p
        if case.sparse:
            vis = vis & ((kv_idx < SINK) | (p - kv_idx < WINDOW))
        return vis

    try:
        bm = create_block_mask(mask_mod, None, None, case.q_len, case.length, device=DEV,
                               BLOCK_SIZE=128, _compile=True)
    except TypeError:
        bm = create_block_mask(mask_mod, None, None, case.q_len, case.length, device=DEV,
                               BLOCK_SIZE=128)
    flex = flex_runner.compiled
    k, v = case.contiguous()

    def run(q, out):
        o = flex(q.transpose(0, 1)[None], k, v, block_mask=bm, scale=SCALE, enable_gqa=True)
        return o[0].transpose(0, 1)

    return run


def fa2_window_sink_runner(case: Prefill):
    """FlashAttention-2's sliding window (torch's ``_flash_attention_forward``, varlen layout)
    merged by log-sum-exp with the sink keys the window does not cover: a second reference
    for the sparse prefill (one whole prompt)."""
    k, v = case.contiguous()
    kt = k[0].transpose(0, 1).contiguous()  # [L, Hkv, D]
    vt = v[0].transpose(0, 1).contiguous()
    n = case.length
    cu = i32([0, n])
    cut = SINK + WINDOW - 1  # queries from here see every sink key outside their window

    def run(q, out):
        o_w, lse_w = torch.ops.aten._flash_attention_forward(
            q, kt, vt, cu, cu, n, n, 0.0, True, False, scale=SCALE,
            window_size_left=WINDOW - 1, window_size_right=0)[:2]
        out.copy_(o_w)
        if n > WINDOW:
            # queries [WINDOW, cut): sink keys j < p - WINDOW + 1 only (tiny, in float32)
            p = torch.arange(WINDOW, min(cut, n), device=DEV)
            qs = q[WINDOW:min(cut, n)].float().transpose(0, 1)  # [Hq, m, D]
            ks = kt[:SINK].float().transpose(0, 1).repeat_interleave(G, 0)
            vs = vt[:SINK].float().transpose(0, 1).repeat_interleave(G, 0)
            sc = (qs @ ks.transpose(1, 2)) * SCALE
            j = torch.arange(SINK, device=DEV)
            sc = sc.masked_fill(~(j[None, :] < (p[:, None] - WINDOW + 1))[None], float("-inf"))
            lse_s = torch.logsumexp(sc, -1)
            o_s = torch.softmax(sc, -1).nan_to_num(0.0) @ vs  # [Hq, m, D]
            lw = lse_w[:, WINDOW:min(cut, n)].float()
            m_ = torch.maximum(lw, lse_s)
            w1, w2 = torch.exp(lw - m_), torch.exp(lse_s - m_)
            merged = (o_w[WINDOW:min(cut, n)].float().transpose(0, 1) * w1[..., None]
                      + o_s.nan_to_num(0.0) * w2[..., None]) / (w1 + w2)[..., None]
            out[WINDOW:min(cut, n)] = merged.transpose(0, 1).to(out.dtype)
        if n > cut:
            o_s, l_s = sdpa_prefill._sdpa_lse(q[cut:].transpose(0, 1)[None],
                                              kt[:SINK].transpose(0, 1)[None],
                                              vt[:SINK].transpose(0, 1)[None], False, SCALE)
            sdpa_prefill._merge(out[cut:], o_w[cut:], lse_w[:, cut:], o_s[0].transpose(0, 1),
                                l_s[0], True)
        return out

    return run


def section_sparse_prefill(lengths, tuned, with_flex=True):
    for length in lengths:
        if over_budget(f"sparse prefill {length}"):
            return
        _sparse_one(length, tuned, with_flex)
        empty_cache()


def _sparse_one(length, tuned, with_flex):
    case = Prefill(length, 0, True, seed=length)
    best = (math.inf, None)
    for i, cfg in enumerate(PREFILL_CONFIGS):
        r = guarded(f"sparse {length} cfg{i}", time_prefill, case, f"ours cfg{i}",
                    lambda q, out, c=cfg: case.ours(q, out, c)[0], salt=i, cfg=i)
        if r and r["us"] < best[0]:
            best = (r["us"], i)
    if length == SPARSE_LENGTHS[0]:  # ablation: every tile masked
        guarded("sparse ablation", time_prefill, case, "ours cfg0 all tiles masked",
                lambda q, out: case.ours(q, out, dict(PREFILL_CONFIGS[0], mask_mode=1))[0],
                salt=50, cfg=0)
    if best[1] is not None:
        tuned["prefill"]["sparse"][str(length)] = PREFILL_CONFIGS[best[1]]
        log(f"sparse prefill {length}: winner cfg{best[1]} {best[0]:.0f} us")
    # the fused-attention pieces (sdpa_prefill.sparse_prefill_pieces): cuDNN's kernel first,
    # then the same pieces on flash; from this step's K/V as the glue passes them, and gathered
    # from the paged cache
    nk = case.new_kv()
    pieces = None
    for j, (name, cfg, kv_in) in enumerate((
            (PIECES_GLUE, {"sparse_backend": "sdpa"}, nk),
            ("ours: cudnn pieces from paged cache", {"sparse_backend": "sdpa"}, None),
            ("ours: flash pieces from this step's K/V",
             {"sparse_backend": "sdpa", "lse_impl": "flash"}, nk))):
        r = guarded(f"sparse {length} {name}", time_prefill, case, name,
                    lambda q, out, c=cfg, kv_in=kv_in: case.ours(q, out, c, new_kv=kv_in)[0],
                    salt=62 + j)
        if r and kv_in is not None and (pieces is None or r["us"] < pieces[0]["us"]):
            pieces = (r, cfg)
    nk = None
    if pieces and pieces[0]["us"] < best[0]:
        tuned["prefill"]["sparse"][str(length)] = dict(
            PREFILL_CONFIGS[best[1]] if best[1] is not None else {}, **pieces[1])
        log(f"sparse prefill {length}: fused pieces {pieces[0]['us']:.0f} us beat Triton "
            f"{best[0]:.0f} us -> sparse_backend sdpa {pieces[1]}")
    if FLASH_ON:
        r = guarded(f"sparse {length} flash", time_prefill, case, FLASH_SW,
                    lambda q, out: case.ours(q, out, {"sparse_backend": "flash"})[0], salt=66)
        others = min(best[0], pieces[0]["us"] if pieces else math.inf)
        if r and r["us"] < others:
            tuned["prefill"]["sparse"][str(length)] = dict(
                PREFILL_CONFIGS[best[1]] if best[1] is not None else {},
                sparse_backend="flash")
            log(f"sparse prefill {length}: flash {r['us']:.0f} us beat {others:.0f} us -> "
                "sparse_backend flash")
    if with_flex:
        guarded(f"flex sparse {length}", lambda: time_prefill(
            case, "flex", flex_runner(case), salt=60))
    guarded(f"fa2 window+sink {length}", lambda: time_prefill(
        case, "fa2 window + sink (lse merge)", fa2_window_sink_runner(case), salt=61))
    # the shipped choice against FlexAttention, in turns
    pick = tuned["prefill"]["sparse"].get(str(length), {})
    nk = case.new_kv()  # this step's K/V, as the glue passes them
    runs = {"ours (shipped choice)":
            lambda q, out, c=dict(pick): case.ours(q, out, c, new_kv=nk)[0]}
    if with_flex:
        runs["flex"] = flex_runner(case)
    guarded(f"interleaved sparse {length}", time_interleaved, case, runs, 67)
    nk = None
    save(tuned)


def section_dense_prefill(lengths, tuned):
    for length in lengths:
        if over_budget(f"dense prefill {length}"):
            return
        _dense_one(length, tuned)
        empty_cache()


def sdpa_forced(q, k, v, backend):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE,
                                              enable_gqa=True)


def _dense_one(length, tuned):
    from torch.nn.attention import SDPBackend

    case = Prefill(length, 0, False, seed=length + 1)
    k, v = case.contiguous()
    # torch's own choice among its fused kernels (the reference), then each kernel forced
    q4 = case.fresh_q(70).transpose(0, 1)[None]
    default = guarded("sdpa choice", sdpa_prefill.whole_prompt_backend, q4, k, v, SCALE, "sdpa")
    guarded(f"sdpa dense {length}", lambda: time_prefill(
        case, "sdpa (contiguous K/V)",
        lambda q, out: sdpa(q.transpose(0, 1)[None], k, v, True)[0].transpose(0, 1),
        salt=70, backend=default))
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("flash", SDPBackend.FLASH_ATTENTION)):
        if SMOKE and name == "cudnn":
            continue  # no cuDNN on the CPU
        guarded(f"sdpa dense {length} {name}", lambda be=be, name=name: time_prefill(
            case, f"sdpa (contiguous K/V) [{name}]",
            lambda q, out: sdpa_forced(q.transpose(0, 1)[None], k, v, be)[0].transpose(0, 1),
            salt=78))
    nk = case.new_kv()
    kt, vt = sdpa_prefill._bhld(nk[0]), sdpa_prefill._bhld(nk[1])
    ours_be = guarded("ours choice", sdpa_prefill.whole_prompt_backend,
                      sdpa_prefill._bhld(case.fresh_q(71)), kt, vt, SCALE, "cudnn")
    variants = [
        # the product's path as the vLLM glue calls it: cuDNN first, this step's K/V
        ("ours: cudnn from this step's K/V", {"whole_impl": "cudnn"}, nk, ours_be),
        ("ours: cudnn from paged cache", {"whole_impl": "cudnn"}, None, ours_be),
        # v8's path: torch's own kernel order
        ("ours: sdpa from this step's K/V (glue path)", {"whole_impl": "sdpa"}, nk, default),
        ("ours: sdpa from paged cache", {"whole_impl": "sdpa"}, None, default),
    ]
    if DEV not in sdpa_prefill._NO_FA2_OUT:
        variants.append(("ours: fa2 into out from paged cache", {"whole_impl": "fa2_out"}, None,
                         "FLASH_ATTENTION"))
    if FLASH_ON:
        variants.append((FLASH_DENSE, {"dense_backend": "flash"}, None, "vllm flash varlen"))
    for j, (name, cfg, kv_in, be) in enumerate(variants):
        cfg = dict({"dense_backend": "sdpa"}, **cfg)
        guarded(f"ours dense {length} {name}", lambda name=name, cfg=cfg, kv_in=kv_in, be=be, j=j:
                time_prefill(case, name, lambda q, out: case.ours(q, out, cfg,
                                                                  new_kv=kv_in)[0],
                             salt=71 + j, backend=be))
    if DEV in sdpa_prefill._NO_FA2_OUT and not any(
            r.get("name") == "fa2_out unsupported" for r in RESULTS):
        log("fa2 into out: this torch's _flash_attention_forward takes no out=; not timed")
        RESULTS.append({"kind": "note", "name": "fa2_out unsupported"})
    # the same kernel without the copy of its result into the caller's buffer: the copy's cost
    guarded(f"cudnn alone {length}", lambda: time_prefill(
        case, "ours: cudnn from this step's K/V, result not copied into out",
        lambda q, out: sdpa_prefill._whole_prompt(sdpa_prefill._bhld(q), kt, vt, SCALE,
                                                  "cudnn")[0].transpose(0, 1), salt=76))
    guarded(f"ours dense nohint {length}", lambda: time_prefill(
        case, "ours: cudnn from paged cache, no host lengths (sync)",
        lambda q, out: case.ours(q, out, {"dense_backend": "sdpa", "whole_impl": "cudnn"},
                                 hints=False)[0], salt=73))
    # ours as shipped (FlashAttention in place where registered, else cuDNN first) against the
    # SDPA references, in turns
    ours_cfg = ({"dense_backend": "flash"} if FLASH_ON
                else {"dense_backend": "sdpa", "whole_impl": "cudnn"})
    runs = {"ours (shipped choice)": lambda q, out: case.ours(q, out, ours_cfg, new_kv=nk)[0],
            "sdpa (contiguous K/V)": lambda q, out: sdpa(q.transpose(0, 1)[None], k, v,
                                                         True)[0].transpose(0, 1)}
    if not SMOKE:
        runs["sdpa (contiguous K/V) [cudnn]"] = lambda q, out: sdpa_forced(
            q.transpose(0, 1)[None], k, v, SDPBackend.CUDNN_ATTENTION)[0].transpose(0, 1)
    guarded(f"interleaved dense {length}", time_interleaved, case, runs, 77)
    nk = kt = vt = None
    if length == DENSE_LENGTHS[0]:
        guarded("cold calls", cold_calls, length)
    cfgs = [0, 2] if length <= DENSE_LENGTHS[1] else [0]
    for i in cfgs:
        guarded(f"triton dense {length} cfg{i}", time_prefill, case, f"ours triton cfg{i}",
                lambda q, out, c=PREFILL_CONFIGS[i]: case.ours(
                    q, out, dict(c, dense_backend="triton"))[0], salt=74 + i, cfg=i)
    save(tuned)


COLD_SCRIPT = r"""
import json, sys, time, torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
hq, hkv, d, lengths, backend = json.loads(sys.argv[1])
def call(n):
    x = lambda h: torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    q, k, v = x(hq), x(hkv), x(hkv)
    with sdpa_kernel([getattr(SDPBackend, backend)]):
        torch.cuda.synchronize(); t = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        torch.cuda.synchronize(); return (time.perf_counter() - t) * 1e3
call(1024)
print(json.dumps([[n, call(n), call(n)] for n in lengths]))
"""


def cold_calls(length):
    """First call at a prompt length not seen before against the second call (ms, wall time):
    cuDNN builds an execution plan per new shape, flash has nothing to build. Each kernel in a
    fresh process (after one call at another length), cuDNN also with torch's
    ``TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1`` (its ragged path, one plan for all lengths)."""
    import subprocess

    lengths = [length + 16, length + 48, length + 112]
    for backend, env_extra in (("CUDNN_ATTENTION", {}), ("FLASH_ATTENTION", {}),
                               ("CUDNN_ATTENTION", {"TORCH_CUDNN_SDPA_AVOID_RECOMPILE": "1"})):
        if SMOKE:
            return
        env = dict(os.environ, **env_extra)
        r = subprocess.run([sys.executable, "-c", COLD_SCRIPT,
                            json.dumps([HQ, HKV, D, lengths, backend])],
                           capture_output=True, text=True, timeout=90, env=env)
        if r.returncode != 0:
            log(f"FAILED cold calls {backend} {env_extra}: {r.stderr[-300:]}")
            continue
        for n, first, second in json.loads(r.stdout.strip().splitlines()[-1]):
            record(kind="cold", backend=backend, env=",".join(env_extra) or "-", L=n,
                   first_ms=first, second_ms=second)


def section_chunk(tuned):
    if over_budget("chunked prefill"):
        return
    _chunk(tuned)
    empty_cache()


def _chunk(tuned):
    length, ctx = CHUNK
    case = Prefill(length, ctx, False, seed=7)
    n = case.q_len
    best = (math.inf, None)
    for i in range(min(4, len(PREFILL_CONFIGS))):
        cfg = dict(PREFILL_CONFIGS[i], dense_backend="triton")
        r = guarded(f"chunk triton cfg{i}", time_prefill, case, f"ours triton cfg{i}",
                    lambda q, out, c=cfg: case.ours(q, out, c)[0], salt=80 + i, cfg=i)
        if r and r["us"] < best[0]:
            best = (r["us"], i)
    rs, split = None, None
    for j, impl in enumerate(sdpa_prefill.LSE_IMPLS):
        cfg = {"dense_backend": "sdpa", "chunk_backend": "sdpa", "lse_impl": impl}
        r = guarded(f"chunk sdpa split {impl}", time_prefill, case,
                    f"ours: sdpa split + lse merge [{impl}]",
                    lambda q, out, c=cfg: case.ours(q, out, c)[0], salt=91 + j)
        if r and (rs is None or r["us"] < rs["us"]):
            rs, split = r, cfg
    if split is not None:
        guarded("chunk sdpa split nohint", time_prefill, case,
                f"ours: sdpa split [{split['lse_impl']}], no host lengths (sync)",
                lambda q, out: case.ours(q, out, split, hints=False)[0], salt=86)
    if best[1] is not None:
        guarded("chunk triton nohint", time_prefill, case, f"ours triton cfg{best[1]}, no host "
                "lengths (sync)", lambda q, out: case.ours(q, out, dict(
                    PREFILL_CONFIGS[best[1]], dense_backend="triton"), hints=False)[0],
                salt=87)
    k, v = case.contiguous()
    from torch.nn.attention.bias import causal_lower_right

    bias = causal_lower_right(n, length)
    guarded("chunk sdpa lower right", time_prefill, case, "sdpa causal_lower_right",
            lambda q, out: sdpa(q.transpose(0, 1)[None], k, v, False,
                                attn_mask=bias)[0].transpose(0, 1), salt=88)
    kt, vt = k[0].transpose(0, 1).contiguous(), v[0].transpose(0, 1).contiguous()
    cq, ck = i32([0, n]), i32([0, length])
    guarded("chunk fa2 varlen", time_prefill, case, "fa2 varlen bottom-right causal",
            lambda q, out: torch.ops.aten._flash_attention_forward(
                q, kt, vt, cq, ck, n, length, 0.0, True, False, scale=SCALE)[0], salt=89)
    fl = None
    if FLASH_ON:
        fl = guarded("chunk flash", time_prefill, case, FLASH_CHUNK,
                     lambda q, out: case.ours(q, out, {"dense_backend": "flash"})[0], salt=85)
    # the product's choice: the fastest chunk path
    tri = best[0]
    spl = rs["us"] if rs else math.inf
    fla = fl["us"] if fl else math.inf
    if math.isfinite(min(tri, spl, fla)):
        pick = "sdpa" if spl < tri else "triton"
        tuned["prefill"]["dense"]["1024"] = dict(  # chunks of 1K queries and more
            PREFILL_CONFIGS[best[1]] if best[1] is not None else {}, chunk_backend=pick,
            **({"lse_impl": split["lse_impl"]} if split else {}),
            **({"dense_backend": "flash"} if fla < min(tri, spl) else {}))
        log(f"chunk: triton {tri:.0f} us, sdpa split {spl:.0f} us, flash {fla:.0f} us -> "
            f"{'flash' if fla < min(tri, spl) else pick}")
    sp = Prefill(length, ctx, True, seed=8)
    cfg = tuned["prefill"]["sparse"].get(str(SPARSE_LENGTHS[0]), PREFILL_CONFIGS[0])
    guarded("chunk sparse", time_prefill, sp, "ours (sparse chunk)",
            lambda q, out: sp.ours(q, out, cfg)[0], salt=90)
    save(tuned)


def poison_gap(kv, bt, batch, length, null):
    """Compressed layout: freed blocks -> the NaN block; stale slots of partial blocks -> NaN."""
    bt = bt.clone()
    first_freed = -(-BUDGET // BS)
    last_freed = (length - 1) // BS
    bt[:, first_freed:last_freed] = null
    blk = (length - 1) // BS
    off_hi = (length - 1) % BS
    if blk >= first_freed and off_hi > 0:
        lo = max(0, BUDGET - blk * BS)
        for s in range(batch):
            kv[int(bt[s, blk]), :, lo:off_hi] = float("nan")
    return bt


def decode_case(mode, batch, length, seed):
    kv, bt, null = build_cache(batch, length, seed)
    if mode == "compressed":
        bt = poison_gap(kv, bt, batch, length, null)
        masks = {"kept_end": i32([BUDGET] * batch), "gap_end": i32([length - 1] * batch)}
        ntok = BUDGET + 1
    elif mode == "sparse":
        masks = {"sink": i32([SINK] * batch), "window": i32([WINDOW] * batch)}
        ntok = SINK + WINDOW
    else:
        masks, ntok = {}, length
    return kv, bt, masks, ntok


def visible_slots(mode, length):
    if mode == "compressed":
        return torch.cat([torch.arange(BUDGET), torch.tensor([length - 1])])
    if mode == "sparse":
        return torch.cat([torch.arange(SINK), torch.arange(length - WINDOW, length)])
    return torch.arange(length)


def section_decode(cases, tuned):
    for mode, batch, length, cfg_ids in cases:
        if over_budget(f"decode {mode} B{batch}"):
            return
        _decode_one(mode, batch, length, cfg_ids, tuned)
        empty_cache()


def _decode_one(mode, batch, length, cfg_ids, tuned):
    kv, bt, masks, ntok = decode_case(mode, batch, length, seed=batch * 7 + length)
    seq_lens = i32([length] * batch)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=DEV)
    nbytes = batch * ntok * KV_TOKEN_BYTES + batch * HQ * D * 2 * 2
    fl = floors(nbytes, 4.0 * batch * HQ * D * ntok)

    def inputs(salt, float_tau=False):
        g = torch.Generator(device=DEV).manual_seed(batch * 1000 + salt)
        q = torch.randn(batch, HQ, D, device=DEV, dtype=DT, generator=g)
        calib = None
        if mode == "compressed":
            # a float32 [B] threshold, as serving passes it (graph_inputs, calidrop.stack); a
            # float costs a fill kernel on every call
            tau = 0.9 if float_tau else torch.full((batch,), 0.9, device=DEV)
            calib = ops.Calibration(
                q_ref=q.clone(), o_e=torch.randn(batch, HQ, D, device=DEV, generator=g),
                lse_e=torch.randn(batch, HQ, device=DEV, generator=g) + 5.0,
                enabled=torch.ones(batch, dtype=torch.bool, device=DEV), tau=tau)
        return q, calib

    def run_variant(name, cfg, salt, cfg_id, float_tau=False, kernel=None):
        q, calib = inputs(salt, float_tau)
        out = torch.full_like(q, float("nan"))

        # host copies of the sink and window, as the glue passes them (the flash path needs
        # one window for the batch)
        hints = ({"host_sink": [SINK] * batch, "host_window": [WINDOW] * batch}
                 if mode == "sparse" else {})

        def fn():
            if kernel is not None:  # an earlier kernel module (--ab-kernel), called directly
                return kernel.paged_attention_triton(
                    q, kv, bt, seq_lens, qsl, SCALE, masks.get("sink"), masks.get("window"),
                    masks.get("kept_end"), masks.get("gap_end"), calib, out, max_query_len=1,
                    max_seq_len=length, max_kv_tokens=ntok, decode_config=cfg, **hints)
            return ops.paged_attention(q, kv, bt, seq_lens, qsl, SCALE, calibration=calib,
                                       out=out, max_query_len=1, max_seq_len=length,
                                       max_kv_tokens=ntok, decode_config=cfg, **masks, **hints)

        want, want_hits = ref.paged_attention_ref(q, kv, bt, seq_lens, qsl, SCALE,
                                                  calibration=calib, **masks)

        def check():
            out.fill_(float("nan"))
            got, hits = fn()
            assert not torch.isnan(got).any(), "NaN in the output"
            e = rel_err(got, want)
            assert e < 1e-2, f"relative error {e}"
            if calib is not None:
                assert torch.equal(hits, want_hits)
            return e

        err = check()
        t = bench_graph(fn)
        err_after = check()  # after many replays: a race in the split merge shows here
        return record(kind="decode", case=mode, B=batch, L=length, variant=name, cfg=cfg_id,
                      err=err, err_after=err_after, us=t, MB=nbytes / 1e6,
                      TBps=nbytes / (t * 1e-6) / 1e12,
                      pct_copy_bw=100 * (nbytes / CEIL["bw"] * 1e6) / t, **fl)

    best = (math.inf, None)
    for i in cfg_ids:
        r = guarded(f"decode {mode} B{batch} cfg{i}", run_variant, f"ours cfg{i}",
                    DECODE_CONFIGS[i], i, i)
        if r and r["us"] < best[0]:
            best = (r["us"], i)
    if best[1] is not None:
        win = DECODE_CONFIGS[best[1]]
        guarded(f"decode {mode} B{batch} unfused", run_variant,
                f"ours cfg{best[1]}, separate reduce launch", dict(win, fused_max_splits=0),
                40, best[1])
        tuned["decode"][mode][str(batch)] = win
        log(f"decode {mode} B{batch}: winner cfg{best[1]} {best[0]:.1f} us")
        if mode == "compressed":
            guarded(f"decode {mode} B{batch} float tau", run_variant,
                    f"ours cfg{best[1]}, float tau (a fill kernel per call)", win, best[1],
                    best[1], True)
        if AB_KERNEL is not None:
            # the earlier kernel with cfg1 (the default config) and with this run's winner
            for i in sorted({1, best[1]}):
                guarded(f"decode {mode} B{batch} earlier kernel cfg{i}", run_variant,
                        f"earlier kernel cfg{i}", DECODE_CONFIGS[i], i, i, False, AB_KERNEL)
    if FLASH_ON and mode != "compressed":
        r = guarded(f"decode {mode} B{batch} flash", run_variant, "ours: flash varlen",
                    dict(DECODE_CONFIGS[0], backend="flash"), 41, "flash")
        if r and r["us"] < best[0]:
            tuned["decode"][mode][str(batch)] = dict(
                DECODE_CONFIGS[best[1]] if best[1] is not None else DECODE_CONFIGS[0],
                backend="flash")
            log(f"decode {mode} B{batch}: flash {r['us']:.1f} us beat {best[0]:.1f} us")
    # SDPA over the pre-gathered visible keys (contiguous), same graph timing
    slots = visible_slots(mode, length).to(DEV)
    x = kv[bt[:, slots // BS].long(), :, (slots % BS)[None, :]]  # [B, n, Hkv, 2D]
    x = x.permute(0, 2, 1, 3)
    k, v = x[..., :D].contiguous(), x[..., D:].contiguous()
    x = None
    qg = torch.randn(batch, HQ, 1, D, device=DEV, dtype=DT)
    guarded(f"sdpa decode {mode} B{batch}", lambda: record(
        kind="decode", case=mode, B=batch, L=length, variant="sdpa pre-gathered",
        us=bench_graph(lambda: sdpa(qg, k, v, False)), MB=nbytes / 1e6, **fl))
    k = v = None
    if mode == "compressed" and not SMOKE:
        # a device copy moving the same bytes (half read, half written), timed the same way:
        # the fixed costs of a run this short, which the large-copy ceiling does not see
        src = torch.randint(-9999, 9999, (int(nbytes) // 4,), dtype=torch.int16, device=DEV)
        dst = torch.empty_like(src)
        guarded(f"copy same bytes B{batch}", lambda: record(
            kind="decode", case=mode, B=batch, L=length, variant="device copy, same bytes",
            us=bench_graph(lambda: dst.copy_(src)), MB=nbytes / 1e6, **fl))
        src = dst = None
    save(tuned)


def finalize_dense(tuned):
    """Dense prefill entries per prompt length: the chunk winner plus the fastest whole-prompt
    path (cuDNN first, torch's own order, FlashAttention-2 writing the output in place)."""
    base = {k: v for k, v in tuned["prefill"]["dense"].get("1024", {}).items()
            if k != "dense_backend"}
    for length in DENSE_LENGTHS:
        cands = [(impl, _get("prefill", "dense", length, v)) for impl, v in (
            ("cudnn", "ours: cudnn from this step's K/V"),
            ("sdpa", "ours: sdpa from this step's K/V (glue path)"),
            ("fa2_out", "ours: fa2 into out from paged cache"),
            ("flash", FLASH_DENSE))]
        cands = [(impl, r) for impl, r in cands if r]
        if cands:
            impl, r = min(cands, key=lambda c: c[1]["us"])
            tuned["prefill"]["dense"][str(length)] = (
                dict(base, dense_backend="flash") if impl == "flash"
                else dict(base, whole_impl=impl))
            log(f"dense {length}: " + ", ".join(f"{i} {x['us']:.0f} us" for i, x in cands)
                + f" -> {impl}")


# ----------------------------------------------------------------------------- summary


def _get(kind, case, L, variant, ctx=0, B=None):
    for r in RESULTS:
        if r.get("kind") != kind or r.get("case") != case or r.get("variant") != variant:
            continue
        if kind == "prefill" and (r["L"] != L or r["ctx"] != ctx):
            continue
        if kind == "decode" and (r["B"] != B or r["L"] != L):
            continue
        return r
    return None


def _best(kind, case, L, prefix, ctx=0, B=None):
    rs = [r for r in RESULTS if r.get("kind") == kind and r.get("case") == case
          and r.get("variant", "").startswith(prefix) and "masked" not in r["variant"]
          and "no host" not in r["variant"] and "separate" not in r["variant"]
          and "float tau" not in r["variant"]
          and (kind != "prefill" or (r["L"] == L and r["ctx"] == ctx))
          and (kind != "decode" or (r["B"] == B and r["L"] == L))]
    return min(rs, key=lambda r: r["us"]) if rs else None


def summary():
    """The ratio table, printed and appended to the log."""
    def emit(line=""):
        print(line)
        LOG.append(line)

    def fmt(x, w=9, p=0):
        return f"{x:{w}.{p}f}" if isinstance(x, float) and math.isfinite(x) else f"{'-':>{w}}"

    def us(r):
        return float(r["us"]) if r else None

    def ratio(a, b, p):  # a / b
        return fmt(us(a) / us(b) if a and b else None, 7, p)

    def row(tag, o, flex=None, sref=None, pf=2, ps=3, tail=""):
        emit(f"{tag:34s} {fmt(us(o))} {fmt(us(flex))} {fmt(us(sref))} "
             f"{fmt(o['floor_us'] if o else None, 8)} {fmt(o['floor_meas_us'] if o else None, 8)}"
             f" {ratio(flex, o, pf)} {ratio(sref, o, ps)} {tail}")

    emit("")
    emit("==== issue 13 ratio table (times in us; floor = datasheet, floor* = measured ceilings "
         f"{CEIL['bw'] / 1e12:.2f} TB/s, {CEIL['peak'] / 1e12:.0f} TFLOP/s; x = reference / "
         "ours, > 1: ours faster) ====")
    emit(f"{'case':34s} {'ours':>9s} {'flex':>9s} {'sdpa':>9s} {'floor':>8s} {'floor*':>8s} "
         f"{'x flex':>7s} {'x sdpa':>7s} cfg / kernel")
    for L in sorted(SPARSE_LENGTHS):
        f = _get("prefill", "sparse", L, "flex")
        s = _get("prefill", "dense", L, "sdpa (contiguous K/V)")
        o = _best("prefill", "sparse", L, "ours cfg")
        if o:
            row(f"SA prefill {L // 1024}K triton", o, f, s, ps=1, tail=f"cfg{o.get('cfg', '')}")
        for v, tag in ((PIECES_GLUE, "cudnn pieces"),
                       ("ours: flash pieces from this step's K/V", "flash pieces")):
            o = _get("prefill", "sparse", L, v)
            if o:
                row(f"SA prefill {L // 1024}K {tag}", o, f, s, ps=1, tail=o.get("impls", ""))
        o = _get("prefill", "sparse", L, FLASH_SW)
        if o:
            row(f"SA prefill {L // 1024}K flash+sink", o, f, s, ps=1)
        fa = _get("prefill", "sparse", L, "fa2 window + sink (lse merge)")
        if fa:
            row(f"  (fa2 window + sink {L // 1024}K)", fa, f, s, ps=1)
    for L in sorted(SPARSE_LENGTHS):
        o = _get("prefill", "sparse", L, "interleaved: ours (shipped choice)")
        if o:
            row(f"SA prefill {L // 1024}K, in turns", o,
                _get("prefill", "sparse", L, "interleaved: flex"), None, ps=1,
                tail=f"{o['rounds']} rounds")
    for L in DENSE_LENGTHS:
        o = _get("prefill", "dense", L, "interleaved: ours (shipped choice)")
        refs = [r for r in (_get("prefill", "dense", L, "interleaved: sdpa (contiguous K/V)"),
                            _get("prefill", "dense", L,
                                 "interleaved: sdpa (contiguous K/V) [cudnn]")) if r]
        if o and refs:
            row(f"dense {L // 1024}K, in turns", o, None, min(refs, key=lambda r: r["us"]),
                tail=f"{o['rounds']} rounds; sdpa = the faster of its default and cuDNN")
    for L in DENSE_LENGTHS:
        s = _get("prefill", "dense", L, "sdpa (contiguous K/V)")
        if s:
            emit(f"{'dense ' + str(L // 1024) + 'K: sdpa default is':34s} "
                 f"{s.get('backend', '?')}")
        for v, tag in (("ours: cudnn from this step's K/V", "cudnn glue"),
                       ("ours: cudnn from paged cache", "cudnn cache"),
                       ("ours: sdpa from this step's K/V (glue path)", "sdpa glue"),
                       ("ours: sdpa from paged cache", "sdpa cache"),
                       ("ours: fa2 into out from paged cache", "fa2 out"),
                       (FLASH_DENSE, "flash paged, in place"),
                       ("ours: cudnn from this step's K/V, result not copied into out",
                        "cudnn, no copy"),
                       ("sdpa (contiguous K/V) [cudnn]", "sdpa forced cudnn"),
                       ("sdpa (contiguous K/V) [flash]", "sdpa forced flash")):
            o = _get("prefill", "dense", L, v)
            if o:
                row(f"dense {L // 1024}K {tag}", o, None, s, tail=o.get("backend", ""))
        t = _best("prefill", "dense", L, "ours triton")
        if t:
            row(f"  (triton dense {L // 1024}K)", t, None, s, tail=f"cfg{t.get('cfg', '')}")
    refs = [r for r in (_get("prefill", "dense", CHUNK[0], "sdpa causal_lower_right", CHUNK[1]),
                        _get("prefill", "dense", CHUNK[0], "fa2 varlen bottom-right causal",
                             CHUNK[1])) if r]
    sref = min(refs, key=lambda r: r["us"]) if refs else None
    if sref:
        emit(f"{'chunk 8K/32K reference':34s} {sref['variant']}")
    for v in ("ours triton", "ours: sdpa split + lse merge", FLASH_CHUNK):
        o = _best("prefill", "dense", CHUNK[0], v, CHUNK[1])
        if o:
            row(f"chunk 8K/32K {v[:22]}", o, None, sref, tail=o["variant"][len(v):].strip())
    for mode in ("compressed", "sparse", "dense"):
        for B in (1, 8, 32):
            tri = _best("decode", mode, DEC_L, "ours cfg", B=B)
            s = _get("decode", mode, DEC_L, "sdpa pre-gathered", B=B)
            fo = _get("decode", mode, DEC_L, "ours: flash varlen", B=B)
            for o in (tri, fo):
                if not o:
                    continue
                tag = f"decode {mode} B{B}" + (" flash" if o is fo else "")
                emit(f"{tag:34s} {fmt(o['us'], 9, 1)} {'-':>9s} "
                     f"{fmt(us(s), 9, 1)} {fmt(o['floor_us'], 8, 1)} "
                     f"{fmt(o['floor_meas_us'], 8, 1)} {'-':>7s} {ratio(s, o, 2)} "
                     f"cfg{o.get('cfg', '')}  {o['pct_copy_bw']:.0f}% of copy bw")
            cp = _get("decode", mode, DEC_L, "device copy, same bytes", B=B)
            if cp and tri:
                emit(f"{'  (device copy, same bytes)':34s} {fmt(cp['us'], 9, 1)} {'':9s} "
                     f"{'':9s} {'':8s} {'':8s} {'':7s} {'':7s} ours at "
                     f"{100 * cp['us'] / tri['us']:.0f}% of its rate")
            # same-run comparisons: the earlier kernel (--ab-kernel), a float tau
            for prefix, tag in (("earlier kernel cfg", "earlier kernel"),
                                ("ours cfg", "float tau")):
                rs = [r for r in RESULTS if r.get("kind") == "decode" and r.get("case") == mode
                      and r.get("B") == B and r.get("variant", "").startswith(prefix)
                      and (tag != "float tau" or "float tau" in r["variant"])]
                if rs and tri:
                    a = min(rs, key=lambda r: r["us"])
                    emit(f"{'  (' + tag + ')':34s} {fmt(a['us'], 9, 1)} {'':9s} {'':9s} "
                         f"{'':8s} {'':8s} {'':7s} {'':7s} cfg{a.get('cfg', '')}  ours "
                         f"{a['us'] / tri['us']:.3f}x faster")
    for r in RESULTS:
        if r.get("kind") == "cold":
            emit(f"cold call {r['backend']} {r['env']} L={r['L']}: first {r['first_ms']:.1f} ms, "
                 f"second {r['second_ms']:.1f} ms")
    for r in RESULTS:
        if r.get("kind") in ("failure", "skipped"):
            emit(f"{r['kind'].upper()} {r['name']}: {r.get('error', '')[:140]}")


# ----------------------------------------------------------------------------- main


def register_flash() -> bool:
    """Register vLLM's FlashAttention varlen function for ``kernels.flash_varlen`` as the vLLM
    glue does (the version vLLM picks for this GPU); in the smoke run its float32 stand-in."""
    import functools

    from attention_backends.kernels import flash_varlen

    if SMOKE:
        flash_varlen.register(ref.flash_varlen_ref)
        log("flash varlen: the float32 stand-in (smoke run)")
        return True
    try:
        from vllm.v1.attention.backends.fa_utils import (
            flash_attn_varlen_func,
            get_flash_attn_version,
        )
    except ImportError as e:
        log(f"flash varlen: vLLM's FlashAttention not importable ({e}); not timed")
        return False
    version = get_flash_attn_version(head_size=D, kv_cache_block_size=BS)
    if version not in (2, 3):
        log(f"flash varlen: vLLM picks FlashAttention {version} here; not timed")
        return False
    flash_varlen.register(functools.partial(flash_attn_varlen_func, fa_version=version))
    import vllm

    log(f"flash varlen: vLLM {vllm.__version__} FlashAttention {version}")
    return True


def main():
    global OUT, BUDGET_S, FLUSH, DEV, SMOKE, SINK, WINDOW, BUDGET, PREFILL_CONFIGS
    global DECODE_CONFIGS, SPARSE_LENGTHS, DENSE_LENGTHS, CHUNK, DEC_L
    global HQ, HKV, D, G, SCALE, KV_TOKEN_BYTES, AB_KERNEL
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="start no new section after this many seconds")
    ap.add_argument("--skip", default="",
                    help="comma list: sparse,dense,chunk,decode,flex,flash")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU tensors in Triton's interpreter (run with TRITON_INTERPRET=1), "
                         "tiny shapes: exercises the script's logic, not a benchmark")
    ap.add_argument("--table-from", metavar="JSON",
                    help="print the ratio table of a saved gpu_sweep.json and exit")
    ap.add_argument("--flush", choices=timing.FLUSH_MODES, default=timing.FLUSH_MODE,
                    help="how the L2 is emptied before each timed run (timing.flush_l2), the "
                         "copy ceiling's runs included")
    ap.add_argument("--ab-kernel", metavar="PY",
                    help="an earlier attention_backends/kernels/paged_attention.py (e.g. from "
                         "`git show REV:PATH`): its decode is timed beside ours, same inputs")
    args = ap.parse_args()
    if args.table_from:
        with open(args.table_from) as f:
            saved = json.load(f)
        RESULTS.extend(saved["results"])
        CEIL.update(saved["ceilings"])
        summary()
        return
    OUT, BUDGET_S = args.out, args.budget_s
    timing.FLUSH_MODE = args.flush
    skip = set(filter(None, args.skip.split(",")))
    import signal

    def on_term(signum, frame):  # `timeout` ran out: keep what was measured, print the table
        log("TERMINATED by the time limit: the table below covers the sections done")
        guarded("summary", summary)
        save()
        sys.stdout.flush()
        os._exit(124)

    signal.signal(signal.SIGTERM, on_term)
    import triton

    from attention_backends.kernels import paged_attention

    # every variant runs exactly the config it names, not the winners shipped with the package
    paged_attention.TUNED_FILE = ""
    paged_attention._tuned_table.cache_clear()
    paged_attention.tuned_config.cache_clear()
    if args.ab_kernel:
        import importlib.util

        spec = importlib.util.spec_from_file_location("paged_attention_ab", args.ab_kernel)
        AB_KERNEL = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(AB_KERNEL)
        AB_KERNEL.TUNED_FILE = ""
        AB_KERNEL._tuned_table.cache_clear()
        AB_KERNEL.tuned_config.cache_clear()
    if args.smoke:
        os.environ["FLUXSERVE_FORCE_TRITON"] = "1"
        DEV, SMOKE = "cpu", True
        SINK, WINDOW, BUDGET = 4, 32, 32
        HQ, HKV, D = 8, 2, 64
        G, SCALE, KV_TOKEN_BYTES = HQ // HKV, 1 / math.sqrt(D), HKV * 2 * D * 2
        SPARSE_LENGTHS, DENSE_LENGTHS, CHUNK, DEC_L = [200, 130], [130, 200], (200, 150), 160
        PREFILL_CONFIGS = [dict(c, block_m=16, block_n=16) for c in PREFILL_CONFIGS[:3]]
        DECODE_CONFIGS = [dict(c, block_n=16) for c in DECODE_CONFIGS[:2]]
        skip.add("flex")
        log(f"smoke run on the CPU, triton {triton.__version__}")
    else:
        try:
            cudnn = torch.backends.cudnn.version()
        except RuntimeError as e:  # torch refuses the cuDNN runtime it finds
            cudnn = f"unusable ({str(e)[:90]})"
        log(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
            f"{triton.__version__}, cuDNN {cudnn}, SMs "
            f"{torch.cuda.get_device_properties(0).multi_processor_count}; cuDNN attention "
            f"used by ours: {sdpa_prefill.cudnn_attention_ok(torch.device('cuda'))}")
        FLUSH = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
        torch.backends.cuda.matmul.allow_tf32 = False
        guarded("ceilings", measure_ceilings)
    global FLASH_ON
    FLASH_ON = "flash" not in skip and guarded("flash register", register_flash) is True
    if "flex" not in skip:
        from torch.nn.attention.flex_attention import flex_attention

        flex_runner.compiled = torch.compile(flex_attention, dynamic=False)
    tuned = {"prefill": {"sparse": {}, "dense": {}},
             "decode": {"compressed": {}, "sparse": {}, "dense": {}}}
    save(tuned)
    n_dec = range(len(DECODE_CONFIGS))
    if "decode" not in skip:
        guarded("decode section", section_decode, [
            ("compressed", 32, DEC_L, n_dec),
            ("compressed", 8, DEC_L, n_dec),
            ("compressed", 1, DEC_L, (1, 2, 6) if len(n_dec) > 6 else n_dec),
            ("sparse", 32, DEC_L, (0, 1, 2, 5) if len(n_dec) > 5 else n_dec),
            ("sparse", 8, DEC_L, (1, 2) if len(n_dec) > 2 else n_dec),
            ("dense", 8, DEC_L, (0, 1, 2) if len(n_dec) > 2 else n_dec),
        ], tuned)
    if "sparse" not in skip:
        guarded("sparse section", section_sparse_prefill, SPARSE_LENGTHS, tuned,
                "flex" not in skip)
    if "chunk" not in skip:
        guarded("chunk section", section_chunk, tuned)
    if "dense" not in skip:
        guarded("dense section", section_dense_prefill, DENSE_LENGTHS, tuned)
    guarded("tuned dense", finalize_dense, tuned)
    from torch.nn.attention import SDPBackend

    log("torch's SDPA priority order now: " + ", ".join(
        SDPBackend(i).name for i in torch._C._get_sdp_priority_order()))
    guarded("summary", summary)
    log(f"elapsed {time.time() - T0:.0f} s")
    save(tuned)


if __name__ == "__main__":
    main()
