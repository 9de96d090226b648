"""Unit tests (no engine): router vs an independent reference, router files, per-step metadata,
and the shared attention step (the GPU backend's forward) on CPU tensors."""

from __future__ import annotations

import json

import pytest
import torch

from attention_backends.flux.options import FluxOptions
from attention_backends.flux.request_state import BatchRow, FluxRegistry
from attention_backends.flux.router import (
    FluxRouter,
    RouterSpec,
    load_router_file,
    pooled_sum,
    router_available,
    split_router_state,
)
from attention_backends.flux.step import build_routing_step
from attention_backends.vllm_glue.metadata import build_step_metadata
from tests.flux.reference import reference_router_sparse
from tests.flux.tiny_models import HEAD_DIM, NUM_LAYERS, make_router, router_tensors


def _routers_from(tensors) -> dict[int, FluxRouter]:
    out = {}
    for layer, sd in split_router_state(tensors).items():
        r = FluxRouter(HEAD_DIM)
        r.load_state_dict(sd)
        out[layer] = r
    return out


@pytest.mark.parametrize("n", [1, 7, 16, 20, 31, 32, 33, 500])
def test_router_matches_reference(n):
    tensors = router_tensors(seed=3)
    routers = _routers_from(tensors)
    g = torch.Generator().manual_seed(n)
    pool = 16
    seen = set()
    for trial in range(8):
        q = torch.randn(n, 4, HEAD_DIM, generator=g) * (1 + trial)
        for layer in range(NUM_LAYERS):
            s, c = pooled_sum(q, pool)
            ours = bool(routers[layer].decide_sparse((s / c)[None])[0])
            ref, margin = reference_router_sparse(tensors, layer, q, pool)
            if margin > 1e-4:  # float32 vs float64: only exact ties may differ
                assert ours == ref, (n, trial, layer)
            seen.add(ours)
    assert seen == {True, False}, "random routers should produce both decisions"


def test_tensor_parallel_feature_reduction():
    """Each rank sums its heads; the summed features divided by the total count equal the
    single-rank feature, so every rank takes the same decision."""
    q = torch.randn(300, 8, HEAD_DIM)
    s_full, c_full = pooled_sum(q, 150)
    s0, c0 = pooled_sum(q[:, :4], 150)
    s1, c1 = pooled_sum(q[:, 4:], 150)
    torch.testing.assert_close((s0 + s1) / (c0 * 2), s_full / c_full)
    assert c0 == c1


def test_one_output_router():
    r = FluxRouter(8, num_outputs=1)
    with torch.no_grad():
        for m in r.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.zero_()
                m.bias.zero_()
        r.cls_router_head_agnostic[4].bias.fill_(1.0)
    assert not bool(r.decide_sparse(torch.zeros(1, 8))[0])  # positive logit: full
    r.cls_router_head_agnostic[4].bias.data.fill_(-1.0)
    assert bool(r.decide_sparse(torch.zeros(1, 8))[0])


def test_router_file_roundtrip_and_availability(tmp_path):
    d = make_router(tmp_path / "router")
    routers, spec = load_router_file(d)
    assert sorted(routers) == list(range(NUM_LAYERS))
    assert (spec.pool_size, spec.sink, spec.window, spec.num_outputs) == (16, 8, 32, 2)
    assert router_available(None, d)
    assert router_available(None, d / "router.safetensors")
    assert not router_available(None, tmp_path / "missing")
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert not router_available(model, None)
    (model / "config.json").write_text(json.dumps({"architectures": ["PawQwen3ForCausalLM"]}))
    assert router_available(model, None)


def test_spec_from_checkpoint_config():
    spec = RouterSpec.from_config({"pool_size": 150, "sink_size": 0, "local_window_size": 4096,
                                   "use_softmax": False})
    assert (spec.pool_size, spec.sink, spec.window, spec.num_outputs) == (150, 0, 4096, 1)
    assert RouterSpec.from_config({}).num_outputs == 2


def test_flux_options():
    assert FluxOptions().mode == "full"
    with pytest.raises(ValueError):
        FluxOptions(mode="layers")
    with pytest.raises(ValueError):
        FluxOptions(mode="sparse", sparse_layers=[1])
    with pytest.raises(ValueError):
        FluxOptions(mode="auto", extra=1)


def _rows(extra: dict, rows: list[tuple[str, int, int]]) -> list[BatchRow]:
    """The step's rows (req_id, prompt_len, num_computed) with each request's extra_args."""
    return [BatchRow(r, p, c, extra.get(r)) for r, p, c in rows]


def _registry(with_router: bool) -> FluxRegistry:
    reg = FluxRegistry()
    if with_router:
        reg.set_routers(_routers_from(router_tensors()), RouterSpec(16, 8, 32, 2))
    return reg


def test_metadata_modes_and_routing_rows():
    reg = _registry(with_router=True)
    extra = {
        "a": None,  # plain vLLM request: full
        "b": {"flux": {"mode": "sparse", "sink": 4, "window": 16}},
        "c": {"flux": {"mode": "layers", "sparse_layers": [1, 3, 9]}},
        "d": {"flux": {"mode": "auto"}},
    }
    rows = _rows(extra, [("a", 10, 0), ("b", 100, 0), ("c", 50, 0), ("d", 300, 0)])
    qsl = torch.tensor([0, 10, 110, 160, 288], dtype=torch.int32)
    fb = build_routing_step(5, torch.cat([qsl, qsl[-1:]]).tolist(), rows, reg, NUM_LAYERS)
    assert fb.req_ids == ["a", "b", "c", "d", None]  # row 4: padding
    assert fb.sparse[:, 0].tolist() == [False] * 4
    assert fb.sparse[:, 1].tolist() == [True] * 4
    assert fb.sparse[:, 2].tolist() == [False, True, False, True]
    assert fb.sink[1] == 4 and fb.window[1] == 16
    assert fb.sink[3] == 8 and fb.window[3] == 32  # auto: the router's config defaults
    assert [(r.row, r.q_start, r.q_len) for r in fb.route_rows] == [(3, 160, 128)]
    assert fb.prompt_done == [True, True, True, False, False]
    sink, window = fb.layer_window(1, torch.device("cpu"))
    assert window.tolist() == [0, 16, 32, 0, 0]  # layer 1: b (sparse), c (listed); d pending
    assert fb.layer_window_host(1) == (sink.tolist(), window.tolist())
    # Routing this step fixes the decision; the next chunk and decode reuse it.
    for layer in range(NUM_LAYERS):
        reg.record_decision("d", layer, layer % 2 == 0, NUM_LAYERS)
    fb2 = build_routing_step(1, [0, 128], _rows(extra, [("d", 300, 128)]), reg, NUM_LAYERS)
    assert fb2.route_rows == []
    assert fb2.sparse[:, 0].tolist() == [True, False, True, False]
    reg.release("d")
    assert "d" not in reg.states


def test_max_kv_tokens_bounds_every_rows_visible_keys():
    reg = _registry(with_router=False)
    extra = {
        "a": {"flux": {"mode": "sparse", "sink": 4, "window": 16}},
        "b": {"flux": {"mode": "layers", "sparse_layers": [1], "sink": 4, "window": 8}},
        "c": {"kv_policy": {"name": "calidrop", "budget": 64, "window": 8}},
    }
    # decode step: one token each; c's 500-token prompt was compressed to 64 kept slots
    rows = _rows(extra, [("a", 999, 999), ("b", 199, 199), ("c", 500, 500)])
    qsl = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    fb = build_step_metadata(3, qsl, rows, reg, 2, block_size=16)
    # layer 0: b runs full over its 200 keys; layer 1: a 21, b 13, c 64 + 1
    assert fb.max_kv_tokens == [200, 65]
    fb_ab = build_step_metadata(2, qsl[:3], rows, reg, 2, block_size=16)
    assert fb_ab.max_kv_tokens == [200, 21]


def test_decode_steps_of_one_batch_reuse_the_routing_tensors():
    """Consecutive steps over the same requests share the decision tensors (no rebuild per
    step); a step with another batch, or with a row being routed, builds its own."""
    reg = _registry(with_router=True)
    extra = {"a": {"flux": {"mode": "sparse", "sink": 4, "window": 16}}, "b": None,
             "d": {"flux": {"mode": "auto"}}}
    rows = _rows(extra, [("a", 50, 50), ("b", 40, 40)])
    s1 = build_routing_step(2, [0, 1, 2], rows, reg, NUM_LAYERS)
    s2 = build_routing_step(2, [0, 1, 2], _rows(extra, [("a", 50, 51), ("b", 40, 41)]), reg,
                            NUM_LAYERS)
    assert s2.sparse is s1.sparse and s2.window is s1.window
    assert s2.sparse[:, 0].all() and not s2.sparse[:, 1].any()
    swapped = build_routing_step(2, [0, 1, 2], _rows(extra, [("b", 40, 42), ("a", 50, 52)]),
                                 reg, NUM_LAYERS)
    assert swapped.sparse is not s1.sparse and swapped.sparse[:, 1].all()
    assert swapped.window[1] == 16 and swapped.window[0] == s1.window[1]
    routed = build_routing_step(3, [0, 1, 2, 130],
                                _rows(extra, [("b", 40, 43), ("a", 50, 53), ("d", 300, 0)]),
                                reg, NUM_LAYERS)
    routed.set_decisions(0, [True])
    again = build_routing_step(2, [0, 1, 2], _rows(extra, [("b", 40, 44), ("a", 50, 54)]), reg,
                               NUM_LAYERS)
    assert again.sparse is not routed.sparse and not again.sparse[:, 0].any()


def test_auto_without_router_runs_full():
    reg = _registry(with_router=False)
    fb = build_routing_step(1, [0, 400], [BatchRow("x", 400, 0, {"flux": {"mode": "auto"}})],
                            reg, NUM_LAYERS)
    assert fb.route_rows == [] and not bool(fb.sparse.any())
    assert reg.states["x"].mode == "full"


def _dense_masked(q, k, v, pos, sink, window, scale):
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, 1)
    v = v.repeat_interleave(g, 1)
    j = torch.arange(k.shape[0])[None]
    vis = j <= pos[:, None]
    if window > 0:
        vis &= (j < sink) | (j > pos[:, None] - window)
    s = torch.einsum("thd,shd->hts", q, k) * scale
    s = s.masked_fill(~vis[None], float("-inf"))
    return torch.einsum("hts,shd->thd", torch.softmax(s, -1), v)


def test_gpu_backend_step_on_cpu_tensors():
    """The CUSTOM backend's KV write + attention with a FluxBatch, run on CPU tensors (the
    ops dispatch to the float32 reference), against a dense masked reference."""
    from types import SimpleNamespace

    from attention_backends.vllm_glue.attention import run_attention, write_kv
    from attention_backends.vllm_glue.backend_gpu import FluxGPUMetadata

    torch.manual_seed(0)
    hq, hkv, d, bs = 4, 2, 16, 8
    lens = [40, 5]  # request 0: prefill chunk of 40; request 1: prefill of 5
    kv_cache = torch.zeros(16, hkv, bs, 2 * d)
    block_table = torch.tensor([[3, 7, 1, 9, 4, 0], [5, 2, 0, 0, 0, 0]], dtype=torch.int32)
    slots = [int(block_table[0, p // bs]) * bs + p % bs for p in range(40)]
    slots += [int(block_table[1, p // bs]) * bs + p % bs for p in range(5)]
    t = sum(lens)
    q, k, v = torch.randn(t, hq, d), torch.randn(t, hkv, d), torch.randn(t, hkv, d)
    write_kv(k, v, kv_cache, torch.tensor(slots))
    reg = _registry(with_router=False)
    extra = {"s": {"flux": {"mode": "sparse", "sink": 3, "window": 7}}, "f": None}
    qsl = torch.tensor([0, 40, 45], dtype=torch.int32)
    fb = build_step_metadata(2, qsl, _rows(extra, [("s", 40, 0), ("f", 5, 0)]), reg, 2)
    md = FluxGPUMetadata(t, 40, 40, qsl, torch.tensor(lens, dtype=torch.int32), block_table,
                         torch.tensor(slots), fb)
    layer = SimpleNamespace(layer_name="model.layers.1.self_attn.attn")
    out = torch.empty(t, hq, d)
    run_attention(layer, q, kv_cache, md, d ** -0.5, out)
    ref0 = _dense_masked(q[:40], k[:40], v[:40], torch.arange(40), 3, 7, d ** -0.5)
    ref1 = _dense_masked(q[40:], k[40:], v[40:], torch.arange(5), 0, 0, d ** -0.5)
    torch.testing.assert_close(out[:40], ref0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[40:], ref1, rtol=1e-4, atol=1e-5)


def test_prefix_cache_salt():
    from attention_backends.flux.prefix_cache import flux_cache_salt, salted

    assert flux_cache_salt(None, "r1") is None
    assert flux_cache_salt({"mode": "full"}, "r1") is None
    a = flux_cache_salt({"mode": "layers", "sparse_layers": [3, 1], "sink": None,
                         "window": None}, "r1")
    assert a == flux_cache_salt({"mode": "layers", "sparse_layers": [1, 3]}, "r2")
    assert a != flux_cache_salt({"mode": "sparse"}, "r1")
    assert flux_cache_salt({"mode": "auto"}, "r1") != flux_cache_salt({"mode": "auto"}, "r2")
    assert salted("user", "ours") == "user|ours" and salted(None, "ours") == "ours"
    assert salted("user", None) == "user"


def test_invalid_options_run_full():
    reg = _registry(with_router=True)
    st = reg.resolve("bad", {"flux": {"mode": "layers"}}, 10, NUM_LAYERS)
    assert st.mode == "full" and not bool(st.sparse.any())
