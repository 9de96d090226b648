#!/usr/bin/env python3
"""Compile the Triton attention kernels for the H200 (sm_90) on a machine without a GPU, and report
what the compiler made of each variant: registers, spills, shared memory, and whether each KV
loop was software-pipelined (asynchronous copies in flight).

Use the Triton version of the GPU machine (3.6), e.g. installed into a folder of its own::

    pip install --no-deps --target /tmp/triton36 triton==3.6.0
    PYTHONPATH=/tmp/triton36:$PWD python benchmarks/sm90_compile_report.py [--dump DIR]

A variant that fails to compile here fails on the GPU too; the sweep (benchmarks/gpu_kernels.py)
keeps only configs that compiled here. The argument specialisations mimic a launch at the
benchmark shapes (Llama-3.1-8B heads, paged KV block 16): integer arguments divisible by 16 and
all pointers carry Triton's divisibility-16 attribute, an integer equal to 1 becomes a constant.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from attention_backends.kernels import paged_attention as pa  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16
G = HQ // HKV


def _spec(fn, args: dict, constexprs: dict):
    """ASTSource inputs: ``args`` maps each runtime argument to a pointer type (str starting
    with '*') or a sample int/float value."""
    signature, attrs, consts = {}, {}, dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        v = args[name]
        if isinstance(v, str):
            signature[name] = v
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[name] = "fp32"
        elif v == 1:
            signature[name] = "constexpr"
            consts[name] = 1
        else:
            signature[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, consts, attrs)


def _compile(fn, args, constexprs, num_warps, num_stages):
    src = _spec(fn, args, constexprs)
    target = GPUTarget("cuda", 90, 32)
    return triton.compile(src, target=target,
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _common(calib: bool, out_t: str = "*bf16"):
    return {
        "q_ptr": "*bf16", "kv_ptr": "*bf16", "bt_ptr": "*i32", "seq_lens_ptr": "*i32",
        "qsl_ptr": "*i32", "sink_ptr": "*i32", "window_ptr": "*i32", "kept_ptr": "*i32",
        "gap_ptr": "*i32", "out_ptr": out_t, "hits_ptr": "*i8" if calib else out_t,
        "qref_ptr": "*bf16", "oe_ptr": "*fp32" if calib else "*bf16",
        "lsee_ptr": "*fp32" if calib else "*bf16", "en_ptr": "*u8" if calib else "*bf16",
        "tau_ptr": "*fp32" if calib else "*bf16", "scale_log2": 0.1275,
        "stride_qt": HQ * D, "stride_qh": D, "stride_kb": HKV * PAGE * 2 * D,
        "stride_kh": PAGE * 2 * D, "stride_ks": 2 * D, "stride_bt": 8192,
        "stride_ot": HQ * D, "stride_oh": D,
    }


def prefill_variant(cfg: dict, has_sw: bool, has_gap: bool = False, calib: bool = False,
                    num_seqs: int = 1):
    pack = cfg.get("pack_gqa", True)
    bm = cfg["block_m"]
    args = dict(_common(calib), cu_tiles_ptr="*i32", num_seqs=num_seqs, grid_tiles=4097)
    consts = dict(HQ=HQ, G=G, D=D, PAGE=PAGE, BLOCK_M=bm, BLOCK_N=cfg["block_n"],
                  SEARCH_STEPS=2, HAS_CALIB=calib, MASK_MODE=cfg.get("mask_mode", 0),
                  HAS_SW=has_sw, HAS_GAP=has_gap, PACK_GQA=pack)
    return _compile(pa._prefill_kernel, args, consts, cfg["num_warps"], cfg["num_stages"])


def decode_variant(cfg: dict, has_sw: bool, has_gap: bool, calib: bool, final: bool,
                   fused: bool, block_m: int = 16):
    args = dict(_common(calib), part_o_ptr="*fp32", part_lse_ptr="*fp32", lock_ptr="*i32",
                num_splits=6, q_thr=16)
    consts = dict(HQ=HQ, G=G, D=D, PAGE=PAGE, BLOCK_M=block_m, BLOCK_N=cfg["block_n"],
                  HAS_CALIB=calib, FINAL=final, MAXQ=1, HAS_SW=has_sw, HAS_GAP=has_gap,
                  FUSED_REDUCE=fused, CALIB_EARLY=bool(cfg.get("calib_early", False)))
    return _compile(pa._decode_kernel, args, consts, cfg["num_warps"], cfg["num_stages"])


def describe(k) -> dict:
    """Registers, spills and stack from ptxas -v on the kernel's PTX; shared memory; pipelining
    (asynchronous global-to-shared copies and their waits in the TTGIR); wgmma count."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    ttgir = k.asm.get("ttgir", "")
    ptx = k.asm.get("ptx", "")
    info = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        r = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", path, "-o",
                            os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
        text = r.stdout + r.stderr
        for key, pat in (("regs", r"Used (\d+) registers"), ("stack", r"(\d+) bytes stack frame"),
                         ("spill_st", r"(\d+) bytes spill stores"),
                         ("spill_ld", r"(\d+) bytes spill loads")):
            m = re.search(pat, text)
            info[key] = int(m.group(1)) if m else None
    info.update(smem=k.metadata.shared,
                async_copies=len(re.findall(r"async_copy_global_to_local", ttgir)),
                async_waits=len(re.findall(r"async_wait", ttgir)),
                wgmma=len(re.findall(r"wgmma.mma_async", ptx)))
    return info


def merge_variant():
    args = {"out_ptr": "*bf16", "o1_ptr": "*bf16", "o2_ptr": "*bf16", "l1_ptr": "*fp32",
            "l2_ptr": "*fp32", "n": 8192, "s_ot": HQ * D, "s_oh": D, "s_1t": HQ * D, "s_1h": D,
            "s_2t": HQ * D, "s_2h": D, "s_l1h": 1, "s_l1t": HQ, "s_l2h": 1, "s_l2t": HQ}
    return _compile(pa._merge_kernel, args, {"D": D, "BLOCK_T": 16}, 4, 1)


def write_kv_variant():
    args = {"k_ptr": "*bf16", "v_ptr": "*bf16", "kv_ptr": "*bf16", "slot_ptr": "*i64",
            "stride_kt": (HQ + 2 * HKV) * D, "stride_kh": D, "stride_vt": (HQ + 2 * HKV) * D,
            "stride_vh": D, "stride_cb": HKV * PAGE * 2 * D, "stride_ch": PAGE * 2 * D,
            "stride_cs": 2 * D}
    return _compile(pa._write_kv_kernel, args, {"HKV": HKV, "D": D, "PAGE": PAGE, "BLOCK_H": 8},
                    4, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", help="write each variant's TTGIR and PTX here")
    ap.add_argument("--only", default="", help="substring filter on variant names")
    args = ap.parse_args()
    print(f"triton {triton.__version__}")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu_sweep import DECODE_CONFIGS, PREFILL_CONFIGS

    variants = []
    for i, cfg in enumerate(PREFILL_CONFIGS):
        variants.append((f"prefill{i} sparse {cfg}", lambda c=cfg: prefill_variant(c, True)))
        variants.append((f"prefill{i} dense {cfg}", lambda c=cfg: prefill_variant(c, False)))
    variants.append(("lse merge", merge_variant))
    variants.append(("write_kv", write_kv_variant))
    variants.append(("prefill mask_mode 1", lambda: prefill_variant(
        dict(PREFILL_CONFIGS[0], mask_mode=1), True)))
    variants.append(("prefill calib+gap+sw (default cfg)",
                     lambda: prefill_variant(pa.DEFAULT_PREFILL, True, True, True, 4)))
    for i, cfg in enumerate(DECODE_CONFIGS):
        for fused in (False, True):
            variants.append((f"decode{i} compressed fused={fused} {cfg}",
                             lambda c=cfg, f=fused: decode_variant(c, False, True, True, False, f)))
        variants.append((f"decode{i} compressed final {cfg}",
                         lambda c=cfg: decode_variant(c, False, True, True, True, False)))
        variants.append((f"decode{i} sparse final {cfg}",
                         lambda c=cfg: decode_variant(c, True, False, False, True, False)))
        variants.append((f"decode{i} sparse fused {cfg}",
                         lambda c=cfg: decode_variant(c, True, False, False, False, True)))
        variants.append((f"decode{i} dense fused {cfg}",
                         lambda c=cfg: decode_variant(c, False, False, False, False, True)))
    failed = 0
    for name, make in variants:
        if args.only and args.only not in name:
            continue
        t0 = time.time()
        try:
            k = make()
        except Exception as e:  # report and go on: the point is to find every failure
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:400]}")
            continue
        d = describe(k)
        print(f"ok   {name}: {d} ({time.time() - t0:.1f} s)")
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            stem = re.sub(r"[^A-Za-z0-9]+", "_", name)[:80]
            for ext in ("ttgir", "ptx"):
                with open(os.path.join(args.dump, f"{stem}.{ext}"), "w") as f:
                    f.write(k.asm.get(ext, ""))
    print(f"{failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
