"""The attention accounting (attention_backends/flux/accounting.py): visible-key counts against
the kernels' visibility rule, exact FLOPs for a known routing and eviction, and the reports'
way from the worker's registry to the API process."""

from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_backends.flux.accounting import (
    REPORT_KEY,
    ROUTING_REPORTS_ATTR,
    AttentionShape,
    AttentionWork,
    EngineReport,
    EvictionReport,
    ReportInbox,
    RoutingReport,
    get_inbox,
    reports_for,
    sequence_work,
    sum_visible_keys,
    total_work,
    visible_keys,
)
from attention_backends.flux.request_state import FluxRegistry
from attention_backends.kernels.reference import visible_mask
from evaluation.long_context import attention_work_saved

SHAPE = AttentionShape(num_layers=4, num_heads=4, head_dim=64)  # 4·H·D = 1024 FLOPs per pair


@st.composite
def masks(draw):
    sink = draw(st.integers(0, 24))
    window = draw(st.sampled_from([0, draw(st.integers(1, 40))]))
    if draw(st.booleans()):
        kept_end, gap_end = 0, 0
    else:
        kept_end = draw(st.integers(0, 48))
        gap_end = kept_end + draw(st.integers(1, 48))
    p_lo = draw(st.integers(0, 100))
    p_hi = p_lo + draw(st.integers(0, 120))
    return sink, window, kept_end, gap_end, p_lo, p_hi


@settings(max_examples=300, deadline=None)
@given(masks())
def test_visible_key_sums_equal_the_kernel_mask(m):
    sink, window, kept_end, gap_end, p_lo, p_hi = m
    pos = torch.arange(p_lo, p_hi)
    mask = visible_mask(pos, torch.arange(max(p_hi, 1)), sink, window, kept_end, gap_end)
    per_query = mask.sum(1).tolist()
    assert [visible_keys(p, sink, window, kept_end, gap_end) for p in range(p_lo, p_hi)] == (
        per_query)
    assert sum_visible_keys(p_lo, p_hi, sink, window, kept_end, gap_end) == sum(per_query)


def test_long_sums_are_exact_and_closed_form():
    # dense causal: P(P+1)/2 pairs; sparse: at most sink + window keys per query
    assert sum_visible_keys(0, 1_000_000) == 1_000_000 * 1_000_001 // 2
    n = 1_000_000
    sparse = sum_visible_keys(0, n, sink=128, window=2048)
    assert sparse == sum(range(1, 2049)) + sum(min(128, p - 2047) for p in range(2048, n)) + (
        2048 * (n - 2048))


def test_exact_flops_of_a_known_routing_and_eviction():
    """P = 10 prompt tokens, C = 4 generated (3 decode queries at slots 10, 11, 12); layers 0
    and 2 sparse with sink 2 / window 3; slots [6, 10) evicted after the prompt.

    Per layer, visible (query, key) pairs:
    - dense prefill: 1 + 2 + ... + 10 = 55;
    - sparse prefill: 1, 2, 3, 4 (window 1..3 + sink 0), then 5 (window + sink 0, 1) for
      p = 4..9: 10 + 30 = 40;
    - dense decode, gap [6, 10): 11 - 4, 12 - 4, 13 - 4 = 24 (without the gap 11 + 12 + 13 = 36);
    - sparse decode, gap [6, 10): p = 10 sees 10 and sink 0, 1 (8, 9 are evicted): 3; p = 11
      sees 10, 11 and 0, 1: 4; p = 12 sees 10, 11, 12 and 0, 1: 5; so 12.
    Spent: 2 · (40 + 12) + 2 · (55 + 24) = 262 pairs; dense: 4 · (55 + 36) = 364 pairs.
    """
    report = EngineReport(RoutingReport((True, False, True, False), sink=2, window=3),
                          EvictionReport(kept_end=6, gap_end=10, kv_bytes_freed=4096))
    work = sequence_work(SHAPE, prompt_tokens=10, completion_tokens=4, report=report)
    assert work == AttentionWork(sparse_layers=2, total_layers=4, kv_tokens_kept=6,
                                 prompt_tokens=10, attention_flops=262 * 1024,
                                 attention_flops_dense=364 * 1024, kv_bytes_saved=4096)
    usage = work.to_usage()
    assert usage["attention_flops_saved"] == 102 * 1024
    assert usage["attention_work_saved"] == round(102 / 364, 6)
    # what `fluxserve eval` / `fluxserve bench` read is the same number
    assert attention_work_saved({"fluxserve": usage}) == usage["attention_work_saved"]
    assert attention_work_saved({"fluxserve": {k: v for k, v in usage.items()
                                               if k != "attention_work_saved"}}) == 102 / 364


def test_a_plain_request_saves_nothing():
    work = sequence_work(SHAPE, prompt_tokens=300, completion_tokens=20)
    assert work.sparse_layers == 0 and work.total_layers == 4
    assert work.kv_tokens_kept == work.prompt_tokens == 300
    assert work.attention_flops == work.attention_flops_dense == 1024 * 4 * (
        300 * 301 // 2 + sum(range(301, 320)))
    assert work.attention_flops_saved == 0 and work.kv_bytes_saved == 0
    assert work.to_usage()["attention_work_saved"] == 0.0
    # one generated token: no decode query
    one = sequence_work(SHAPE, prompt_tokens=5, completion_tokens=1)
    assert one.attention_flops == 1024 * 4 * 15


def test_sparse_with_a_window_covering_the_prompt_saves_nothing():
    report = EngineReport(RoutingReport((True,) * 4, sink=4, window=2048))
    work = sequence_work(SHAPE, prompt_tokens=500, completion_tokens=8, report=report)
    assert work.sparse_layers == 4 and work.attention_flops_saved == 0


def test_sums_over_sequences_and_bad_reports():
    a = sequence_work(SHAPE, 10, 4)
    b = sequence_work(SHAPE, 10, 2, EngineReport(RoutingReport((True,) * 4, 1, 2)))
    both = total_work([a, b])
    assert both.total_layers == 8 and both.sparse_layers == 4 and both.prompt_tokens == 20
    assert both.attention_flops == a.attention_flops + b.attention_flops
    assert total_work([]) == AttentionWork()
    assert AttentionWork().attention_work_saved == 0.0
    with pytest.raises(ValueError, match="3 layers"):
        sequence_work(SHAPE, 10, 2, EngineReport(RoutingReport((True,) * 3, 1, 2)))


def test_reports_round_trip_and_fall_back_across_sequences():
    routing = RoutingReport((True, False, False, True), 8, 16)
    eviction = EvictionReport(32, 100, 1 << 20)
    wire = {"routing": routing.to_wire(), "eviction": eviction.to_wire()}
    assert EngineReport.from_wire(pickle.loads(pickle.dumps(wire))) == EngineReport(routing,
                                                                                     eviction)
    assert EngineReport.from_wire(None) == EngineReport()
    got = reports_for({1: wire}, [0, 1, 2])  # n = 3 sequences of one prompt, one report
    assert got[0] == got[1] == got[2] == EngineReport(routing, eviction)
    assert reports_for({}, [0]) == {0: EngineReport()}


def test_the_inbox_keeps_only_expected_requests():
    inbox = ReportInbox()
    inbox.deliver("nobody-waits", 0, {"x": 1})
    assert len(inbox) == 0
    box = inbox.expect("req")
    inbox.deliver("req", 1, {"routing": None})
    assert box == {1: {"routing": None}}
    inbox.forget("req")
    assert len(inbox) == 0


def test_the_registry_reports_non_full_requests_once():
    reg = FluxRegistry()
    reg.resolve("plain", None, 100, 4)
    reg.resolve("full", {"flux": {"mode": "full"}}, 100, 4)
    reg.resolve("sparse", {"flux": {"mode": "sparse", "sink": 2, "window": 8}}, 100, 4)
    reg.resolve("layers", {"flux": {"mode": "layers", "sparse_layers": [1, 3]}}, 100, 4)
    reg.resolve("gone", {"flux": {"mode": "sparse"}}, 100, 4)
    reg.release("gone")
    reports = reg.take_routing_reports()
    assert set(reports) == {"sparse", "layers"}
    assert reports["sparse"] == {"sparse": [1, 1, 1, 1], "sink": 2, "window": 8}
    assert RoutingReport.from_wire(reports["layers"]).sparse == (False, True, False, True)
    assert reg.take_routing_reports() == {}
    reg.resolve("sparse", {"flux": {"mode": "sparse"}}, 100, 4)  # seen again: no new report
    assert reg.take_routing_reports() == {}


def test_the_worker_hook_attaches_reports_without_touching_the_shared_empty_output():
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

    from attention_backends.vllm_glue import vllm_private as vp

    reports = {"r1": RoutingReport((True,), 1, 2).to_wire()}
    out = vp._with_routing_reports(EMPTY_MODEL_RUNNER_OUTPUT, reports)
    assert out is not EMPTY_MODEL_RUNNER_OUTPUT
    assert not hasattr(EMPTY_MODEL_RUNNER_OUTPUT, ROUTING_REPORTS_ATTR)
    # the multiprocess executor pickles the output to the engine core: the reports go along
    sent = pickle.loads(pickle.dumps(out))
    assert getattr(sent, ROUTING_REPORTS_ATTR) == reports

    class Later:  # an AsyncModelRunnerOutput: the output exists once get_output() is called
        def get_output(self):
            return ModelRunnerOutput(req_ids=["r1"], req_id_to_index={"r1": 0})

    from vllm.v1.outputs import AsyncModelRunnerOutput
    AsyncModelRunnerOutput.register(Later)
    later = vp._with_routing_reports(Later(), reports)
    assert getattr(later.get_output(), ROUTING_REPORTS_ATTR) == reports


def test_the_api_hook_takes_the_reports_out_of_kv_transfer_params():
    from vllm.v1.engine import EngineCoreOutput

    from attention_backends.vllm_glue import vllm_private as vp

    class State:
        external_req_id = "chatcmpl-1"
        request_index = 1

    class Processor:
        request_states = {"internal-1": State()}

    report = {"eviction": EvictionReport(4, 10, 64).to_wire()}
    ours = EngineCoreOutput("internal-1", [7], kv_transfer_params={REPORT_KEY: report})
    shared = EngineCoreOutput("internal-1", [8],
                              kv_transfer_params={REPORT_KEY: report, "do_remote_decode": True})
    plain = EngineCoreOutput("internal-2", [9])
    box = get_inbox().expect("chatcmpl-1")
    try:
        vp._take_engine_reports(Processor(), [ours, shared, plain])
        assert box == {1: report}
        assert ours.kv_transfer_params is None  # vLLM's serving layer sees nothing of ours
        assert shared.kv_transfer_params == {"do_remote_decode": True}
        assert plain.kv_transfer_params is None
    finally:
        get_inbox().forget("chatcmpl-1")
