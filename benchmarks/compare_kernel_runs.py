#!/usr/bin/env python3
"""Compare runs of ``benchmarks/gpu_kernels.py`` (their ``gpu_kernels.json``): per case (sweeps
left out), each run's time in µs (CUDA-graph median where there is one) and the ratio of the
mean of the ``--after`` runs to the mean of the ``--before`` runs.

    python3 benchmarks/compare_kernel_runs.py --before b1.json b2.json --after a1.json a2.json
"""

from __future__ import annotations

import argparse
import json
import statistics

KEYS = ("kind", "mode", "B", "L", "ctx", "bs", "tag")


def load(path: str) -> dict[tuple, float]:
    out = {}
    for r in json.load(open(path))["results"]:
        if str(r.get("tag", "")).startswith("sweep"):
            continue
        us = r.get("us_graph") or r.get("us") or r.get("us_eager")
        if us is not None:
            out[tuple(r.get(k, "") for k in KEYS)] = float(us)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", nargs="+", required=True)
    ap.add_argument("--after", nargs="+", required=True)
    args = ap.parse_args()
    before, after = [load(p) for p in args.before], [load(p) for p in args.after]
    ratios = []
    for case in before[0]:
        if not all(case in run for run in before + after):
            continue
        b = [run[case] for run in before]
        a = [run[case] for run in after]
        ratio = statistics.mean(a) / statistics.mean(b)
        ratios.append(ratio)
        name = " ".join(str(v) for v in case if v != "")
        cols = " ".join(f"{v:10.1f}" for v in b + a)
        print(f"{name:40s} {cols}  {ratio:.3f}")
    print(f"{len(ratios)} cases; after/before from {min(ratios):.3f} to {max(ratios):.3f}")


if __name__ == "__main__":
    main()
