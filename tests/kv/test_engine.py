"""Engine-level KV-policy tests on real vLLM (CPU), one shared engine (see conftest.py).

- budget >= prompt leaves a request untouched (same greedy tokens and logprobs as no policy);
- compressed requests' logits equal the dense PyTorch reference applying the same selection and
  calibration (tests/kv/reference_model.py), for every policy, and with Flux SA layers;
- prefix caching never serves compacted blocks;
- a preempted compressed request recomputes and is compressed again;
- memory: a KV cache sized for N uncompressed long requests runs >= 4N compressed ones at once,
  and the free block count returns to its start after 1,000 requests (no leak).
"""

from __future__ import annotations

import random
import time

import pytest
import torch

from tests.kv.conftest import (
    BLOCK_SIZE,
    LONG_MAX_TOKENS,
    LONG_PROMPT,
    NUM_BLOCKS,
    UNCOMPRESSED_FIT,
)

LOGPROBS = 5
TOL = 2e-3  # float32 vLLM CPU vs float32 dense reference, logprob units


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 2000) for _ in range(n)]


def _params(max_tokens: int, kv_policy: dict | None = None, flux: dict | None = None,
            logprobs: int | None = LOGPROBS):
    from vllm import SamplingParams

    extra = {}
    if kv_policy is not None:
        extra["kv_policy"] = kv_policy
    if flux is not None:
        extra["flux"] = flux
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                          logprobs=logprobs, extra_args=extra or None)


def _generate(llm, prompts, params):
    from vllm.inputs import TokensPrompt

    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        params if isinstance(params, list) else [params] * len(prompts),
                        use_tqdm=False)
    return [o.outputs[0] for o in outs]


def _assert_logits_match(out, ref_logits):
    ref_lp = torch.log_softmax(ref_logits, -1)
    worst = 0.0
    for i, (tok, lps) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        # Greedy: vLLM's token is the reference's argmax (up to near-ties).
        assert ref_lp[i, tok] >= ref_lp[i].max() - TOL, (i, tok)
        for tid, lp in lps.items():
            worst = max(worst, abs(lp.logprob - float(ref_lp[i, tid])))
    assert worst < TOL, worst


@pytest.fixture(scope="module")
def ref(model_dir):
    from tests.kv.reference_model import RefLlama

    return RefLlama(model_dir)


# ----------------------------------------------------------------------------- correctness


def test_budget_at_least_prompt_equals_none(llm, scheduler):
    prompts = [_prompt(200, 1), _prompt(256, 2)]
    base = _generate(llm, prompts, _params(12))
    for policy in ({"name": "calidrop", "budget": 256, "window": 8},
                   {"name": "snapkv", "budget": 300}, {"name": "streaming", "budget": 256}):
        outs = _generate(llm, prompts, _params(12, policy))
        for a, b in zip(base, outs, strict=True):
            assert a.token_ids == b.token_ids
            # The second run hits the prefix cache, so its prefill attends a cached prefix
            # (reference path) where the first ran whole prompts (SDPA): equal to rounding.
            for la, lb in zip(a.logprobs, b.logprobs, strict=True):
                assert la.keys() == lb.keys()
                for t in la:
                    assert la[t].logprob == pytest.approx(lb[t].logprob, abs=1e-4)


POLICIES = [
    {"name": "calidrop", "budget": 64, "window": 8, "pool_kernel": 7, "tau": -1.0},
    {"name": "calidrop", "budget": 96, "window": 16, "pool_kernel": 5, "tau": 0.5},
    # kept region ending inside a block: the CPU path's float32 part takes its last block
    {"name": "calidrop", "budget": 80, "window": 8, "tau": -1.0},
    {"name": "snapkv", "budget": 64, "window": 8},
    {"name": "streaming", "budget": 48, "sink": 4},
]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p['name']}-{p['budget']}")
def test_compressed_logits_match_reference(llm, ref, policy):
    # 315: decoding crosses into the block after the prompt's last one
    prompts = [_prompt(300, 11), _prompt(517, 12), _prompt(315, 13)]
    outs = _generate(llm, prompts, _params(10, policy))
    for prompt, out in zip(prompts, outs, strict=True):
        logits, stats = ref.logits(prompt, list(out.token_ids), policy)
        assert stats["near_tau"] == 0  # no hit decision sits on the threshold
        _assert_logits_match(out, logits)
        # The comparison can tell eviction from no eviction.
        dense, _ = ref.logits(prompt, list(out.token_ids), None)
        assert (torch.log_softmax(dense, -1) - torch.log_softmax(logits, -1)).abs().max() > 5 * TOL


def test_calidrop_with_flux_sparse_layers_matches_reference(llm, ref):
    policy = {"name": "calidrop", "budget": 64, "window": 8, "tau": -1.0}
    flux = {"mode": "sparse", "sink": 4, "window": 32}
    prompt = _prompt(400, 21)
    (out,) = _generate(llm, [prompt], _params(8, policy, flux))
    logits, _ = ref.logits(prompt, list(out.token_ids), policy, flux_sparse=(4, 32))
    _assert_logits_match(out, logits)


def test_prefix_cache_never_serves_compacted_blocks(llm):
    prompt = _prompt(640, 31)
    policy = {"name": "calidrop", "budget": 64, "window": 8}
    (plain,) = _generate(llm, [prompt], _params(8))
    (compressed,) = _generate(llm, [prompt], _params(8, policy))  # would hit the cache
    (again,) = _generate(llm, [prompt], _params(8))  # would be served compacted blocks
    assert again.token_ids == plain.token_ids
    # `again` prefills over the cached prefix of `plain` (a different attention path than the
    # whole-prompt one): equal to rounding, where compacted blocks would change the logits.
    for la, lb in zip(again.logprobs, plain.logprobs, strict=True):
        assert la.keys() == lb.keys()
        for t in la:
            assert la[t].logprob == pytest.approx(lb[t].logprob, abs=1e-4)
    assert compressed.token_ids  # ran


def test_preempted_compressed_request_recomputes(llm, scheduler, ref):
    """Preempt a compressed request mid-decode: it recomputes prompt + outputs with full
    attention, is compressed again (gap freed again, fresh calibration state) and decodes on."""
    from vllm.inputs import TokensPrompt

    from kv_policies.eviction.runtime import get_runtime

    policy = {"name": "calidrop", "budget": 64, "window": 8, "tau": -1.0}
    prompt = _prompt(500, 41)
    engine = llm.llm_engine
    rid = engine.add_request("preempt-me", TokensPrompt(prompt_token_ids=prompt),
                             _params(12, policy))  # the engine's internal request id
    k = 5
    preempted = False
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
        req = scheduler.requests.get(rid)
        if not preempted and req is not None and req.num_output_tokens == k:
            mgr = scheduler._kv_policy_managers[0]
            plan = mgr.plans[rid][0]
            nulls = sum(b.is_null for b in mgr.req_to_blocks[rid])
            assert nulls == len(plan.freed_blocks) > 0  # gap freed
            scheduler.running.remove(req)
            scheduler._preempt_request(req, time.monotonic())
            preempted = True
    assert preempted
    final = [o for o in outputs if o.request_id == "preempt-me" and o.finished][0].outputs[0]
    toks = list(final.token_ids)
    assert len(toks) == 12
    # Tokens before the preemption: the compressed run; after: the recompute.
    logits_a, _ = ref.logits(prompt, toks, policy)
    logits_b, _ = ref.logits(prompt, toks, policy, recompute_at=k)
    lp = torch.log_softmax(torch.cat([logits_a[:k], logits_b[k:]]), -1)
    for i, (tok, lps) in enumerate(zip(toks, final.logprobs, strict=True)):
        assert abs(lps[tok].logprob - float(lp[i, tok])) < TOL, i
    assert not scheduler._kv_policy_managers[0].plans
    _generate(llm, [_prompt(8, 0)], _params(1))  # delivers the last finished ids to the worker
    assert get_runtime().state_of(rid) is None


# ----------------------------------------------------------------------------- memory


def _run_and_watch(llm, scheduler, prompts, params):
    """Run requests through the engine step by step; peak running count and KV usage."""
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    for i, p in enumerate(prompts):
        engine.add_request(f"mem-{time.monotonic_ns()}-{i}", TokensPrompt(prompt_token_ids=p),
                           params)
    peak_running = peak_metric_running = 0
    min_free = scheduler.kv_policy_stats()["num_free_blocks"]
    usage = []
    while engine.has_unfinished_requests():
        engine.step()
        st = scheduler.kv_policy_stats()
        peak_running = max(peak_running, st["num_running"])
        min_free = min(min_free, st["num_free_blocks"])
        m = {x.name: x for x in llm.get_metrics()}
        peak_metric_running = max(peak_metric_running, int(m["vllm:num_requests_running"].value))
        usage.append(m["vllm:kv_cache_usage_perc"].value)
    return peak_running, peak_metric_running, min_free, max(usage)


def _metric(llm, name: str, **labels) -> float:
    from prometheus_client import REGISTRY

    total = 0.0
    for fam in REGISTRY.collect():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def _bytes_per_request(llm, policy: str) -> tuple[float, float]:
    return (_metric(llm, "fluxserve:kv_bytes_per_request_sum", policy=policy),
            _metric(llm, "fluxserve:kv_bytes_per_request_count", policy=policy))


def test_compression_runs_4x_more_long_requests_at_once(llm, scheduler):
    n = UNCOMPRESSED_FIT
    prompts = [_prompt(LONG_PROMPT, 100 + i) for i in range(5 * n)]
    start_free = scheduler.kv_policy_stats()["num_free_blocks"]
    assert start_free == NUM_BLOCKS - 1

    b0 = _bytes_per_request(llm, "none")
    plain = _run_and_watch(llm, scheduler, prompts, _params(LONG_MAX_TOKENS, logprobs=None))
    b1 = _bytes_per_request(llm, "none")
    assert plain[0] <= n and plain[1] <= n, plain  # the pool holds N uncompressed at a time

    freed_before = _metric(llm, "fluxserve:kv_blocks_freed_total")
    checks_before = _metric(llm, "fluxserve:calibration_checks_total")
    policy = {"name": "calidrop", "budget": 64, "window": 8}
    c0 = _bytes_per_request(llm, "calidrop")
    comp = _run_and_watch(llm, scheduler, prompts, _params(LONG_MAX_TOKENS, policy, logprobs=None))
    c1 = _bytes_per_request(llm, "calidrop")
    plain_bytes = (b1[0] - b0[0]) / (b1[1] - b0[1])
    comp_bytes = (c1[0] - c0[0]) / (c1[1] - c0[1])
    assert comp_bytes * 8 < plain_bytes, (comp_bytes, plain_bytes)
    assert comp[0] >= 4 * n and comp[1] >= 4 * n, comp
    per_request = LONG_PROMPT // BLOCK_SIZE - 64 // BLOCK_SIZE
    assert _metric(llm, "fluxserve:kv_blocks_freed_total") - freed_before == \
        per_request * len(prompts)
    assert scheduler.kv_policy_stats()["num_free_blocks"] == start_free
    _generate(llm, [_prompt(8, 0)], _params(1))  # the worker releases (and flushes) the last
    checks = _metric(llm, "fluxserve:calibration_checks_total") - checks_before
    assert checks >= len(prompts) * (LONG_MAX_TOKENS - 1) * 4  # decode tokens x layers (x heads)
    assert _metric(llm, "fluxserve:calibration_hits_total") <= _metric(
        llm, "fluxserve:calibration_checks_total")
    print(f"\npeak running: uncompressed {plain[0]}, calidrop {comp[0]} (N={n}); "
          f"peak kv usage {plain[3]:.2f} vs {comp[3]:.2f}; "
          f"KV bytes per request {plain_bytes:.0f} vs {comp_bytes:.0f}")


def test_no_block_leak_after_1000_requests(llm, scheduler):
    from kv_policies.eviction.runtime import get_runtime

    start = scheduler.kv_policy_stats()
    policies = [None, {"name": "calidrop", "budget": 16, "window": 4},
                {"name": "snapkv", "budget": 20, "window": 4},
                {"name": "streaming", "budget": 16, "sink": 2},
                {"name": "calidrop", "budget": 64}]  # fits: untouched
    prompts, params = [], []
    for i in range(1000):
        prompts.append(_prompt(40 + i % 25, 1000 + i))
        params.append(_params(2, policies[i % len(policies)], logprobs=None))
    outs = _generate(llm, prompts, params)
    assert all(len(o.token_ids) == 2 for o in outs)
    end = scheduler.kv_policy_stats()
    assert end["num_free_blocks"] == start["num_free_blocks"] == NUM_BLOCKS - 1
    assert end["num_plans"] == 0 and end["num_running"] == 0
    # The worker learns of the last finished requests with the next step.
    _generate(llm, [_prompt(8, 0)], _params(1))
    assert get_runtime().num_requests() == 0
