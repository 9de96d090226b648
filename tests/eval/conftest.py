"""Shared fixtures of the evaluation tests: the smoke-test model's tokenizer, used as the
served model's tokenizer (a byte-level BPE with a 2048-token vocabulary)."""

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
