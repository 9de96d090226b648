"""The policy-spec syntax and what each policy sends."""

from __future__ import annotations

import pytest

from evaluation.policies import PolicySpecError, parse_policies, parse_policy

FLUX = {"flux", "kv_policy"}


def test_baseline():
    (full,) = parse_policy("full")
    assert full.name == "full" and full.is_baseline
    assert full.request_fields(set()) == {}
    assert full.request_fields(FLUX) == {"flux": {"mode": "full"}, "kv_policy": {"name": "none"}}


def test_attention_and_eviction_parts():
    (sparse,) = parse_policy("sparse:1024")
    assert sparse.flux == {"mode": "sparse", "window": 1024} and sparse.name == "sparse:1024"
    (layers,) = parse_policy("layers:0-3,8,5")
    assert layers.flux == {"mode": "layers", "sparse_layers": [0, 1, 2, 3, 5, 8]}
    assert layers.name == "layers:0-3,5,8"
    (combo,) = parse_policy("sparse + snapkv:512")
    assert combo.name == "sparse+snapkv:512"
    assert combo.request_fields(FLUX) == {"flux": {"mode": "sparse"},
                                          "kv_policy": {"name": "snapkv", "budget": 512}}
    (default_budget,) = parse_policy("calidrop")
    assert default_budget.kv_policy == {"name": "calidrop", "budget": 2048}
    (same,) = parse_policy("full+calidrop:512")
    assert same.name == "calidrop:512" and same.flux is None


def test_budget_lists_and_presets_expand():
    names = [p.name for p in parse_policy("calidrop:256,512,1024")]
    assert names == ["calidrop:256", "calidrop:512", "calidrop:1024"]
    every = [p.name for p in parse_policies(["all"])]
    assert every[:3] == ["full", "auto", "sparse"]
    for kv in ("streaming", "snapkv", "calidrop"):
        assert [f"{kv}:{b}" for b in (256, 512, 1024, 2048)] == [n for n in every
                                                                 if n.startswith(kv)]
    assert [p.name for p in parse_policies(["full", "full", "snapkv:512"])] == [
        "full", "snapkv:512"]


def test_non_baseline_needs_a_fluxserve_server():
    (policy,) = parse_policy("snapkv:512")
    with pytest.raises(PolicySpecError, match="flux/kv_policy"):
        policy.request_fields(set())
    with pytest.raises(PolicySpecError, match="kv_policy"):
        policy.request_fields({"flux"})


@pytest.mark.parametrize("spec", ["", "fast", "sparse+layers:1", "snapkv:1+calidrop:2",
                                  "snapkv:abc", "snapkv:1", "layers:", "layers:5-2", "full:3",
                                  "sparse:0"])
def test_bad_specs_are_refused(spec):
    with pytest.raises(PolicySpecError):
        parse_policy(spec)
