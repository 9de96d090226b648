"""Unit tests on plain tensors: the eviction plan, the policy registry, selection, the worker
runtime (compaction + calibration state) and the scheduler-side manager (no engine)."""

from __future__ import annotations

import math

import pytest
import torch

from attention_backends.kernels import ops, reference
from kv_policies.eviction.base import SelectionInputs
from kv_policies.eviction.options import POLICY_NAMES, parse_kv_policy
from kv_policies.eviction.plan import eviction_plan
from kv_policies.eviction.policies import BUILTIN_POLICIES
from kv_policies.eviction.policies.snapkv import SnapKVOptions
from kv_policies.eviction.registry import get_policy, policy_names
from kv_policies.eviction.runtime import KVPolicyRuntime

HQ, HKV, D, BS = 4, 2, 16, 4


# ----------------------------------------------------------------------------- plan


@pytest.mark.parametrize("policy", [None, {}, {"name": "none"}, {"name": "none", "budget": 8}])
def test_no_plan_without_policy(policy):
    assert eviction_plan(policy, 10_000, 16) is None


def test_no_plan_when_prompt_fits():
    assert eviction_plan({"name": "calidrop", "budget": 256}, 256, 16) is None
    assert eviction_plan({"name": "snapkv", "budget": 256}, 100, 16) is None


@pytest.mark.parametrize("budget,prompt_len,bs", [(256, 1000, 16), (250, 260, 16), (7, 100, 4),
                                                   (2048, 32768, 16), (33, 34, 32)])
def test_plan_frees_exactly_the_blocks_inside_the_gap(budget, prompt_len, bs):
    # a sink small enough for the smallest budget here (the options are bounded)
    policy = {"name": "streaming", "budget": budget, "sink": 1}
    plan = eviction_plan(policy, prompt_len, bs)
    assert plan is not None
    assert (plan.budget, plan.kept_end, plan.gap_end) == (budget, budget, prompt_len)
    assert plan.freed_blocks.start == math.ceil(budget / bs)
    inside = [b for b in range(prompt_len // bs + 1)
              if b * bs >= budget and (b + 1) * bs <= prompt_len]
    assert list(plan.freed_blocks) == inside
    assert plan.num_evicted == prompt_len - budget


def test_plan_defaults_budget_from_options():
    default = SnapKVOptions().budget
    assert eviction_plan({"name": "snapkv"}, default, 16) is None
    assert eviction_plan({"name": "snapkv"}, default + 1, 16).budget == default


# ----------------------------------------------------------------------------- registry


def test_registry_has_every_schema_name():
    assert set(POLICY_NAMES) <= set(policy_names())
    # the request schema is derived from the one registration, BUILTIN_POLICIES
    assert POLICY_NAMES == tuple(p.name for p in BUILTIN_POLICIES)
    for p in BUILTIN_POLICIES:
        assert p.options_cls().name == p.name
        assert type(parse_kv_policy({"name": p.name})) is p.options_cls
    assert get_policy(None).name == "none" and not get_policy("none").evicts
    assert get_policy("calidrop").calibrates and not get_policy("snapkv").calibrates
    with pytest.raises(ValueError):
        get_policy("h2o")


# ----------------------------------------------------------------------------- selection


def _paged(length: int, seed: int = 0):
    """A random paged KV cache holding ``length`` slots in shuffled blocks, plus its block row."""
    g = torch.Generator().manual_seed(seed)
    nblk = -(-length // BS) + 3
    kv = torch.randn(nblk + 2, HKV, BS, 2 * D, generator=g)
    row = torch.randperm(nblk + 2, generator=g)[:nblk].to(torch.int32)
    return kv, row


def _dense(kv, row, length):
    return reference.gather_kv(kv, row, torch.arange(length))  # [Hkv, L, D] each


def _inputs(name, length, budget, window=4, q_obs=None, seed=0, **extra):
    kv, row = _paged(length, seed)
    if q_obs is None:
        q_obs = torch.randn(window, HQ, D, generator=torch.Generator().manual_seed(seed + 1))
    fields = {"name": name, "budget": budget, **extra}
    if name != "streaming":  # the streaming policy has no observation window
        fields["window"] = window
    opts = parse_kv_policy(fields)
    return SelectionInputs(q_obs=q_obs, kv_cache=kv, block_row=row, prompt_len=length,
                           scale=D ** -0.5, options=opts)


def test_streaming_keeps_sink_and_recent():
    inp = _inputs("streaming", 40, 12, sink=3)
    kept = get_policy("streaming").select(inp)
    want = list(range(3)) + list(range(31, 40))
    assert kept.shape == (HKV, 12)
    assert all(kept[h].tolist() == want for h in range(HKV))


def test_snapkv_matches_independent_dense_computation():
    length, budget, window, pool = 50, 20, 4, 3
    inp = _inputs("snapkv", length, budget, window=window, pool_kernel=pool)
    kept = get_policy("snapkv").select(inp)
    # Recompute the SnapKV scores from dense K without the paged helpers.
    k, _ = _dense(inp.kv_cache, inp.block_row, length)
    g = HQ // HKV
    scores = torch.zeros(HKV, length)
    pos = torch.arange(length - window, length)
    for h in range(HQ):
        s = inp.q_obs[:, h] @ k[h // g].T * inp.scale  # [w, L]
        s = s.masked_fill(torch.arange(length)[None] > pos[:, None], float("-inf"))
        p = torch.softmax(s, -1).sum(0)
        pooled = torch.nn.functional.max_pool1d(p[None, None], pool, 1, pool // 2)[0, 0]
        scores[h // g] += pooled
    for h in range(HKV):
        top = torch.topk(scores[h, :length - window], budget - window).indices
        want = sorted(top.tolist() + list(range(length - window, length)))
        assert kept[h].tolist() == want
    assert torch.equal(get_policy("calidrop").select(inp), kept)


# ----------------------------------------------------------------------------- runtime


@pytest.mark.parametrize("name", ["streaming", "snapkv", "calidrop"])
def test_compress_layer_compacts_and_calibrates(name):
    length, budget, window = 45, 16, 4
    policy = ({"name": name, "budget": budget, "sink": 2} if name == "streaming" else
              {"name": name, "budget": budget, "window": window, "pool_kernel": 3})
    plan = eviction_plan(policy, length, BS)
    kv, row = _paged(length, seed=3)
    before_k, before_v = _dense(kv, row, length)
    n = 9  # the chunk that completed the prompt: its last row is prompt position L-1
    q_chunk = torch.randn(n, HQ, D, generator=torch.Generator().manual_seed(7))
    scale = D ** -0.5
    inp = SelectionInputs(q_obs=q_chunk[n - window:], kv_cache=kv.clone(), block_row=row,
                          prompt_len=length, scale=scale, options=parse_kv_policy(policy))
    kept = get_policy(name).select(inp)

    rt = KVPolicyRuntime()
    rt.compress_layer("r1", 0, plan, policy, q_chunk, kv, row, scale)
    after_k, after_v = _dense(kv, row, length)
    for h in range(HKV):
        assert torch.equal(after_k[h, :budget], before_k[h, kept[h]])
        assert torch.equal(after_v[h, :budget], before_v[h, kept[h]])
    assert rt.is_compressed("r1", 0)
    state = rt.state_of("r1")
    if name != "calidrop":
        assert not state.layers and rt.calibration_for(0, ["r1"], "cpu") is None
        return
    cal = state.layers[0]
    assert torch.equal(cal.q_ref, q_chunk[-1])
    # o_E / lse_E: attention of q_ref over exactly the evicted slots.
    g = HQ // HKV
    for h in range(HQ):
        ev = sorted(set(range(length)) - set(kept[h // g].tolist()))
        s = (q_chunk[-1, h] @ before_k[h // g, ev].T) * scale
        torch.testing.assert_close(cal.lse_e[h], torch.logsumexp(s, 0))
        torch.testing.assert_close(cal.o_e[h], torch.softmax(s, 0) @ before_v[h // g, ev])
    # Batched calibration: rows in batch order, disabled where a request has no state.
    c = rt.calibration_for(0, ["other", "r1"], "cpu")
    assert c.enabled.tolist() == [False, True] and c.tau_of(1) == pytest.approx(0.9)
    assert torch.equal(c.q_ref[1], cal.q_ref) and torch.isinf(c.lse_e[0]).all()
    assert rt.calibration_for(1, ["r1"], "cpu") is None  # layer 1 not compressed
    rt.record_hits(0, ["other", "r1"], torch.tensor([[True] * HQ, [True, False, True, False]]))
    assert rt._checks == HQ  # only the calibrated request's token counts as checks
    rt.release("r1")
    assert rt.num_requests() == 0 and rt._checks == 0


def test_compress_layer_uses_the_prompt_rows_of_a_recompute_chunk():
    """After preemption a chunk can carry output tokens past the prompt: q_end marks it."""
    length, budget = 30, 10
    policy = {"name": "calidrop", "budget": budget, "window": 3}
    plan = eviction_plan(policy, length, BS)
    kv, row = _paged(length + 5, seed=5)
    q = torch.randn(12, HQ, D)
    rt = KVPolicyRuntime()
    rt.compress_layer("r", 2, plan, policy, q, kv.clone(), row, 0.25, q_end=8)
    assert torch.equal(rt.state_of("r").layers[2].q_ref, q[7])


def test_retain_only_drops_stale_requests():
    rt = KVPolicyRuntime()
    plan = eviction_plan({"name": "calidrop", "budget": 8, "window": 2}, 20, BS)
    for r in ("a", "b"):
        kv, row = _paged(20)
        rt.compress_layer(r, 0, plan, {"name": "calidrop", "budget": 8, "window": 2},
                          torch.randn(4, HQ, D), kv, row, 0.25)
    rt.retain_only(["b"])
    assert rt.state_of("a") is None and rt.state_of("b") is not None


def test_ops_paged_attention_masks_the_gap_after_compaction():
    """Decode after compaction reads only [0, B) and the decode slots (gap blocks scrambled)."""
    length, budget = 40, 12
    policy = {"name": "snapkv", "budget": budget, "window": 4}
    plan = eviction_plan(policy, length, BS)
    kv, row = _paged(length + 1, seed=9)
    rt = KVPolicyRuntime()
    rt.compress_layer("r", 0, plan, policy, torch.randn(4, HQ, D), kv, row, 0.25)
    k, v = _dense(kv, row, length + 1)
    for b in plan.freed_blocks:  # freed blocks get reused by someone else
        kv[row[b]] = torch.randn_like(kv[row[b]])
    q = torch.randn(1, HQ, D)
    out, _ = ops.paged_attention(q, kv, row[None], torch.tensor([length + 1]),
                                 torch.tensor([0, 1]), 0.25, kept_end=torch.tensor([budget]),
                                 gap_end=torch.tensor([length]))
    vis = list(range(budget)) + [length]
    for h in range(HQ):
        s = q[0, h] @ k[h // 2, vis].T * 0.25
        torch.testing.assert_close(out[0, h], torch.softmax(s, 0) @ v[h // 2, vis])


# ----------------------------------------------------------------------------- manager


def _manager(num_blocks=64, caching=False):
    from vllm.v1.core.block_pool import BlockPool

    from kv_policies.vllm_glue.manager import KVPolicyAttentionSpec, KVPolicyManager, register_spec

    register_spec()
    spec = KVPolicyAttentionSpec(block_size=BS, num_kv_heads=HKV, head_size=D,
                                 dtype=torch.float32)
    pool = BlockPool(num_blocks, enable_caching=caching, hash_block_size=BS)
    return KVPolicyManager(spec, block_pool=pool, enable_caching=caching, kv_cache_group_id=0,
                           scheduler_block_size=BS), pool


def test_manager_frees_the_gap_once_prompt_is_processed_and_nothing_leaks():
    mgr, pool = _manager()
    start = pool.get_num_free_blocks()
    policy = {"name": "calidrop", "budget": 10, "window": 2}
    length = 41  # blocks 0..10; kept: 0..2 (ceil(10/4)=3); freed 3..9; block 10 partial
    assert mgr.set_plan("r", policy, length)
    assert not mgr.set_plan("small", policy, 10)
    mgr.allocate_new_blocks("r", length + 1, length + 1)
    assert pool.get_num_free_blocks() == start - 11
    mgr.remove_skipped_blocks("r", length - 1, length)  # prompt not fully processed yet
    assert pool.get_num_free_blocks() == start - 11
    mgr.remove_skipped_blocks("r", length, length)
    assert pool.get_num_free_blocks() == start - 4
    blocks = mgr.req_to_blocks["r"]
    assert [b.is_null for b in blocks] == [False] * 3 + [True] * 7 + [False]
    mgr.remove_skipped_blocks("r", length + 5, length)  # idempotent
    assert pool.get_num_free_blocks() == start - 4
    # Preemption: all blocks freed, then the recompute frees the gap again.
    mgr.free("r")
    assert pool.get_num_free_blocks() == start
    mgr.allocate_new_blocks("r", length, length)
    mgr.remove_skipped_blocks("r", length, length)
    assert pool.get_num_free_blocks() == start - 4
    mgr.free("r")
    mgr.drop_plan("r")
    assert pool.get_num_free_blocks() == start and not mgr.plans and not mgr._gap_freed


def test_manager_leaves_requests_without_plan_alone():
    mgr, pool = _manager()
    mgr.allocate_new_blocks("u", 40, 40)
    mgr.remove_skipped_blocks("u", 40, 40)
    assert mgr.num_held_blocks("u") == 10


def test_mixed_tau_batch_keeps_each_requests_tau():
    rt = KVPolicyRuntime()
    for r, tau in (("a", 0.5), ("b", 0.8), ("c", 0.8)):
        pol = {"name": "calidrop", "budget": 8, "window": 2, "tau": tau}
        kv, row = _paged(20)
        rt.compress_layer(r, 0, eviction_plan(pol, 20, BS), pol, torch.randn(4, HQ, D), kv, row,
                          0.25)
    c = rt.calibration_for(0, ["a", "b", "c"], "cpu")
    assert c.tau.tolist() == pytest.approx([0.5, 0.8, 0.8])
    assert c.enabled.tolist() == [True, True, True]
    rt.record_hits(0, ["a", "b", "c"], torch.zeros(3, HQ, dtype=torch.bool))
    assert rt._checks == 3 * HQ


def test_calibration_kept_while_the_batch_is_unchanged():
    """A run of decode steps over the same requests reuses each layer's calibration tensors;
    a different batch, or a released request, builds them again with the right rows."""
    rt = KVPolicyRuntime()
    for r in ("a", "b"):
        pol = {"name": "calidrop", "budget": 8, "window": 2, "tau": 0.7}
        kv, row = _paged(20)
        rt.compress_layer(r, 0, eviction_plan(pol, 20, BS), pol, torch.randn(4, HQ, D), kv, row,
                          0.25)
    first = rt.calibration_for(0, ["a", "plain", "b"], "cpu")
    assert rt.calibration_for(0, ["a", "plain", "b"], "cpu") is first
    assert first.enabled.tolist() == [True, False, True]
    assert torch.equal(first.q_ref[1], torch.zeros_like(first.q_ref[1]))
    assert first.lse_e[1].eq(float("-inf")).all()
    assert torch.equal(first.q_ref[2], rt.state_of("b").layers[0].q_ref)
    swapped = rt.calibration_for(0, ["b", "plain", "a"], "cpu")
    assert swapped is not first
    assert torch.equal(swapped.o_e[0], rt.state_of("b").layers[0].o_e)
    rt.release("b")
    after = rt.calibration_for(0, ["b", "plain", "a"], "cpu")
    assert after is not swapped and after.enabled.tolist() == [False, False, True]


def test_record_hits_counts_every_hit_across_deferred_sums():
    """record_hits sums the hit tensors of many calls at once (one reduction, no host sync):
    the counters still get every check and every hit, whatever the tokens per call, a change
    of width, or a flush in the middle."""
    from prometheus_client import REGISTRY

    def counted(name: str) -> float:
        return REGISTRY.get_sample_value(f"fluxserve:{name}_total") or 0.0

    rt = KVPolicyRuntime()
    pol = {"name": "calidrop", "budget": 8, "window": 2, "tau": 0.7}
    kv, row = _paged(20)
    rt.compress_layer("a", 0, eviction_plan(pol, 20, BS), pol, torch.randn(4, HQ, D), kv, row,
                      0.25)
    checks0, hits0 = counted("calibration_checks"), counted("calibration_hits")
    gen = torch.Generator().manual_seed(0)
    want_hits = want_checks = 0
    for call in range(100):
        t = 1 + call % 3  # tokens of "a" in the call; "plain" has one
        width = HQ if call < 70 else 2 * HQ
        hits = torch.rand(t + 1, width, generator=gen) < 0.4
        rt.record_hits(0, ["a", "plain"], hits, [0, t, t + 1])
        want_hits += int(hits.sum())
        want_checks += width * t  # only "a" is calibrated at layer 0
        if call == 50:
            rt.flush_metrics()
    rt.flush_metrics()
    assert counted("calibration_checks") - checks0 == want_checks
    assert counted("calibration_hits") - hits0 == want_hits


def test_calibration_rebuilt_when_a_request_of_the_batch_is_compressed():
    """The kept calibration of a batch is keyed on its requests and on the layer's summaries:
    a request of the same batch compressed at that layer (its prompt completing in this step)
    shows up at once, in the calibration and in the checks counted; other layers keep theirs."""
    rt = KVPolicyRuntime()
    pol = {"name": "calidrop", "budget": 8, "window": 2, "tau": 0.7}
    for layer in (0, 1):
        kv, row = _paged(20)
        rt.compress_layer("a", layer, eviction_plan(pol, 20, BS), pol, torch.randn(4, HQ, D),
                          kv, row, 0.25)
    before = rt.calibration_for(0, ["a", "b"], "cpu")
    other = rt.calibration_for(1, ["a", "b"], "cpu")
    assert before.enabled.tolist() == [True, False]
    rt.record_hits(0, ["a", "b"], torch.zeros(2, HQ, dtype=torch.bool))
    assert rt._checks == HQ
    kv, row = _paged(20)
    rt.compress_layer("b", 0, eviction_plan(pol, 20, BS), pol, torch.randn(4, HQ, D), kv, row,
                      0.25)
    after = rt.calibration_for(0, ["a", "b"], "cpu")
    assert after is not before and after.enabled.tolist() == [True, True]
    assert torch.equal(after.q_ref[1], rt.state_of("b").layers[0].q_ref)
    rt.record_hits(0, ["a", "b"], torch.zeros(2, HQ, dtype=torch.bool))
    assert rt._checks == HQ + 2 * HQ
    assert rt.calibration_for(1, ["a", "b"], "cpu") is other
