"""The CUDA graph mode of a step (vllm_glue.metadata.graph_constraint and the runner hooks).

A FULL graph replays the dense kernels it captured, so a step whose rows need our kernels must
never replay one, and a step that routes ``auto`` requests must run no graph (its router runs
Python inside the graph pieces). The hooks are exercised on stand-ins of vLLM's runner and
dispatcher; the real ones run on the GPU (benchmarks/gpu_serving.py, docs/benchmarks.md).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_backends.flux.request_state import BatchRow, FluxRegistry
from attention_backends.flux.router import RouterSpec
from attention_backends.vllm_glue import metadata
from attention_backends.vllm_glue import vllm_private as vp
from kv_policies.eviction.runtime import KVPolicyRuntime

LAYERS, BLOCK = 4, 16

OPTIONS = {
    "none": None,
    "full": {"flux": {"mode": "full"}},
    "sparse": {"flux": {"mode": "sparse", "sink": 4, "window": 32}},
    "layers": {"flux": {"mode": "layers", "sparse_layers": [1]}},
    "layers-empty": {"flux": {"mode": "layers", "sparse_layers": []}},
    "auto": {"flux": {"mode": "auto"}},
    "snapkv": {"kv_policy": {"name": "snapkv", "budget": 64, "window": 8}},
    "snapkv-short": {"kv_policy": {"name": "snapkv", "budget": 4096, "window": 8}},
    "sparse+calidrop": {"flux": {"mode": "sparse"},
                        "kv_policy": {"name": "calidrop", "budget": 64, "window": 8}},
}
# (no q_lens: a planned row counts as compressing in the step)
EXPECTED = {"none": None, "full": None, "sparse": metadata.OUR_FULL,
            "layers": metadata.OUR_FULL, "layers-empty": metadata.OUR_FULL,
            "auto": metadata.EAGER, "snapkv": metadata.NO_FULL, "snapkv-short": None,
            "sparse+calidrop": metadata.NO_FULL}


def _registry(router: bool = True) -> FluxRegistry:
    reg = FluxRegistry()
    if router:
        reg.set_routers({i: object() for i in range(LAYERS)}, RouterSpec())
    return reg


def _row(name: str, i: int, prompt_len: int = 300, computed: int = 0) -> BatchRow:
    return BatchRow(f"req-{name}-{i}", prompt_len, computed, OPTIONS[name])


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_each_option_alone(name):
    got = metadata.graph_constraint([_row(name, 0)], LAYERS, BLOCK, _registry(),
                                    KVPolicyRuntime())
    assert got == EXPECTED[name]


def test_an_auto_request_once_routed_leaves_the_eager_mode():
    reg = _registry()
    row = _row("auto", 0)
    assert metadata.graph_constraint([row], LAYERS, BLOCK, reg, KVPolicyRuntime()) == "eager"
    for layer in range(LAYERS):  # what route_layer records during the routing step
        reg.record_decision(row.req_id, layer, layer == 2, LAYERS)
    assert metadata.graph_constraint([row], LAYERS, BLOCK, reg, KVPolicyRuntime()) == "our_full"


def test_auto_without_a_router_runs_full_and_eviction_off_without_block_size():
    assert metadata.graph_constraint([_row("auto", 0)], LAYERS, BLOCK, _registry(False),
                                     KVPolicyRuntime()) is None
    assert metadata.graph_constraint([_row("snapkv", 0)], LAYERS, None, _registry(),
                                     KVPolicyRuntime()) is None


def test_one_row_decides_for_the_batch_and_padding_is_skipped():
    rows = [_row("none", 0), None, _row("full", 1), _row("sparse", 2), _row("auto", 3)]
    assert metadata.graph_constraint(rows, LAYERS, BLOCK, _registry(),
                                     KVPolicyRuntime()) == "eager"
    assert metadata.graph_constraint(rows[:4], LAYERS, BLOCK, _registry(),
                                     KVPolicyRuntime()) == "our_full"
    assert metadata.graph_constraint(rows[:3], LAYERS, BLOCK, _registry(),
                                     KVPolicyRuntime()) is None
    # a planned row compressing in the step keeps the whole batch off FULL graphs
    assert metadata.graph_constraint([*rows[:4], _row("snapkv", 4)], LAYERS, BLOCK,
                                     _registry(), KVPolicyRuntime(),
                                     q_lens=[1, 0, 1, 1, 300]) == "no_full"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(OPTIONS)), st.integers(1, 600),
                          st.integers(0, 700), st.integers(1, 64)), min_size=1, max_size=6))
def test_every_step_with_our_metadata_is_kept_off_full_graphs(spec):
    """The hook's pre-check is a superset of the steps whose metadata is not None (those run
    our kernels): a FULL graph is never replayed for one of them."""
    rows, q_lens = [], []
    for i, (name, prompt_len, computed, q_len) in enumerate(spec):
        computed = min(computed, prompt_len + 50)
        rows.append(BatchRow(f"r{i}", prompt_len, computed, OPTIONS[name]))
        q_lens.append(q_len)
    qsl = torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32)
    reg, rt = _registry(), KVPolicyRuntime()
    need = metadata.graph_constraint(rows, LAYERS, BLOCK, reg, rt, q_lens=q_lens)
    step = metadata.build_step_metadata(len(rows), qsl, rows, reg, LAYERS, BLOCK, rt,
                                        none_when_dense=True)
    if step is not None:
        assert need in ("eager", "no_full", "our_full")
    if step is not None and step.routing.route_rows:
        assert need == "eager"
    if step is not None and step.eviction.compress_rows:  # compression runs Python: no FULL
        assert need in ("eager", "no_full")


@pytest.mark.parametrize(("computed", "q_len", "expected"), [
    (0, 128, None),  # a prompt chunk before the last: plain dense attention
    (128, 100, None),
    (128, 172, "no_full"),  # the prompt completes: this step compresses
    (300, 1, "our_full"),  # decoding over compressed KV: our FULL graph
])
def test_a_planned_request_needs_our_kernels_from_its_last_prompt_chunk(computed, q_len,
                                                                         expected):
    rows = [_row("snapkv", 0, prompt_len=300, computed=computed)]
    reg, rt = _registry(), KVPolicyRuntime()
    assert metadata.graph_constraint(rows, LAYERS, BLOCK, reg, rt, q_lens=[q_len]) == expected
    qsl = torch.tensor([0, q_len], dtype=torch.int32)
    step = metadata.build_step_metadata(1, qsl, rows, reg, LAYERS, BLOCK, rt,
                                        none_when_dense=True)
    assert (step is None) == (expected is None)


def test_check_graph_mode_fails_a_step_with_our_rows_on_a_full_graph():
    step = object()
    metadata.note_graph(metadata.VLLM_FULL)
    try:
        metadata.check_graph_mode(None)  # dense: the captured kernels are right
        with pytest.raises(RuntimeError, match="FULL CUDA graph"):
            metadata.check_graph_mode(step)
    finally:
        metadata.note_graph(None)
    metadata.check_graph_mode(step)
    metadata.note_graph(metadata.OUR_FULL)  # ours: captured with our kernel
    try:
        metadata.check_graph_mode(step)
    finally:
        metadata.note_graph(None)


# -- the runner and dispatcher hooks, on stand-ins


class _Mode:
    def __init__(self, name: str) -> None:
        self.name = name


class _Dispatcher:
    def __init__(self) -> None:
        self.calls: list[dict] = []

    def dispatch(self, num_tokens, uniform_decode=False, has_lora=False, num_active_loras=0,
                 valid_modes=None, invalid_modes=None):
        self.calls.append(dict(valid_modes=valid_modes, invalid_modes=invalid_modes))
        from vllm.config import CUDAGraphMode

        if valid_modes == {CUDAGraphMode.NONE}:
            return CUDAGraphMode.NONE, None
        if invalid_modes and CUDAGraphMode.FULL in invalid_modes:
            return CUDAGraphMode.PIECEWISE, None
        return CUDAGraphMode.FULL, None


def _runner(names: list[str], graphs: str = "FULL_AND_PIECEWISE"):
    req_ids = [f"hook-{n}-{i}" for i, n in enumerate(names)]
    requests = {rid: SimpleNamespace(num_prompt_tokens=300,
                                     sampling_params=SimpleNamespace(extra_args=OPTIONS[n]))
                for rid, n in zip(req_ids, names, strict=True)}
    dispatcher = SimpleNamespace(dispatch=None)
    d = _Dispatcher()
    dispatcher.dispatch = vp._make_dispatch(_Dispatcher.dispatch).__get__(d)

    def orig(self, num_tokens, num_reqs, *a, force_eager=False, **kw):
        from vllm.config import CUDAGraphMode

        mode, _ = self.cudagraph_dispatcher.dispatch(
            num_tokens, valid_modes={CUDAGraphMode.NONE} if force_eager else None,
            invalid_modes=None)
        return mode, None, False, None, None

    runner = SimpleNamespace(
        input_batch=SimpleNamespace(req_ids=req_ids,
                                    num_computed_tokens_cpu=np.zeros(len(names), np.int32)),
        requests=requests, cudagraph_dispatcher=dispatcher,
        compilation_config=SimpleNamespace(cudagraph_mode=_Mode(graphs)),
        cache_config=SimpleNamespace(block_size=BLOCK),
        vllm_config=SimpleNamespace(model_config=SimpleNamespace(
            hf_text_config=SimpleNamespace(num_hidden_layers=LAYERS))))
    return runner, vp._make_determine_batch_execution(orig), d


@pytest.fixture
def clean_registry(monkeypatch):
    from attention_backends.flux import request_state

    reg = _registry()
    monkeypatch.setattr(request_state, "_REGISTRY", reg)
    monkeypatch.setattr(metadata, "get_registry", lambda: reg)
    rt = KVPolicyRuntime()
    monkeypatch.setattr(metadata, "get_runtime", lambda: rt)
    yield reg
    metadata.note_graph(None)
    vp._STEP_ROWS = None


@pytest.mark.parametrize(("names", "mode"), [
    (["none", "full"], "FULL"),
    (["none", "sparse"], "PIECEWISE"),
    (["snapkv"], "PIECEWISE"),
    (["none", "auto", "sparse"], "NONE"),
])
def test_the_runner_hook_picks_the_mode(clean_registry, names, mode):
    runner, wrapped, d = _runner(names)
    got = wrapped(runner, 8, len(names))
    assert got[0].name == mode
    assert metadata.graph_kind() == (metadata.VLLM_FULL if mode == "FULL" else None)
    # the rows it read are handed to the metadata hook of the same step, once
    assert [r.req_id for r in vp._step_rows(runner)] == runner.input_batch.req_ids
    assert vp._STEP_ROWS is None
    # the dispatcher's own flag is down again after the step
    assert vp._NEED is None


def test_without_graphs_the_hook_reads_nothing(clean_registry):
    runner, wrapped, d = _runner(["sparse"], graphs="NONE")
    runner.input_batch = None  # would fail if read
    wrapped(runner, 8, 1)
    assert metadata.graph_kind() is None and vp._STEP_ROWS is None


# -- our FULL graphs: their keys, their dispatch, their capture


def _keys_dispatcher(sizes: list[int]):
    """A stand-in of vLLM's dispatcher holding FULL uniform decode keys of ``sizes`` and the
    piecewise keys, whose ``dispatch`` returns the FULL key of a uniform batch when FULL is
    allowed and that key exists (vLLM's rule), else PIECEWISE."""
    from vllm.config import CUDAGraphMode
    from vllm.forward_context import BatchDescriptor

    class D:
        def __init__(self) -> None:
            self.vllm_config = object()
            self.cudagraph_keys = {CUDAGraphMode.PIECEWISE: set(), CUDAGraphMode.FULL: set()}

        def initialize_cudagraph_keys(self, cudagraph_mode, uniform_decode_query_len=1):
            for n in sizes:
                self.cudagraph_keys[CUDAGraphMode.FULL].add(
                    BatchDescriptor(num_tokens=n, num_reqs=n, uniform=True))
                self.cudagraph_keys[CUDAGraphMode.PIECEWISE].add(BatchDescriptor(num_tokens=n))

        def dispatch(self, num_tokens, uniform_decode=False, has_lora=False,
                     num_active_loras=0, valid_modes=None, invalid_modes=None):
            desc = BatchDescriptor(num_tokens=num_tokens, num_reqs=num_tokens, uniform=True)
            if (uniform_decode and not (invalid_modes and CUDAGraphMode.FULL in invalid_modes)
                    and desc in self.cudagraph_keys[CUDAGraphMode.FULL]):
                return CUDAGraphMode.FULL, desc
            return CUDAGraphMode.PIECEWISE, BatchDescriptor(num_tokens=num_tokens)

    D.initialize_cudagraph_keys = vp._make_initialize_cudagraph_keys(
        D.initialize_cudagraph_keys)
    D.dispatch = vp._make_dispatch(D.dispatch)
    return D()


@pytest.mark.parametrize("max_rows", [0, 4, 64])
def test_our_keys_sit_next_to_vllms_up_to_the_buffers_rows(monkeypatch, max_rows):
    from vllm.config import CUDAGraphMode

    from attention_backends.vllm_glue import backend_gpu

    monkeypatch.setattr(backend_gpu, "our_graph_rows", lambda cfg: max_rows)
    d = _keys_dispatcher([1, 2, 4, 8])
    d.initialize_cudagraph_keys(CUDAGraphMode.FULL_AND_PIECEWISE, 1)
    full = d.cudagraph_keys[CUDAGraphMode.FULL]
    ours = sorted(k.num_reqs for k in full if isinstance(k, vp.our_descriptor_cls()))
    assert ours == [n for n in (1, 2, 4, 8) if n <= max_rows]
    assert sum(not isinstance(k, vp.our_descriptor_cls()) for k in full) == 4  # vLLM's kept
    # an equal-field descriptor of vLLM's is a different key
    vllm_key = next(k for k in full if not isinstance(k, vp.our_descriptor_cls()))
    assert vp._ours(vllm_key) != vllm_key and vp._ours(vllm_key) == vp._ours(vllm_key)
    # speculative decoding (several tokens a row): none of ours
    d2 = _keys_dispatcher([1, 2])
    d2.initialize_cudagraph_keys(CUDAGraphMode.FULL_AND_PIECEWISE, 2)
    assert not any(isinstance(k, vp.our_descriptor_cls())
                   for k in d2.cudagraph_keys[CUDAGraphMode.FULL])
    # and none where vLLM captures no FULL decode graphs
    d3 = _keys_dispatcher([1, 2])
    d3.initialize_cudagraph_keys(CUDAGraphMode.PIECEWISE, 1)
    assert not any(isinstance(k, vp.our_descriptor_cls())
                   for k in d3.cudagraph_keys[CUDAGraphMode.FULL])


@pytest.mark.parametrize(("need", "num_tokens", "uniform", "expected"), [
    (None, 4, True, "vllm"),  # no rows of ours: vLLM's FULL graph
    ("our_full", 4, True, "ours"),  # a uniform decode batch with our graph of its size
    ("our_full", 8, True, "PIECEWISE"),  # no graph of ours that large
    ("our_full", 4, False, "PIECEWISE"),  # a mixed batch
    ("no_full", 4, True, "PIECEWISE"),  # compressing in the step
])
def test_dispatch_of_a_step_with_our_rows(monkeypatch, need, num_tokens, uniform, expected):
    from vllm.config import CUDAGraphMode

    from attention_backends.vllm_glue import backend_gpu

    monkeypatch.setattr(backend_gpu, "our_graph_rows", lambda cfg: 4)
    d = _keys_dispatcher([1, 2, 4, 8])
    d.initialize_cudagraph_keys(CUDAGraphMode.FULL_AND_PIECEWISE, 1)
    monkeypatch.setattr(vp, "_NEED", need)
    mode, desc = d.dispatch(num_tokens, uniform_decode=uniform)
    if expected == "PIECEWISE":
        assert mode == CUDAGraphMode.PIECEWISE
    else:
        assert mode == CUDAGraphMode.FULL
        assert isinstance(desc, vp.our_descriptor_cls()) is (expected == "ours")


def test_a_uniform_decode_step_with_our_rows_replays_our_graph(clean_registry, monkeypatch):
    """The runner hook records which FULL graph the step replays, for the metadata builder."""
    from vllm.config import CUDAGraphMode

    from attention_backends.vllm_glue import backend_gpu

    monkeypatch.setattr(backend_gpu, "our_graph_rows", lambda cfg: 8)
    runner, wrapped, _ = _runner(["none", "sparse"])
    d = _keys_dispatcher([2, 4])
    d.initialize_cudagraph_keys(CUDAGraphMode.FULL_AND_PIECEWISE, 1)
    runner.cudagraph_dispatcher = d

    def orig(self, num_tokens, num_reqs, *a, force_eager=False, **kw):
        mode, desc = self.cudagraph_dispatcher.dispatch(num_tokens, uniform_decode=True)
        return mode, desc, False, None, None

    from attention_backends.flux import metrics

    def count(graph):
        return metrics.OPTION_STEPS.labels(graph)._value.get()

    before = count("full")
    wrapped = vp._make_determine_batch_execution(orig)
    out = wrapped(runner, 2, 2)
    assert isinstance(out[1], vp.our_descriptor_cls())
    assert metadata.graph_kind() == metadata.OUR_FULL
    assert count("full") == before + 1  # fluxserve:steps_with_options_total{cuda_graph=full}
    runner.input_batch.req_ids = ["none-a", "none-b"]  # requests without options: vLLM's
    runner.requests = {r: SimpleNamespace(num_prompt_tokens=300,
                                          sampling_params=SimpleNamespace(extra_args=None))
                       for r in runner.input_batch.req_ids}
    out = wrapped(runner, 2, 2)
    assert not isinstance(out[1], vp.our_descriptor_cls())
    assert metadata.graph_kind() == metadata.VLLM_FULL
    assert count("full") == before + 1  # steps without our rows are not counted


def test_the_capture_of_our_graph_builds_in_graph_mode(clean_registry):
    """While vLLM warms up and captures one of our graphs, every dummy run of it dispatches our
    key and the builder is told to build graph inputs (no rows are read); vLLM's own captures
    are left alone."""
    from vllm.forward_context import BatchDescriptor

    runner, _, _ = _runner(["sparse"])
    runner.input_batch = None  # the capture reads no rows
    seen = []

    def determine(self, num_tokens, num_reqs, *a, **kw):
        seen.append(vp._NEED)
        return _Mode("FULL"), None, False, None, None

    hook = vp._make_determine_batch_execution(determine)

    def warmup_and_capture(self, desc, cudagraph_runtime_mode, **kw):
        hook(self, desc.num_tokens, desc.num_reqs)
        seen.append(metadata.graph_kind())

    capture = vp._make_warmup_and_capture(warmup_and_capture)
    capture(runner, vp._ours(BatchDescriptor(num_tokens=4, num_reqs=4, uniform=True)), "FULL")
    assert seen == [metadata.OUR_FULL, metadata.OUR_FULL] and vp._CAPTURING_OURS is False
    seen.clear()
    runner.input_batch = SimpleNamespace(req_ids=[], num_computed_tokens_cpu=np.zeros(0))
    capture(runner, BatchDescriptor(num_tokens=4, num_reqs=4, uniform=True), "FULL")
    assert seen == [None, metadata.VLLM_FULL]
