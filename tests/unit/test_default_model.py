"""Tests for the embedded default model (server.default_model)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from pathlib import Path

import pytest

from server import default_model
from server.default_model import (
    DEFAULT_MODEL_NAME,
    MODEL_VERSION,
    default_cache_dir,
    ensure_default_model,
)

EXPECTED_FILES = {
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


def _hashes(model_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in model_dir.iterdir()}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_default_model(tmp_path_factory.mktemp("cache"))


def test_layout(model_path: Path) -> None:
    assert model_path.name == f"{DEFAULT_MODEL_NAME}-{MODEL_VERSION}"
    assert model_path.parent.name == "models"
    assert {p.name for p in model_path.iterdir()} == EXPECTED_FILES
    config = json.loads((model_path / "config.json").read_text())
    assert config["fluxserve_smoke_test"] is True
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == 2048
    # No leftover temporary directories next to the model.
    assert [p.name for p in model_path.parent.iterdir()] == [model_path.name]


def test_existing_model_is_reused(model_path: Path) -> None:
    before = _hashes(model_path)
    mtime = (model_path / "model.safetensors").stat().st_mtime_ns
    assert ensure_default_model(model_path.parent.parent) == model_path
    assert _hashes(model_path) == before
    assert (model_path / "model.safetensors").stat().st_mtime_ns == mtime


def test_deterministic(model_path: Path, tmp_path: Path) -> None:
    other = ensure_default_model(tmp_path)
    assert other != model_path
    assert _hashes(other) == _hashes(model_path)


def test_tokenizer_chat_template(model_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    assert tok.bos_token == "<|begin_of_text|>"
    assert tok.eos_token == tok.pad_token == "<|end_of_text|>"
    assert len(tok) == 2048
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello! How are you?"},
        {"role": "assistant", "content": "Fine, thanks."},
        {"role": "user", "content": "Tell me a joke."},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|system|>\nYou are a helpful assistant.<|end|>\n"
        "<|user|>\nHello! How are you?<|end|>\n"
        "<|assistant|>\nFine, thanks.<|end|>\n"
        "<|user|>\nTell me a joke.<|end|>\n"
        "<|assistant|>\n"
    )
    no_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert no_prompt + "<|assistant|>\n" == text

    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    # Special tokens are single tokens, and the template adds the only BOS.
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    end_id = tok.convert_tokens_to_ids("<|end|>")
    assert ids.count(end_id) == 4
    assert tok.decode(ids, skip_special_tokens=True) == (
        "\nYou are a helpful assistant.\n\nHello! How are you?\n\n"
        "Fine, thanks.\n\nTell me a joke.\n\n"
    )

    with pytest.raises(Exception, match="Unsupported role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "  leading and trailing spaces \t\n",
        "def f(x):\n    return {'a': x ** 2}  # comment",
        "Grüße aus Köln, ¿qué tal? 日本語のテキスト, emoji 🎉🚀, Ωμέγα, русский",
        "\x00\x01 control \u200b zero-width",
    ],
)
def test_tokenizer_roundtrip_lossless(model_path: Path, text: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    with_bos = tok.encode(text)
    assert with_bos[0] == tok.bos_token_id and with_bos[1:] == ids
    assert tok.decode(with_bos, skip_special_tokens=True) == text


def test_model_forward(model_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    assert model.dtype == torch.bfloat16
    assert model.generation_config.eos_token_id == [1, tok.convert_tokens_to_ids("<|end|>")]
    ids = tok(["Hello there, how are you?"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 2048)
    assert torch.isfinite(logits.float()).all()


def _ensure_in_subprocess(cache_dir: str, queue: multiprocessing.Queue) -> None:
    queue.put(str(ensure_default_model(Path(cache_dir))))


def test_concurrent_first_use(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ensure_in_subprocess, args=(str(tmp_path), queue)) for _ in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    results = {queue.get(timeout=5), queue.get(timeout=5)}
    expected = default_model.model_dir(tmp_path)
    assert results == {str(expected)}
    assert {p.name for p in expected.iterdir()} == EXPECTED_FILES
    assert [p.name for p in expected.parent.iterdir()] == [expected.name]


def test_concurrent_rename_loser_discards_its_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process whose rename loses keeps the winner's model and removes its own copy."""
    winner = ensure_default_model(tmp_path / "winner")
    dest = default_model.model_dir(tmp_path)
    real_write = default_model._write_model

    def write_then_lose_race(out: Path) -> None:
        real_write(out)
        other = dest.parent / "other"
        other.mkdir()
        real_write(other)
        other.rename(dest)

    monkeypatch.setattr(default_model, "_write_model", write_then_lose_race)
    assert ensure_default_model(tmp_path) == dest
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]
    assert _hashes(dest) == _hashes(winner)


def test_cache_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLUXSERVE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "fluxserve"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "fluxserve"

    monkeypatch.setenv("FLUXSERVE_CACHE_DIR", str(tmp_path / "flux"))
    assert default_cache_dir() == tmp_path / "flux"
    path = ensure_default_model()
    assert path == tmp_path / "flux" / "models" / f"{DEFAULT_MODEL_NAME}-{MODEL_VERSION}"
    assert (path / "model.safetensors").is_file()
