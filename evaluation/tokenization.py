"""Prompt lengths in tokens of the served model's tokenizer.

Three sources, best first:
1. a local Hugging Face tokenizer (``--tokenizer PATH``: a directory or a ``tokenizer.json``);
2. the server's ``POST /tokenize`` (vLLM's, and fluxserve's);
3. an approximation, 4 characters per token, when neither is available: lengths are then only
   roughly right, and the run says so.

Each counts a prompt as it will be sent: with chat, the rendered chat template (the answer
prefix as a pre-filled assistant turn when the server continues one); with completions, the
prompt followed by the answer prefix.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

from evaluation.client import ApiError, SyncClient

APPROX_CHARS_PER_TOKEN = 4.0


def chat_messages(prompt: str, answer_prefix: str, prefill: bool) -> list[dict[str, str]]:
    """The chat messages for one sample: the user turn, and the answer prefix as the start of the
    assistant turn when `prefill` (the server continues the final message)."""
    messages = [{"role": "user", "content": prompt}]
    if prefill and answer_prefix:
        messages.append({"role": "assistant", "content": answer_prefix.lstrip()})
    return messages


class PromptTokenizer(Protocol):
    description: str
    exact: bool

    def count(self, prompt: str, answer_prefix: str) -> int:
        """Tokens of the prompt as sent (int >= 1)."""
        ...


class ServerTokenizer:
    """Counts with the server's ``POST /tokenize`` (vLLM's protocol: ``prompt`` or
    ``messages`` with ``add_generation_prompt`` / ``continue_final_message``)."""

    exact = True

    def __init__(self, client: SyncClient, model: str, chat: bool, prefill: bool):
        self.client, self.model, self.chat, self.prefill = client, model, chat, prefill
        self.description = "the server's tokenizer (POST /tokenize)"

    def count(self, prompt: str, answer_prefix: str) -> int:
        if self.chat:
            body = {"model": self.model,
                    "messages": chat_messages(prompt, answer_prefix, self.prefill),
                    "add_generation_prompt": not self.prefill,
                    "continue_final_message": self.prefill}
        else:
            body = {"model": self.model, "prompt": prompt + answer_prefix}
        return int(self.client.request("POST", "/tokenize", json=body)["count"])

    def encode(self, text: str) -> list[int]:
        """Token ids of plain `text`, without special tokens (no BOS)."""
        body = {"model": self.model, "prompt": text, "add_special_tokens": False}
        return [int(t) for t in self.client.request("POST", "/tokenize", json=body)["tokens"]]

    @staticmethod
    def available(client: SyncClient, model: str) -> bool:
        try:
            client.request("POST", "/tokenize", json={"model": model, "prompt": "probe"},
                           retries=1)
        except ApiError:
            return False
        return True


class HFTokenizer:
    """Counts with a local Hugging Face tokenizer (a directory with its files, or a
    ``tokenizer.json``). A tokenizer without a chat template counts chat prompts as plain text,
    which undercounts by the template's few tokens."""

    exact = True

    def __init__(self, path: str | Path, chat: bool, prefill: bool):
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        path = Path(path)
        if path.is_file():
            self.tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.chat = chat and bool(getattr(self.tokenizer, "chat_template", None))
        self.prefill = prefill
        self.description = f"the tokenizer at {path}"
        if chat and not self.chat:
            self.description += " (no chat template: the template's tokens are not counted)"

    def ids(self, prompt: str, answer_prefix: str) -> list[int]:
        """Token ids of the prompt as sent: the rendered chat template (the answer prefix as a
        pre-filled assistant turn when `prefill`), or the prompt followed by the answer prefix
        with the tokenizer's special tokens (BOS), as vLLM tokenizes a completions prompt."""
        if self.chat:
            ids = self.tokenizer.apply_chat_template(
                chat_messages(prompt, answer_prefix, self.prefill), tokenize=True,
                add_generation_prompt=not self.prefill, continue_final_message=self.prefill)
            if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer versions
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        return list(self.tokenizer(prompt + answer_prefix)["input_ids"])

    def count(self, prompt: str, answer_prefix: str) -> int:
        return len(self.ids(prompt, answer_prefix))

    def encode(self, text: str) -> list[int]:
        """Token ids of plain `text`, without special tokens (no BOS)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


class ApproxTokenizer:
    """``ceil(characters / 4)``: the fallback when no tokenizer is available."""

    exact = False
    description = (f"an approximation ({APPROX_CHARS_PER_TOKEN:g} characters per token): no "
                   "--tokenizer given and the server has no /tokenize, so lengths are approximate")

    def count(self, prompt: str, answer_prefix: str) -> int:
        return max(1, math.ceil(len(prompt + answer_prefix) / APPROX_CHARS_PER_TOKEN))


def choose_tokenizer(path: str | None, client: SyncClient, model: str, chat: bool,
                     prefill: bool) -> PromptTokenizer:
    """`--tokenizer` if given, else the server's `/tokenize`, else the approximation."""
    if path:
        return HFTokenizer(path, chat, prefill)
    if ServerTokenizer.available(client, model):
        return ServerTokenizer(client, model, chat, prefill)
    return ApproxTokenizer()
