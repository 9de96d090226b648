"""Median device time of a callable, with CUDA events, eager or as a CUDA-graph replay (shared by
the GPU benchmark scripts)."""

from __future__ import annotations

import statistics

import torch


def cuda_ms(fn, reps: int = 20, warm: int = 3) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def cuda_graph_us(fn, flush: torch.Tensor, reps: int) -> float:
    """Median microseconds of a CUDA-graph replay of `fn` over `reps` replays, `flush` (a device
    buffer larger than L2) zeroed before each one so that every replay starts with a cold L2.
    `fn` runs twice on a side stream before the capture (allocations, lazy initialisation)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(reps)]
    g.replay()
    for st, en in ev:
        flush.zero_()
        st.record()
        g.replay()
        en.record()
    torch.cuda.synchronize()
    t = statistics.median(st.elapsed_time(en) for st, en in ev) * 1e3
    del g
    return t
