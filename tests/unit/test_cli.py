"""The `fluxserve serve` command line: vLLM passthrough plus fluxserve's own options."""

from __future__ import annotations

import pytest

from server.cli import _apply_flux_router, parse_args
from server.config import API_KEY_ENV, ServerSettings


def _parse(*argv: str):
    return parse_args(["serve", *argv])


def test_vllm_engine_args_pass_through():
    args = _parse("--model", "/m", "--max-model-len", "4096", "--tensor-parallel-size", "2",
                  "--served-model-name", "alias", "--port", "9001")
    assert (args.model, args.max_model_len, args.tensor_parallel_size) == ("/m", 4096, 2)
    assert args.served_model_name == ["alias"] and args.port == 9001


def test_positional_model_is_accepted():
    assert _parse("/some/model").model == "/some/model"


def test_defaults_without_model_or_policies():
    args = _parse()
    assert args.model is None  # the embedded smoke-test model is filled in at serve time
    settings = ServerSettings.from_args(args, smoke_test_model=True)
    assert settings.default_flux.mode == "full"
    assert settings.default_flux.sink is None and settings.default_flux.window is None
    assert settings.default_kv_policy.name == "none"
    assert not settings.router_available and settings.api_keys == ()


def test_policy_defaults_from_flags():
    args = _parse("--flux-mode", "layers", "--flux-sparse-layers", "1,3", "--flux-window", "512",
                  "--kv-policy", "calidrop", "--kv-budget", "1024", "--kv-tau", "0.8")
    s = ServerSettings.from_args(args, smoke_test_model=False)
    assert s.default_flux.sparse_layers == [1, 3] and s.default_flux.window == 512
    assert (s.default_kv_policy.name, s.default_kv_policy.budget) == ("calidrop", 1024)
    assert s.default_kv_policy.tau == pytest.approx(0.8)


def test_api_key_from_flag_or_environment(monkeypatch):
    assert ServerSettings.from_args(_parse("--api-key", "k1"), smoke_test_model=False
                                    ).api_keys == ("k1",)
    monkeypatch.setenv(API_KEY_ENV, "k2")
    assert ServerSettings.from_args(_parse(), smoke_test_model=False).api_keys == ("k2",)


def test_auto_without_router_is_refused_at_start():
    with pytest.raises(SystemExit, match="router"):
        ServerSettings.from_args(_parse("--flux-mode", "auto"), smoke_test_model=False)


def test_missing_router_file_is_refused_at_start(tmp_path):
    with pytest.raises(SystemExit, match="no router weights"):
        ServerSettings.from_args(_parse("--flux-router", str(tmp_path)), smoke_test_model=False)


def test_flux_router_reaches_the_engine_config(tmp_path):
    args = _parse("--flux-router", str(tmp_path), "--additional-config", '{"other": 1}')
    _apply_flux_router(args)
    assert args.additional_config == {"other": 1, "flux_router": str(tmp_path)}
