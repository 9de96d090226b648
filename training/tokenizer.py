"""The quality model's tokenizer: a byte-level BPE trained on the evaluation tasks' text.

Digits are split one per token (``Digits(individual_digits=True)`` before the byte-level
pre-tokenizer), so a 7-digit value or a UUID is copied digit by digit instead of through
random multi-digit merges; the rest (English words, noise sentences) merges into whole-word
tokens. ``tokenizer.json`` is committed (``training/assets``) so that every checkpoint shares
it; ``python -m training.tokenizer`` rebuilds it deterministically.

The chat template has no roles: it concatenates the turns after the BOS token, with one space
before an assistant turn. ``fluxserve eval`` pre-fills the answer prefix (which starts with a
space, stripped in the chat message) as the assistant turn, so chat and completions requests
give the same tokens: ``<BOS> prompt answer_prefix``.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
VOCAB_SIZE = 4096
TOKENIZER_FILE = "tokenizer.json"

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}{{- ' ' }}{%- endif %}"
    "{{- message['content'] }}"
    "{%- endfor %}"
)


def tokenizer_json_path() -> Path:
    return Path(str(resources.files("training").joinpath("assets", TOKENIZER_FILE)))


def _corpus(seed: int, per_task: int) -> list[str]:
    """Prompt + answer text of every task at a few haystack sizes (about 1-2K tokens each)."""
    from training.data import TaskSampler

    sampler = TaskSampler(seed)
    texts = []
    for name in sampler.task_names:
        for i in range(per_task):
            built, answer = sampler.build(name, f"tok:{i}", 1500)
            texts.append(built.prompt + built.answer_prefix + answer)
    return texts


def train_tokenizer(seed: int = 0, per_task: int = 40, vocab_size: int = VOCAB_SIZE):
    """Train the BPE; returns a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS_TOKEN, EOS_TOKEN], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(_corpus(seed, per_task), trainer=trainer)
    bos = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos)])
    return tok


def write_hf_tokenizer(out: Path, model_max_length: int) -> dict[str, int]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    Returns ``{"bos_token_id": ..., "eos_token_id": ..., "vocab_size": ...}``."""
    raw = tokenizer_json_path().read_bytes()
    (out / TOKENIZER_FILE).write_bytes(raw)
    data = json.loads(raw)
    special = {t["content"]: t["id"] for t in data["added_tokens"]}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS_TOKEN,
           "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "model_max_length": model_max_length,
           "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN}, indent=2) + "\n")
    vocab = len(data["model"]["vocab"]) + sum(
        1 for t in data["added_tokens"] if t["content"] not in data["model"]["vocab"])
    return {"bos_token_id": special[BOS_TOKEN], "eos_token_id": special[EOS_TOKEN],
            "vocab_size": vocab}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(tokenizer_json_path()))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tok = train_tokenizer(args.seed)
    tok.save(args.out)
    print(f"wrote {args.out}: {tok.get_vocab_size()} tokens")


if __name__ == "__main__":
    main()
