"""The API process's side of the accounting (server/accounting.py), on vLLM's RequestOutput
objects without an engine: token counting, the engine reports, usage.fluxserve and the metrics."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.v1.metrics.stats import RequestStateStats

from attention_backends.flux.accounting import (
    AttentionShape,
    EngineReport,
    RoutingReport,
    get_inbox,
    sequence_work,
    total_work,
)
from server.accounting import RequestAccountant, collect_usage, labels_of

SHAPE = AttentionShape(num_layers=4, num_heads=4, head_dim=64)
PROMPT = list(range(12))


def _params(kind: RequestOutputKind, **extra) -> SamplingParams:
    p = SamplingParams(max_tokens=8, extra_args=extra or None)
    p.output_kind = kind
    return p


def _out(seqs: dict[int, list[int]], finished: bool, stats=None) -> RequestOutput:
    return RequestOutput("req", None, PROMPT, None,
                         [CompletionOutput(i, "", ids, None, None) for i, ids in seqs.items()],
                         finished, metrics=stats)


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _drain(gen) -> list:
    return [o async for o in gen]


def _run(accountant: RequestAccountant, outputs: list[RequestOutput], params: SamplingParams,
         report: dict | None = None):
    async def engine():
        for i, out in enumerate(outputs):
            if i == 0 and report is not None:  # arrives with the first output
                get_inbox().deliver("req", 0, report)
            yield out

    async def main():
        with collect_usage() as usage:
            gen = accountant.observe(engine(), "req", params)  # created inside, as vLLM does
        seen = await _drain(gen)  # consumed outside, as a stream is
        return usage, seen

    return asyncio.run(main())


def test_a_streamed_sparse_request_reports_its_exact_work_and_metrics():
    params = _params(RequestOutputKind.DELTA, flux={"mode": "sparse"})
    routing = RoutingReport((True,) * 4, sink=2, window=4)
    stats = RequestStateStats(num_generation_tokens=5, scheduled_ts=10.0, first_token_ts=10.5,
                              last_token_ts=11.5)
    outputs = [_out({0: [1]}, False), _out({0: [2, 3]}, False), _out({0: [4, 5]}, True, stats)]
    labels = {"flux_mode": "sparse", "kv_policy": "none"}
    before = {n: _sample(n, **labels) for n in (
        "fluxserve:attention_flops_dense_total", "fluxserve:attention_flops_saved_total",
        "fluxserve:request_prefill_seconds_sum", "fluxserve:request_decode_seconds_per_token_sum")}
    usage, seen = _run(RequestAccountant(SHAPE, True), outputs, params,
                       {"routing": routing.to_wire()})
    assert seen == outputs  # passed through unchanged
    expected = sequence_work(SHAPE, len(PROMPT), 5, EngineReport(routing))
    assert usage.to_usage() == expected.to_usage()
    assert expected.attention_flops_saved > 0
    assert len(get_inbox()) == 0  # forgotten once done
    after = {n: _sample(n, **labels) for n in before}
    assert after["fluxserve:attention_flops_dense_total"] - before[
        "fluxserve:attention_flops_dense_total"] == expected.attention_flops_dense
    assert after["fluxserve:attention_flops_saved_total"] - before[
        "fluxserve:attention_flops_saved_total"] == expected.attention_flops_saved
    assert after["fluxserve:request_prefill_seconds_sum"] - before[
        "fluxserve:request_prefill_seconds_sum"] == pytest.approx(0.5)
    assert after["fluxserve:request_decode_seconds_per_token_sum"] - before[
        "fluxserve:request_decode_seconds_per_token_sum"] == pytest.approx(0.25)


def test_final_only_outputs_of_n_sequences_are_counted_per_sequence():
    params = _params(RequestOutputKind.FINAL_ONLY)
    usage, _ = _run(RequestAccountant(SHAPE, True), [_out({0: [1, 2, 3], 1: [4]}, True)], params)
    assert usage.to_usage() == total_work([sequence_work(SHAPE, 12, 3),
                                           sequence_work(SHAPE, 12, 1)]).to_usage()
    assert usage.to_usage()["attention_flops_saved"] == 0


def test_no_usage_object_without_engine_reports_or_outside_a_response():
    params = _params(RequestOutputKind.FINAL_ONLY, flux={"mode": "sparse"})
    usage, _ = _run(RequestAccountant(SHAPE, False), [_out({0: [1, 2]}, True)], params)
    assert usage.to_usage() is None

    async def engine():
        yield _out({0: [1]}, True)

    seen = asyncio.run(_drain(RequestAccountant(SHAPE, True).observe(engine(), "x", params)))
    assert len(seen) == 1  # no collect_usage around it: observed, nothing collected


def test_an_engine_error_passes_through_and_the_inbox_is_cleared():
    async def engine():
        yield _out({0: [1]}, False)
        raise RuntimeError("engine died")

    async def main():
        gen = RequestAccountant(SHAPE, True).observe(engine(), "req",
                                                     _params(RequestOutputKind.DELTA))
        await _drain(gen)

    with pytest.raises(RuntimeError, match="engine died"):
        asyncio.run(main())
    assert len(get_inbox()) == 0


def test_metric_labels_are_bounded_to_the_mode_and_policy_names():
    assert labels_of(SamplingParams()) == ("full", "none")
    assert labels_of(SamplingParams(extra_args={"flux": {"mode": "layers"},
                                                "kv_policy": {"name": "calidrop"}})) == (
        "layers", "calidrop")
    assert labels_of(SamplingParams(extra_args={"flux": {"mode": "x" * 200},
                                                "kv_policy": "snapkv"})) == ("other", "none")
