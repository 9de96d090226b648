"""`fluxserve serve`'s reward-model options and `fluxserve reward-bench`'s arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cli import parse_args
from server.reward import engine as reward_engine
from server.reward.default_model import DEFAULT_REWARD_MODEL_NAME


def _serve(*argv: str):
    return parse_args(["serve", *argv])


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUXSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)


def test_auto_serves_the_embedded_reward_model_only_next_to_the_smoke_test_model() -> None:
    state = reward_engine.resolve_reward_model(_serve(), chat_is_smoke_test=True)
    assert state is not None and state.smoke_test_model
    assert state.model_name == DEFAULT_REWARD_MODEL_NAME and Path(state.model_path).is_dir()
    assert reward_engine.resolve_reward_model(_serve("--model", "/m"),
                                              chat_is_smoke_test=False) is None


def test_explicit_choices() -> None:
    assert reward_engine.resolve_reward_model(_serve("--reward-model", "none"),
                                              chat_is_smoke_test=True) is None
    forced = reward_engine.resolve_reward_model(_serve("--model", "/m", "--reward-model",
                                                       "default"), chat_is_smoke_test=False)
    assert forced is not None and forced.smoke_test_model
    args = _serve("--reward-model", "/ckpt/LongRM-8B/", "--reward-max-model-len", "4096")
    state = reward_engine.resolve_reward_model(args, chat_is_smoke_test=True)
    assert (state.model_path, state.model_name, state.smoke_test_model) == \
        ("/ckpt/LongRM-8B/", "LongRM-8B", False)
    named = _serve("--reward-model", "/ckpt/x", "--reward-model-name", "rm")
    assert reward_engine.resolve_reward_model(named, chat_is_smoke_test=False).model_name == "rm"


def test_reward_engine_args_on_cpu() -> None:
    args = _serve("--reward-model", "/ckpt/rm", "--reward-max-model-len", "4096",
                  "--enforce-eager")
    state = reward_engine.resolve_reward_model(args, chat_is_smoke_test=False)
    assert args.reward_kv_cache_memory_bytes == reward_engine.CPU_DEFAULT_REWARD_KV_CACHE_BYTES
    eargs = reward_engine.engine_args(args, state)
    assert (eargs.model, eargs.runner, eargs.max_model_len) == ("/ckpt/rm", "pooling", 4096)
    assert eargs.served_model_name == ["rm"] and eargs.enforce_eager
    assert eargs.kv_cache_memory_bytes == reward_engine.CPU_DEFAULT_REWARD_KV_CACHE_BYTES
    explicit = _serve("--reward-model", "/ckpt/rm", "--reward-kv-cache-memory-bytes", "1024")
    reward_engine.resolve_reward_model(explicit, chat_is_smoke_test=False)
    assert explicit.reward_kv_cache_memory_bytes == 1024


def test_reward_bench_arguments() -> None:
    args = parse_args(["reward-bench", "a.jsonl", "b.jsonl", "--url", "http://h:1", "--mode",
                       "scalar", "--kv-policy", '{"name": "snapkv", "budget": 512}', "--flux",
                       "sparse", "--concurrency", "2"])
    assert args.command == "reward-bench" and [p.name for p in args.files] == ["a.jsonl",
                                                                                 "b.jsonl"]
    assert args.kv_policy == {"name": "snapkv", "budget": 512} and args.flux == {"mode": "sparse"}
    assert (args.mode, args.concurrency, args.seed) == ("scalar", 2, 42)
    with pytest.raises(SystemExit):
        parse_args(["reward-bench", "a.jsonl"])  # --url is required
