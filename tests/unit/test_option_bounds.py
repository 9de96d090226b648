"""Bounds of the per-request options (docs/request_options.md): static ones on the pydantic
models, model-dependent ones in ``model_limit_errors``, and the engine-side fallback for
invalid ``kv_policy`` extra args from plain vLLM callers."""

from __future__ import annotations

import msgspec
import pytest
from pydantic import ValidationError

from attention_backends.flux.options import MAX_LAYERS, FluxOptions
from kv_policies.eviction.options import MAX_POOL_KERNEL, MAX_TOKENS_OPTION, parse_kv_policy
from kv_policies.eviction.plan import checked_options, eviction_plan, policy_name
from kv_policies.eviction.policies.calidrop import CaliDropOptions
from kv_policies.eviction.policies.snapkv import SnapKVOptions
from kv_policies.eviction.policies.streaming import StreamingOptions

INT64_MAX = 2**63 - 1


def _error_fields(exc: ValidationError) -> set[str]:
    return {str(e["loc"][0]) for e in exc.errors()}


@pytest.mark.parametrize(("kv", "field"), [
    ({"name": "snapkv", "budget": 16, "window": 8, "pool_kernel": 4611686018427387905},
     "pool_kernel"),
    ({"name": "snapkv", "budget": 1 << 12, "pool_kernel": 2**29 + 1}, "pool_kernel"),
    ({"name": "snapkv", "budget": 18446744073709551616}, "budget"),
    ({"name": "snapkv", "budget": MAX_TOKENS_OPTION + 1}, "budget"),
    ({"name": "snapkv", "budget": 64, "window": 64}, "window"),
    ({"name": "snapkv", "budget": 16}, "window"),  # the default window (32) is checked too
    ({"name": "snapkv", "budget": 64, "window": 8, "pool_kernel": 65}, "pool_kernel"),
    ({"name": "snapkv", "budget": 4, "window": 2, "pool_kernel": 5}, "pool_kernel"),
    ({"name": "snapkv", "pool_kernel": 8}, "pool_kernel"),
    ({"name": "streaming", "budget": 64, "sink": 64}, "sink"),
    ({"name": "streaming", "sink": 2**70}, "sink"),
    ({"name": "snapkv", "sink": 2**70}, "sink"),  # not a snapkv field
    ({"name": "calidrop", "tau": float("nan")}, "tau"),
    ({"name": "calidrop", "tau": float("inf")}, "tau"),
    ({"name": "calidrop", "tau": 1.5}, "tau"),
])
def test_kv_policy_bounds_name_the_field(kv, field):
    with pytest.raises(ValidationError) as info:
        parse_kv_policy(kv)
    assert field in _error_fields(info.value)


@pytest.mark.parametrize(("kv", "field"), [
    ({"name": "streaming", "tau": 0.5}, "tau"),
    ({"name": "streaming", "budget": 64, "window": 8}, "window"),
    ({"name": "snapkv", "tau": 0.5}, "tau"),
    ({"name": "calidrop", "sink": 4}, "sink"),
    ({"name": "none", "budget": 64}, "budget"),
    ({"budget": 64}, "budget"),  # no name: the `none` policy
    ({"name": "bogus"}, "name"),
])
def test_kv_policy_fields_belong_to_the_named_policy(kv, field):
    """A field the named policy does not have is refused, located at that field."""
    with pytest.raises(ValidationError) as info:
        parse_kv_policy(kv)
    assert [e["loc"] for e in info.value.errors()] == [(field,)]


def test_each_policy_has_its_own_typed_options():
    assert type(parse_kv_policy({})).__name__ == "NoEvictionOptions"
    assert isinstance(parse_kv_policy({"name": "streaming"}), StreamingOptions)
    cali = parse_kv_policy('{"name": "calidrop", "budget": 64, "tau": 0.5}')
    assert isinstance(cali, CaliDropOptions) and isinstance(cali, SnapKVOptions)
    assert (cali.budget, cali.window, cali.pool_kernel, cali.tau) == (64, 32, 7, 0.5)
    assert parse_kv_policy(cali) is cali


@pytest.mark.parametrize(("flux", "field"), [
    ({"mode": "layers", "sparse_layers": [0, 0]}, "sparse_layers"),
    ({"mode": "layers", "sparse_layers": [2**64]}, "sparse_layers"),
    ({"mode": "layers", "sparse_layers": list(range(MAX_LAYERS + 1))}, "sparse_layers"),
    ({"mode": "layers"}, "sparse_layers"),
    ({"mode": "sparse", "window": 2**64}, "window"),
    ({"mode": "sparse", "sink": 2**64}, "sink"),
])
def test_flux_bounds_name_the_field(flux, field):
    with pytest.raises(ValidationError) as info:
        FluxOptions(**flux)
    assert field in _error_fields(info.value)


def test_widest_static_options_serialise_to_the_engine():
    """The largest values the models accept fit msgspec's int64, as extra args travel."""
    flux = FluxOptions(mode="layers", sparse_layers=list(range(MAX_LAYERS)), sink=1 << 20,
                       window=1 << 24)
    for kv in (StreamingOptions(budget=MAX_TOKENS_OPTION, sink=MAX_TOKENS_OPTION - 1),
               CaliDropOptions(budget=MAX_TOKENS_OPTION, window=MAX_TOKENS_OPTION - 1,
                               pool_kernel=MAX_POOL_KERNEL, tau=-1.0)):
        payload = {"kv_policy": kv.to_extra_args(), "flux": flux.to_extra_args()}
        assert msgspec.msgpack.decode(msgspec.msgpack.encode(payload)) == payload
    assert max(MAX_TOKENS_OPTION, MAX_LAYERS, 1 << 24) < INT64_MAX


def test_model_dependent_bounds():
    kv = StreamingOptions(budget=4096, sink=4095)
    assert [f for f, _ in kv.model_limit_errors(2048)] == ["budget", "sink"]
    assert SnapKVOptions(budget=2048).model_limit_errors(2048) == []
    assert parse_kv_policy({}).model_limit_errors(1) == []
    flux = FluxOptions(mode="layers", sparse_layers=[0, 3, 4], sink=2049, window=4096)
    found = dict(flux.model_limit_errors(2048, 4))
    assert set(found) == {"sparse_layers", "sink", "window"}
    assert "[4]" in found["sparse_layers"] and "4 layers" in found["sparse_layers"]
    assert FluxOptions(mode="layers", sparse_layers=[0, 3], sink=4,
                       window=2048).model_limit_errors(2048, 4) == []


@pytest.mark.parametrize("raw", [
    "snapkv", 7, ["snapkv"], {"name": "snapkv", "budget": 2**64},
    {"name": "snapkv", "budget": 16, "window": 8, "pool_kernel": 4611686018427387905},
    {"name": "calidrop", "budget": "lots"}, {"name": "bogus"},
])
def test_engine_ignores_invalid_kv_policy_extra_args(raw):
    """A plain vLLM caller's malformed ``kv_policy`` must not raise in the engine: no eviction."""
    assert checked_options(raw) is None
    assert policy_name(raw) == "none"
    assert eviction_plan(raw, 4096, 32) is None


def test_engine_plans_valid_kv_policy():
    plan = eviction_plan({"name": "snapkv", "budget": 64, "window": 8}, 200, 32)
    assert plan is not None and plan.budget == 64 and plan.gap_end == 200
    assert policy_name({"name": "calidrop"}) == "calidrop"
