#!/usr/bin/env python3
"""Train the byte-level BPE tokenizer of the embedded default model.

The tokenizer is trained offline on a fixed list of files from the Python standard library
(license text, the English documentation topics shipped in ``pydoc_data`` and a few modules)
plus a small built-in English sample, so that both prose and code tokenize sensibly. Given
the same file contents the result is deterministic.

The output is committed as ``server/assets/tiny_tokenizer.json`` and copied into the model
directory by ``server.default_model``. Re-run this script only when the recipe changes, and
bump ``server.default_model.MODEL_VERSION`` when the asset changes.

Usage: python scripts/train_tiny_tokenizer.py [--output PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 2048

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
END_OF_TURN_TOKEN = "<|end|>"
SPECIAL_TOKENS = [
    BOS_TOKEN,
    EOS_TOKEN,
    SYSTEM_TOKEN,
    USER_TOKEN,
    ASSISTANT_TOKEN,
    END_OF_TURN_TOKEN,
]

# Paths relative to the standard library directory, read in this order.
STDLIB_FILES = [
    "LICENSE.txt",
    "this.py",
    "pydoc_data/topics.py",
    "textwrap.py",
    "string.py",
    "json/__init__.py",
    "functools.py",
    "dataclasses.py",
    "argparse.py",
    "difflib.py",
    "email/message.py",
]

ENGLISH_SAMPLE = """\
Hello! How can I help you today?
Hi there. I would like to know what the weather is like in Paris this weekend.
I am a helpful assistant. I answer questions clearly, briefly and politely.
You are a helpful assistant. Answer the user's questions as well as you can.
Can you summarize the following article in three sentences?
Sure, here is a short summary of the main points.
What is the capital of France? The capital of France is Paris.
Please write a short poem about the sea, the wind and the stars.
Thank you very much for your help. You're welcome, have a nice day!
Explain how a transformer language model works, step by step.
A language model predicts the next token given the previous tokens in the text.
The server streams tokens back to the client as soon as they are generated.
Once upon a time, there was a little girl who lived in a village near the forest.
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday are the days of the week.
January, February, March, April, May, June, July, August, September, October, November, December.
One, two, three, four, five, six, seven, eight, nine, ten. 0 1 2 3 4 5 6 7 8 9 10 100 1000.
Yes. No. Maybe. I don't know. I think so. Let me check. Good morning. Good night.
Could you translate "good morning" into French, German and Spanish?
Bonjour, Guten Morgen, Buenos días. Merci beaucoup! Danke schön. ¿Qué tal?
"""


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files() -> list[Path]:
    root = stdlib_dir()
    files = [root / rel for rel in STDLIB_FILES]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"corpus files not found: {', '.join(missing)}")
    return files


def corpus_texts(files: list[Path]) -> Iterator[str]:
    # The English sample is repeated so that its words win merges over rarer code fragments.
    for _ in range(20):
        yield ENGLISH_SAMPLE
    for path in files:
        yield path.read_text(encoding="utf-8", errors="replace")


def build_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train(files: list[Path]) -> Tokenizer:
    tokenizer = build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_texts(files), trainer=trainer)
    # Offsets are not trimmed so that decoding reproduces the input bytes exactly.
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    default_output = Path(__file__).resolve().parent.parent / "server/assets/tiny_tokenizer.json"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=default_output)
    args = parser.parse_args(argv)

    files = corpus_files()
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    print(f"corpus: {len(files)} files from {stdlib_dir()} (sha256 {digest.hexdigest()[:16]})")

    tokenizer = train(files)
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise SystemExit(f"expected vocab size {VOCAB_SIZE}, got {tokenizer.get_vocab_size()}")
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected_id:
            raise SystemExit(f"special token {token} has unexpected id")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    data = tokenizer.to_str(pretty=False)
    args.output.write_text(data + "\n", encoding="utf-8")
    sha = hashlib.sha256(args.output.read_bytes()).hexdigest()
    size_kb = args.output.stat().st_size / 1024
    print(f"wrote {args.output} ({size_kb:.0f} KB, sha256 {sha[:16]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
