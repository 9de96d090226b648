"""Validation of the request models and how the extension fields reach the engine."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from attention_backends.flux.options import FluxOptions
from kv_policies.eviction.options import KVPolicyOptions
from server.schemas import ChatRequest, CompletionsRequest

MESSAGES = [{"role": "user", "content": "hi"}]


def test_extension_fields_reach_sampling_params_extra_args():
    req = ChatRequest(model="m", messages=MESSAGES,
                      flux={"mode": "layers", "sparse_layers": [1, 3], "sink": 4, "window": 64},
                      kv_policy={"name": "calidrop", "budget": 256, "tau": 0.5},
                      vllm_xargs={"other": 1})
    params = req.to_sampling_params(max_tokens=8, default_sampling_params={})
    assert params.extra_args["flux"]["mode"] == "layers"
    assert params.extra_args["flux"]["sparse_layers"] == [1, 3]
    assert params.extra_args["kv_policy"] == KVPolicyOptions(
        name="calidrop", budget=256, tau=0.5).model_dump()
    assert params.extra_args["other"] == 1  # vLLM's own passthrough still works


def test_no_extension_fields_leave_extra_args_untouched():
    params = CompletionsRequest(model="m", prompt="x").to_sampling_params(
        max_tokens=4, default_sampling_params={})
    assert not params.extra_args


@pytest.mark.parametrize("flux", [
    {"mode": "half"}, {"mode": "full", "unknown": 1}, {"mode": "layers"},
    {"mode": "sparse", "sparse_layers": [1]}, {"mode": "layers", "sparse_layers": [-1]},
    {"mode": "sparse", "window": 0}, {"mode": "sparse", "sink": -1},
])
def test_bad_flux_options_are_rejected(flux):
    with pytest.raises(ValidationError):
        FluxOptions(**flux)


@pytest.mark.parametrize("kv", [
    {"name": "bogus"}, {"name": "snapkv", "nope": 1}, {"name": "snapkv", "budget": 8, "window": 8},
    {"name": "snapkv", "pool_kernel": 4}, {"name": "calidrop", "tau": 2.0},
    {"name": "snapkv", "budget": 1},
])
def test_bad_kv_policy_options_are_rejected(kv):
    with pytest.raises(ValidationError):
        KVPolicyOptions(**kv)


@pytest.mark.parametrize("overrides", [
    {"messages": []}, {"max_tokens": 0}, {"max_tokens": -3}, {"max_completion_tokens": 0},
])
def test_bad_chat_requests_are_rejected(overrides):
    with pytest.raises(ValidationError):
        ChatRequest(**{"model": "m", "messages": MESSAGES, **overrides})
