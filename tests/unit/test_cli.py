"""The `fluxserve serve` command line: vLLM passthrough plus fluxserve's own options."""

from __future__ import annotations

import pytest

from server.cli import _apply_flux_router, _resolve_model, check_embedded_model_args, parse_args
from server.config import API_KEY_ENV, ServerSettings
from server.transport import TransportLimits


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


# The model argument: `fluxserve serve [MODEL | --model MODEL]`, or neither for the embedded one.

@pytest.mark.parametrize("argv", [
    ["--served-model-name", "foo"],
    ["--served-model-name", "a", "b"],
    ["--api-key", "k", "--served-model-name", "foo", "--port", "9000"],
    ["--host", "127.0.0.1", "--port", "9000"],
    ["--flux-mode", "sparse", "--kv-policy", "snapkv", "--kv-budget", "512"],
    ["--max-request-body-bytes", "1024", "--http-header-timeout", "5",
     "--http-keep-alive-timeout", "2", "--max-connections", "10", "--drain-timeout", "3"],
])
def test_documented_flags_work_without_a_model(argv):
    args = _parse(*argv)
    assert args.model is None
    ServerSettings.from_args(args, smoke_test_model=True)
    check_embedded_model_args(args)


@pytest.mark.parametrize("argv", [
    ["--model", "/m", "--served-model-name", "foo"],
    ["--model=/m", "--served-model-name", "foo"],
    ["/m", "--served-model-name", "foo"],
    ["--served-model-name", "foo", "--model", "/m"],
])
def test_model_with_served_model_name(argv):
    args = _parse(*argv)
    assert args.model == args.model_tag == "/m" and args.served_model_name == ["foo"]


@pytest.mark.parametrize("argv, message", [
    (["/m", "--model", "/n"], "given twice"),
    (["--model", "/m", "--model", "/n"], "--model given 2 times"),
    (["--model"], "--model needs a value"),
    (["--model", "--port", "1"], "--model needs a value"),
])
def test_model_argument_mistakes_are_explained(argv, message):
    with pytest.raises(SystemExit, match=message) as exc:
        _parse(*argv)
    assert str(exc.value).startswith("fluxserve: error:")


def test_served_model_name_is_kept_for_the_embedded_model(monkeypatch, tmp_path):
    import server.default_model as default_model

    monkeypatch.setattr(default_model, "ensure_default_model", lambda: tmp_path)
    args = _parse("--served-model-name", "foo")
    assert _resolve_model(args) is True
    assert args.model == str(tmp_path) and args.served_model_name == ["foo"]
    args = _parse()
    _resolve_model(args)
    assert args.served_model_name == [default_model.DEFAULT_MODEL_NAME]


@pytest.mark.parametrize("argv, message", [
    (["--max-model-len", "100000"], "supports at most 65536"),
    (["--flux-mode", "layers", "--flux-sparse-layers", "1,7"], "layers 0-3"),
])
def test_options_the_embedded_model_cannot_serve_are_refused(argv, message):
    with pytest.raises(SystemExit, match=message):
        check_embedded_model_args(_parse(*argv))


@pytest.mark.parametrize("argv, message", [
    (["--flux-sparse-layers", "one,two"], "comma-separated layer indices"),
    (["--max-in-flight-requests", "-1"], "--max-in-flight-requests must be >= 0"),
    (["--max-request-body-bytes", "-5"], "--max-request-body-bytes must be >= 0"),
    (["--drain-timeout", "-1"], "--drain-timeout must be >= 0"),
    (["--max-connections", "-1"], "--max-connections must be >= 0"),
])
def test_bad_option_values_are_refused_in_fluxserves_words(argv, message):
    with pytest.raises(SystemExit, match=message):
        ServerSettings.from_args(_parse(*argv), smoke_test_model=True)


def test_transport_and_drain_flags_reach_the_settings():
    s = ServerSettings.from_args(_parse(
        "--max-request-body-bytes", "1024", "--http-header-timeout", "2.5",
        "--http-keep-alive-timeout", "7", "--max-connections", "12", "--drain-timeout", "3",
        "--h11-max-incomplete-event-size", "8192", "--h11-max-header-count", "30"),
        smoke_test_model=True)
    assert s.transport == TransportLimits(max_request_body_bytes=1024, header_timeout_s=2.5,
                                          keep_alive_timeout_s=7, max_connections=12,
                                          max_header_bytes=8192, max_header_count=30)
    assert s.drain_timeout_s == 3
    defaults = ServerSettings.from_args(_parse(), smoke_test_model=True)
    assert defaults.transport == TransportLimits() and defaults.drain_timeout_s == 30
