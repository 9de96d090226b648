"""Shared fixtures of the evaluation tests: the smoke-test model's tokenizer, used as the
served model's tokenizer (a byte-level BPE with a 2048-token vocabulary), and tiny random Llama
checkpoints made with it."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

TOKENIZER_JSON = Path(__file__).resolve().parents[2] / "server" / "assets" / "tiny_tokenizer.json"


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(TOKENIZER_JSON))


@pytest.fixture(scope="session")
def count(tokenizer):
    """Token count of a built sample as sent with completions (prompt + answer prefix)."""
    def count(built) -> int:
        return len(tokenizer.encode(built.prompt + built.answer_prefix).ids)
    return count


def save_tiny_llama(path: Path, *, layers: int, heads: int, kv_heads: int,
                    max_position_embeddings: int) -> Path:
    """Save a random Llama (hidden size 64, weights drawn after ``torch.manual_seed(0)``) with
    the tokenizer above (BOS ``<|begin_of_text|>``, EOS ``<|end_of_text|>``) as a Hugging Face
    checkpoint in `path`; returns `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_JSON),
                                        bos_token="<|begin_of_text|>",
                                        eos_token="<|end_of_text|>")
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads,
                         max_position_embeddings=max_position_embeddings,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    return path
