"""The embedded default reward model (server.reward.default_model)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from server import default_model
from server.reward.default_model import (
    DEFAULT_REWARD_MODEL_NAME,
    ensure_default_reward_model,
    reward_model_dir,
)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_default_reward_model(tmp_path_factory.mktemp("cache"))


def test_layout_and_config(model_path: Path) -> None:
    assert model_path == reward_model_dir(model_path.parent.parent)
    assert model_path.name.startswith(DEFAULT_REWARD_MODEL_NAME)
    config = json.loads((model_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["num_labels"] == 1 and config["fluxserve_smoke_test"] is True
    assert "chat_template" in json.loads((model_path / "tokenizer_config.json").read_text())
    weights = load_file(str(model_path / "model.safetensors"))
    assert "lm_head.weight" not in weights
    assert weights["score.weight"].shape == (1, default_model.HIDDEN_SIZE)


def test_shares_the_chat_models_body(model_path: Path, tmp_path: Path) -> None:
    chat = load_file(str(default_model.ensure_default_model(tmp_path) / "model.safetensors"))
    reward = load_file(str(model_path / "model.safetensors"))
    assert torch.equal(chat["model.embed_tokens.weight"], reward["model.embed_tokens.weight"])


def test_deterministic(model_path: Path, tmp_path: Path) -> None:
    again = ensure_default_reward_model(tmp_path)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert hashlib.sha256((again / name).read_bytes()).digest() == \
            hashlib.sha256((model_path / name).read_bytes()).digest()


def test_hf_loads_it_as_a_one_label_classifier(model_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=torch.float32)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 1) and torch.isfinite(logits).all()
