"""Median device time of a callable, with CUDA events, eager or as a CUDA-graph replay (shared by
the GPU benchmark scripts)."""

from __future__ import annotations

import statistics

import torch

# How the L2 is emptied before a timed run. "read" (the default) reads a buffer larger than the
# L2: it then holds clean, unrelated lines, as in a decode step, where attention follows the QKV
# projection (which reads its weights). "write" (triton.testing.do_bench's convention, and these
# scripts' before v11) zeroes the buffer, which leaves the L2 full of dirty lines whose
# write-back falls inside the timed run: about 10 us of a 70 us read-only decode kernel on an
# H200 (docs/benchmarks.md, v11).
FLUSH_MODES = ("read", "write")
FLUSH_MODE = "read"


def flush_l2(flush: torch.Tensor) -> None:
    """Empty the L2 of the timed run's data (``flush``: a device buffer larger than the L2)."""
    if FLUSH_MODE == "read":
        flush.view(torch.int64).sum()
    else:
        flush.zero_()


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
    buffer larger than L2) passed to `flush_l2` before each one so that every replay starts with
    a cold L2.
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
        flush_l2(flush)
        st.record()
        g.replay()
        en.record()
    torch.cuda.synchronize()
    t = statistics.median(st.elapsed_time(en) for st, en in ev) * 1e3
    del g
    return t
