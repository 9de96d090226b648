"""Our FULL CUDA graphs' inputs (vllm_glue.graph_inputs, attention.attend_graph).

A replayed graph runs the attention call of its capture: same tensors, every option on, nothing
of the step but what the metadata builder wrote into the persistent buffers. Here the layer
views are taken once, as a capture would, then several steps of different batches are written
with ``write_step`` and run through those views; each must give what the eager path
(``attention.attend``, which passes each step's own options) gives, on the float32 CPU path and
on the Triton kernel in the interpreter. Mixed batches: rows without options, sparse, per-layer
sparse, compressed with and without calibration, and the graph's padding rows (no query).
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from kvcache_builder import build_paged_kv, needs_triton

from attention_backends.flux.step import RoutingStep
from attention_backends.kernels import ops
from attention_backends.vllm_glue import attention, graph_inputs
from attention_backends.vllm_glue.metadata import StepMetadata
from kv_policies.eviction.policies.calidrop import LayerCalibration
from kv_policies.eviction.runtime import KVPolicyRuntime, RequestKVState
from kv_policies.eviction.step import EvictionStep

L, HQ, HKV, D, BS = 3, 4, 2, 16, 4
KINDS = ("none", "sparse", "layers", "calidrop", "snapkv")


def _batch(seed: int, rows: int, graph_rows: int):
    """A decode batch of ``rows`` requests padded to ``graph_rows``: its KV cache, vLLM-style
    metadata, the step's routing/eviction parts, the runtime's calibration and the queries."""
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    kinds = [rnd.choice(KINDS) for _ in range(rows)]
    lens, kept, gap = [], [], []
    for k in kinds:
        n = rnd.randint(6, 40)
        lens.append(n)
        if k in ("calidrop", "snapkv") and n > 12:
            a = rnd.randint(1, n - 8)
            kept.append(a)
            gap.append(rnd.randint(a + 1, n - 2))
        else:
            kept.append(0)
            gap.append(0)
    kv = build_paged_kv(lens, HKV, D, BS, torch.float32, gen, kept_end=kept, gap_end=gap)
    pad = graph_rows - rows
    ids = [f"req-{seed}-{i}" for i in range(rows)]
    sparse = torch.zeros(L, graph_rows, dtype=torch.bool)
    sink = torch.zeros(graph_rows, dtype=torch.int32)
    window = torch.zeros(graph_rows, dtype=torch.int32)
    rt = KVPolicyRuntime()
    for i, k in enumerate(kinds):
        if k in ("sparse", "layers"):
            sink[i], window[i] = rnd.randint(0, 5), rnd.randint(1, 12)
            sparse[:, i] = True if k == "sparse" else torch.tensor([False, True, False])
        if k == "calidrop" and kept[i]:
            layers = {}
            for li in (0, 2):
                q_ref = torch.randn(HQ, D, generator=gen)
                layers[li] = LayerCalibration(q_ref=q_ref, o_e=torch.randn(HQ, D, generator=gen),
                                              lse_e=torch.randn(HQ, generator=gen),
                                              tau=rnd.choice([0.0, 0.5, 1.0]))
            rt._states[ids[i]] = RequestKVState(plan=None, policy="calidrop", layers=layers)
    routing = RoutingStep(req_ids=[*ids, *[None] * pad], sparse=sparse, sink=sink,
                          window=window, route_rows=[], num_layers=L)
    kept_t = torch.tensor([*kept, *[0] * pad], dtype=torch.int32)
    gap_t = torch.tensor([*gap, *[0] * pad], dtype=torch.int32)
    planned = any(k in ("calidrop", "snapkv") for k in kinds)
    eviction = EvictionStep(plans=[None] * graph_rows, policies=[None] * graph_rows,
                            kept_end=kept_t if planned else None,
                            gap_end=gap_t if planned else None, any_compressed=planned)
    qsl = list(range(rows + 1)) + [rows] * pad  # padding rows: no query
    step = StepMetadata(routing, eviction, [max(lens)] * L, qsl)
    bt = torch.cat([kv.block_table, torch.zeros(pad, kv.block_table.shape[1],
                                                dtype=torch.int32)])
    md = SimpleNamespace(num_actual_tokens=graph_rows, max_query_len=1,
                         max_seq_len=max(lens), query_start_loc=torch.tensor(qsl,
                                                                             dtype=torch.int32),
                         seq_lens=torch.tensor([*lens, *[0] * pad], dtype=torch.int32),
                         block_table=bt, step=step)
    # a calibrated row's query close to its q_ref on some heads, so that both outcomes occur
    q = torch.randn(L, graph_rows, HQ, D, generator=gen)
    for i in range(rows):
        st = rt._states.get(ids[i])
        for li, c in (st.layers.items() if st else ()):
            q[li, i, :2] = c.q_ref[:2] + 0.01 * torch.randn(2, D, generator=gen)
    return kv, md, q, rt


def _layer(li: int):
    return SimpleNamespace(_flux_layer_idx=li)


def _eager(kv, md, q, rt, monkeypatch) -> tuple[torch.Tensor, int, int]:
    monkeypatch.setattr(attention, "get_runtime", lambda: rt)
    out = torch.full_like(q, float("nan"))
    # eager steps (piecewise graphs) see the step's own tokens, without the padding
    md = SimpleNamespace(**{**vars(md), "num_actual_tokens": md.step.query_start_loc[-1]})
    for li in range(L):
        attention.attend(_layer(li), q[li], kv.kv_cache, md, 0.25, out[li])
    rt._reduce_hits()
    return out, rt._checks, int(rt._hits.item()) if rt._hits is not None else 0


@pytest.mark.parametrize("triton", [False, pytest.param(True, marks=needs_triton)])
def test_captured_views_replay_every_step_as_the_eager_path(monkeypatch, triton):
    if not triton:
        monkeypatch.delenv("FLUXSERVE_FORCE_TRITON", raising=False)
    graph_rows = 8
    gi = graph_inputs.GraphInputs(L, graph_rows, HQ, D, torch.float32, "cpu")
    # "capture": the views the captured calls hold, taken before any step is written
    captured = [gi.layer(li, graph_rows) for li in range(L)]
    ptrs = [t.data_ptr() for v in captured for t in (v.sink, v.window, v.kept_end, v.gap_end,
                                                      v.hits, v.calibration.q_ref)]
    for seed, rows in ((1, 5), (2, 8), (3, 3), (4, 6)):
        kv, md, q, rt = _batch(seed, rows, graph_rows)
        want, checks, hits = _eager(kv, md, q, rt, monkeypatch)
        rt_graph = KVPolicyRuntime()
        rt_graph._states = rt._states
        gi.write_step(md.step, graph_rows, rt_graph)
        got = torch.full_like(q, float("nan"))
        for li in range(L):
            v = captured[li]
            ops.paged_attention(q[li], kv.kv_cache, md.block_table, md.seq_lens,
                                md.query_start_loc, 0.25, sink=v.sink, window=v.window,
                                kept_end=v.kept_end, gap_end=v.gap_end,
                                calibration=v.calibration, out=got[li], max_query_len=1,
                                hits_out=v.hits)
        tol = 2e-3 if triton else 1e-5
        torch.testing.assert_close(got[:, :rows], want[:, :rows], rtol=tol, atol=tol)
        assert not got[:, :rows].isnan().any()
        # the hits of the step are counted once its buffers are about to be written again
        gi.flush_hits(rt_graph)
        rt_graph._reduce_hits()
        got_hits = int(rt_graph._hits.item()) if rt_graph._hits is not None else 0
        assert (rt_graph._checks, got_hits) == (checks, hits)
        gi.flush_hits(rt_graph)  # nothing pending: counted once
        assert rt_graph._checks == checks
    assert ptrs == [t.data_ptr() for v in (gi.layer(li, graph_rows) for li in range(L))
                    for t in (v.sink, v.window, v.kept_end, v.gap_end, v.hits,
                              v.calibration.q_ref)]


def test_attend_graph_runs_the_layers_views(monkeypatch):
    monkeypatch.delenv("FLUXSERVE_FORCE_TRITON", raising=False)
    kv, md, q, rt = _batch(7, 6, 8)
    want, _, _ = _eager(kv, md, q, rt, monkeypatch)
    gi = graph_inputs.GraphInputs(L, 8, HQ, D, torch.float32, "cpu")
    gi.write_step(md.step, 8, rt)
    gmd = SimpleNamespace(**{**vars(md), "graph": gi})
    got = torch.full_like(q, float("nan"))
    for li in range(L):
        attention.attend_graph(_layer(li), q[li], kv.kv_cache, gmd, 0.25, got[li])
    torch.testing.assert_close(got[:, :6], want[:, :6], rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="one query token per row"):
        attention.attend_graph(_layer(0), q[0, :5], kv.kv_cache, gmd, 0.25, got[0, :5])


def test_a_capture_step_is_all_full_attention(monkeypatch):
    """``write_step(None)`` (warm-up and capture: no rows) clears what an earlier step left:
    every row full attention, nothing evicted, no calibration."""
    monkeypatch.delenv("FLUXSERVE_FORCE_TRITON", raising=False)
    kv, md, q, rt = _batch(11, 8, 8)
    gi = graph_inputs.GraphInputs(L, 8, HQ, D, torch.float32, "cpu")
    gi.write_step(md.step, 8, rt)
    gi.write_step(None, 8, rt)
    assert not gi.masks[:, :8].any() and not gi.enabled.any()
    with pytest.raises(ValueError, match="rows"):
        gi.write_step(None, 9, rt)


def test_an_unchanged_batch_copies_nothing(monkeypatch):
    """A run of decode steps of one batch (the same step parts, the runtime's same calibration
    objects) writes the buffers once."""
    monkeypatch.delenv("FLUXSERVE_FORCE_TRITON", raising=False)
    kv, md, q, rt = _batch(5, 6, 8)
    gi = graph_inputs.GraphInputs(L, 8, HQ, D, torch.float32, "cpu")
    gi.write_step(md.step, 8, rt)
    gi.masks.fill_(-7)
    gi.q_ref.fill_(3.0)
    gi.write_step(md.step, 8, rt)  # same parts: untouched
    assert bool((gi.masks == -7).all()) and bool((gi.q_ref == 3.0).all())
    md.step.routing = RoutingStep(**{f: getattr(md.step.routing, f)
                                     for f in ("req_ids", "sparse", "sink", "window",
                                               "route_rows", "num_layers")})
    gi.write_step(md.step, 8, rt)  # a new routing part: rewritten
    assert not bool((gi.masks[:, :8] == -7).any())
