"""Flux end to end in vLLM (CPU, float32, greedy), on a tiny released-format Flux checkpoint.

One in-process engine serves the Paw checkpoint (chunked prefill: 128 tokens per step). Two
more engines run in subprocesses: stock vLLM with no plugin (``VLLM_PLUGINS=""``) on the same
base weights, and the stock architecture with the routers as a standalone ``flux_router`` file
at tensor parallelism 2.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.flux import reference as ref
from tests.flux.tiny_models import (
    NUM_LAYERS,
    POOL,
    SINK,
    WINDOW,
    make_llama,
    make_paw,
    make_router,
    router_tensors,
)

CHUNK = 128  # max_num_batched_tokens: prompts longer than this are prefilled in chunks
MAX_TOKENS = 8
ENGINE = dict(skip_tokenizer_init=True, enforce_eager=True, dtype="float32", max_model_len=1024,
              max_num_batched_tokens=CHUNK, enable_chunked_prefill=True, max_num_seqs=8,
              block_size=32, seed=0)

random.seed(1234)
PROMPTS = {
    "short": [random.randrange(3, 2000) for _ in range(20)],  # < sink + window
    "long": [random.randrange(3, 2000) for _ in range(300)],  # 3 chunks
    "mid": [random.randrange(3, 2000) for _ in range(200)],  # 2 chunks
}
HERE = Path(__file__).parent
ROOT = HERE.parent.parent


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("flux_models")
    base = make_llama(d / "llama")
    return {"llama": base, "paw": make_paw(d / "paw", base), "router": make_router(d / "router"),
            "dir": d}


def _run_job(models, name: str, job: dict, env: dict) -> dict:
    jf, of = models["dir"] / f"{name}.json", models["dir"] / f"{name}.out.json"
    jf.write_text(json.dumps(job))
    e = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(ROOT), **env}
    p = subprocess.run([sys.executable, str(HERE / "engine_job.py"), str(jf), str(of)], env=e,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(of.read_text())


@pytest.fixture(scope="module")
def stock(models):
    """Stock vLLM, no plugin at all, plain Llama with the same weights."""
    reqs = [{"prompt": p, "max_tokens": MAX_TOKENS} for p in PROMPTS.values()]
    out = _run_job(models, "stock", {"model": str(models["llama"]), "engine": ENGINE,
                                     "requests": reqs}, {"VLLM_PLUGINS": ""})
    return dict(zip(PROMPTS, out["tokens"], strict=True))


@pytest.fixture(scope="module")
def trace_file(models):
    return models["dir"] / "trace.jsonl"


@pytest.fixture(scope="module")
def llm(models, trace_file):
    with pytest.MonkeyPatch.context() as mp:
        # Engine core and worker in this process: the test reads the worker's metrics directly.
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        mp.setenv("FLUXSERVE_FLUX_TRACE", str(trace_file))
        from vllm import LLM

        from attention_backends.flux.request_state import get_registry

        # The registry is per process: engines of other test modules in this process may have
        # been torn down with requests in it. Only this engine's requests are checked for leaks.
        llm = LLM(model=str(models["paw"]), **ENGINE)
        llm.preexisting_flux_states = set(get_registry().states)
        yield llm


def generate(llm, prompts: list[list[int]], extra: list[dict | None], logprobs: bool = False):
    from vllm import SamplingParams

    sps = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, extra_args=e,
                          logprobs=1 if logprobs else None,
                          prompt_logprobs=1 if logprobs else None) for e in extra]
    return llm.generate([{"prompt_token_ids": p} for p in prompts], sps, use_tqdm=False)


def flux(mode: str, **kw) -> dict:
    return {"flux": {"mode": mode, **kw}}


def _trace_of(trace_file: Path, request_id: str) -> dict:
    """The routing trace line of a request (the engine suffixes the external request id)."""
    recs = [json.loads(line) for line in trace_file.read_text().splitlines()]
    found = [r for r in recs if r["req_id"] == request_id
             or r["req_id"].startswith(request_id + "-")]
    assert len(found) == 1, (request_id, found)
    return found[0]


def compare_with_hf(hf, prompt: list[int], out, sparse: list[bool], sink: int, window: int):
    """vLLM's tokens, their logprobs and the prompt logprobs vs HF with the same masks."""
    toks = list(out.outputs[0].token_ids)
    lp, _ = ref.hf_logprobs(hf, prompt + toks, sparse, sink, window)
    n = len(prompt)
    # Greedy tokens: HF's argmax at every generated position (teacher-forced on vLLM's tokens).
    assert lp[n - 1:n - 1 + len(toks)].argmax(-1).tolist() == toks
    got = [out.outputs[0].logprobs[i][t].logprob for i, t in enumerate(toks)]
    torch.testing.assert_close(torch.tensor(got), lp[n - 1 + torch.arange(len(toks)),
                                                     torch.tensor(toks)], atol=2e-3, rtol=0)
    plp = out.prompt_logprobs
    got_p = [plp[i][prompt[i]].logprob for i in range(1, n)]
    want_p = lp[torch.arange(n - 1), torch.tensor(prompt[1:])]
    torch.testing.assert_close(torch.tensor(got_p), want_p, atol=2e-3, rtol=0)


@pytest.fixture(scope="module")
def hf(models):
    return ref.load_hf(str(models["llama"]))


RESULTS: dict = {}


def test_full_matches_stock_vllm(llm, stock):
    names = list(PROMPTS)
    full = generate(llm, list(PROMPTS.values()), [flux("full")] * 3)
    plain = generate(llm, list(PROMPTS.values()), [None] * 3)
    for name, f, p in zip(names, full, plain, strict=True):
        assert list(f.outputs[0].token_ids) == stock[name], name
        assert list(p.outputs[0].token_ids) == stock[name], name
        RESULTS[("full", name)] = list(f.outputs[0].token_ids)


def test_sparse_short_prompt_equals_full(llm, stock):
    (out,) = generate(llm, [PROMPTS["short"]], [flux("sparse")])
    assert len(PROMPTS["short"]) + MAX_TOKENS < SINK + WINDOW
    assert list(out.outputs[0].token_ids) == stock["short"]


@pytest.mark.parametrize("case", [
    ("sparse", {}, [True] * NUM_LAYERS, SINK, WINDOW),
    ("sparse", {"sink": 4, "window": 24}, [True] * NUM_LAYERS, 4, 24),
    ("layers", {"sparse_layers": [0, 2]}, [True, False, True, False], SINK, WINDOW),
])
@pytest.mark.parametrize("name", ["long", "mid"])
def test_sparse_and_layers_match_hf_reference(llm, hf, name, case):
    mode, kw, sparse, sink, window = case
    (out,) = generate(llm, [PROMPTS[name]], [flux(mode, **kw)], logprobs=True)
    compare_with_hf(hf, PROMPTS[name], out, sparse, sink, window)
    RESULTS[(mode, json.dumps(kw, sort_keys=True), name)] = list(out.outputs[0].token_ids)


@pytest.mark.parametrize("name", list(PROMPTS))
def test_auto_decisions_match_reference_router(llm, hf, models, trace_file, name):
    """Chunked-prefill rule: the router pools the first chunk's queries (the first and last
    pool_size of its min(prompt, 128) tokens). Checked layer by layer: HF's pre-RoPE queries,
    computed with the engine's decisions for the layers below, fed to an independent router."""
    (out,) = generate(llm, [PROMPTS[name]], [flux("auto")], logprobs=True)
    rec = _trace_of(trace_file, out.request_id)
    sparse = rec["sparse"]
    prompt = PROMPTS[name]
    first_chunk = min(len(prompt), CHUNK)
    _, qs = ref.hf_logprobs(hf, prompt, sparse, SINK, WINDOW, capture_q=True)
    tensors = router_tensors()
    for layer in range(NUM_LAYERS):
        want, margin = ref.reference_router_sparse(tensors, layer, qs[layer][:first_chunk], POOL)
        if margin > 1e-3:
            assert sparse[layer] == want, (name, layer, margin)
    compare_with_hf(hf, prompt, out, sparse, SINK, WINDOW)
    RESULTS[("auto", name)] = (sparse, list(out.outputs[0].token_ids))


def test_auto_routes_both_ways():
    decisions = [d for k, v in RESULTS.items() if k[0] == "auto" for d in v[0]]
    assert decisions and True in decisions and False in decisions


def test_mixed_batch_equals_solo(llm):
    """Full, sparse, layers, auto and plain requests in one batch: per-row routing."""
    prompts = [PROMPTS["short"], PROMPTS["long"], PROMPTS["mid"], PROMPTS["long"],
               PROMPTS["mid"]]
    extra = [flux("auto"), flux("sparse"), flux("layers", sparse_layers=[0, 2]), None,
             flux("sparse", sink=4, window=24)]
    outs = generate(llm, prompts, extra)
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert got[0] == RESULTS[("auto", "short")][1]
    assert got[1] == RESULTS[("sparse", "{}", "long")]
    assert got[2] == RESULTS[("layers", '{"sparse_layers": [0, 2]}', "mid")]
    assert got[3] == RESULTS[("full", "long")]
    assert got[4] == RESULTS[("sparse", '{"sink": 4, "window": 24}', "mid")]


def test_metrics_and_no_leaks(llm):
    from prometheus_client import REGISTRY

    from attention_backends.flux.request_state import get_registry

    def val(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    assert val("fluxserve:sparse_layer_fraction_count", mode="sparse") > 0
    assert val("fluxserve:sparse_layer_fraction_sum", mode="full") == 0
    assert val("fluxserve:sparse_layer_fraction_count", mode="auto") > 0
    assert val("fluxserve:router_time_seconds_count") > 0
    assert val("fluxserve:request_prefill_time_seconds_count", mode="layers") > 0
    # Finished requests' state is released at the next step; run one to flush.
    generate(llm, [PROMPTS["short"]], [None])
    assert val("fluxserve:request_decode_time_seconds_count", mode="auto") > 0
    assert len(set(get_registry().states) - llm.preexisting_flux_states) <= 1


def test_tp2_standalone_router_file(models):
    """Stock Llama + routers from a standalone file, TP=2 on CPU: every rank takes the same
    decisions, equal to the Flux checkpoint's at TP=1, and the same tokens."""
    if not any(k[0] == "auto" for k in RESULTS):
        pytest.skip("needs the TP=1 auto results")
    trace = models["dir"] / "trace_tp2.jsonl"
    names = list(PROMPTS)
    job = {"model": str(models["llama"]),
           "engine": {**ENGINE, "tensor_parallel_size": 2, "distributed_executor_backend": "mp",
                      "additional_config": {"flux_router": str(models["router"])}},
           "requests": [{"prompt": PROMPTS[n], "extra_args": flux("auto"),
                         "max_tokens": MAX_TOKENS} for n in names]}
    out = _run_job(models, "tp2", job, {"VLLM_CPU_OMP_THREADS_BIND": "0|1",
                                        "FLUXSERVE_FLUX_TRACE": str(trace)})
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    by_rank: dict[int, list] = {0: [], 1: []}
    for rec in lines:
        by_rank[rec["tp_rank"]].append(rec["sparse"])
    assert by_rank[0] == by_rank[1] and len(by_rank[0]) == len(names)
    for n, sparse, toks in zip(names, by_rank[0], out["tokens"], strict=True):
        assert sparse == RESULTS[("auto", n)][0], n
        assert toks == RESULTS[("auto", n)][1], n
