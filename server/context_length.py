"""The prompt and the completion must fit the model's context length together.

vLLM 0.32 checks only the prompt against the context length (``TokenizeParams``), then clamps
the request's `max_tokens` to the context the prompt leaves (``get_max_tokens``). A prompt of
exactly `max_model_len` tokens was then answered "max_tokens must be at least 1, got 0", and an
explicit `max_tokens` past the context left was silently cut. fluxserve answers as OpenAI does:

- an explicit output limit (`max_tokens`, `max_completion_tokens`) that does not fit after the
  prompt is a 400 naming the limit, with the prompt's tokens, the limit and the context length;
- without one, the completion gets the context left (completions: at most vLLM's default of 16
  tokens), and the prompt must leave room for at least one token, or `min_tokens`, whichever is
  more: otherwise a 400 naming the prompt (`prompt` / `messages`) or `min_tokens`;
- a prompt longer than the context length is a 400 naming the prompt (vLLM's message);
- `truncate_prompt_tokens: -1` keeps as many prompt tokens as fit with the requested completion
  (vLLM keeps `max_model_len - 1`).

The rule is applied where vLLM applies its own length check, after tokenization and truncation,
to every prompt of the request (each of a list of prompts; the chat template's output), so text
and token-id prompts, `n > 1` and `echo` are covered alike. Prompt scoring (`echo: true,
max_tokens: 0`) needs one token of room too: vLLM scores the prompt by running one decoding
step, whose token it drops (its engine refuses a prompt of `max_model_len` tokens then).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from vllm.exceptions import VLLMValidationError
from vllm.renderers.params import TokenizeParams

# The `parameter` vLLM's TokenizeParams gives its prompt-length errors: no request field
_VLLM_PROMPT_PARAMS = ("input_text", "input_tokens")


def prompt_length(prompt: dict[str, Any]) -> int:
    """Tokens of a tokenized prompt (``TokensPrompt`` or ``EmbedsPrompt``)."""
    if "prompt_token_ids" in prompt:
        return len(prompt["prompt_token_ids"])
    return len(prompt["prompt_embeds"])


@dataclass(frozen=True)
class ContextFit(TokenizeParams):
    """vLLM's tokenization parameters of one request, which also check that each prompt leaves
    the completion its room in the context (``max_total_tokens``, the model's `max_model_len`).

    ``output_param`` names the request's explicit output limit (``output_tokens`` tokens; 0 for
    prompt scoring), or is None when the request sent none. ``prompt_param`` is the request's
    prompt field, named by errors about the prompt. Raises ``VLLMValidationError`` (a 400 whose
    `param` is the field at fault) from ``apply_pre_tokenization`` / ``apply_post_tokenization``.
    """

    prompt_param: str = "prompt"
    output_param: str | None = None
    output_tokens: int = 0
    min_output_tokens: int = 0

    @classmethod
    def of(cls, params: TokenizeParams, **checks: Any) -> ContextFit:
        """``params`` (vLLM's own, from the request's ``build_tok_params``) with the checks."""
        return cls(**{f.name: getattr(params, f.name) for f in fields(params)}, **checks)

    @property
    def room_needed(self) -> int:
        """Context tokens the completion needs after the prompt: at least one, also for prompt
        scoring (`max_tokens: 0`), which vLLM serves with one decoding step."""
        if self.output_param is not None:
            return max(1, self.output_tokens)
        return max(1, self.min_output_tokens)

    @property
    def max_truncation_tokens(self) -> int | None:
        """`truncate_prompt_tokens: -1` keeps the prompt's last tokens that fit with the
        completion (at least one, so that an output limit as long as the context is still
        named by the length check rather than leaving an empty prompt)."""
        if self.max_total_tokens is None:
            return None
        return max(1, self.max_total_tokens - self.room_needed)

    def apply_pre_tokenization(self, tokenizer, prompt):
        try:
            return super().apply_pre_tokenization(tokenizer, prompt)
        except VLLMValidationError as exc:
            raise self._located(exc) from None

    def apply_post_tokenization(self, tokenizer, prompt):
        try:
            prompt = super().apply_post_tokenization(tokenizer, prompt)
        except VLLMValidationError as exc:
            raise self._located(exc) from None
        self.check_fit(prompt_length(prompt))
        return prompt

    def _located(self, exc: VLLMValidationError) -> VLLMValidationError:
        if exc.parameter not in _VLLM_PROMPT_PARAMS:
            return exc
        return VLLMValidationError(exc.args[0], parameter=self.prompt_param, value=exc.value)

    def check_fit(self, prompt_tokens: int) -> None:
        """Raise ``VLLMValidationError`` unless a prompt of ``prompt_tokens`` tokens leaves the
        completion the room it needs."""
        limit = self.max_total_tokens
        if limit is None or prompt_tokens + self.room_needed <= limit:
            return
        where = self.prompt_param
        if self.output_param is not None and self.output_tokens and prompt_tokens < limit:
            asked = self.output_tokens
            raise VLLMValidationError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_tokens + asked} tokens ({prompt_tokens} in the {where}, {asked} in "
                f"{self.output_param}). Please reduce the length of the {where} or "
                f"{self.output_param} (at most {limit - prompt_tokens} with this {where}).",
                parameter=self.output_param, value=asked)
        left = max(0, limit - prompt_tokens)
        if left >= 1 and self.output_param is None:  # room for a token, not for min_tokens
            raise VLLMValidationError(
                f"This model's maximum context length is {limit} tokens. However, the {where} "
                f"has {prompt_tokens} tokens, which leaves {left} for the completion, fewer than "
                f"min_tokens={self.min_output_tokens}. Please reduce the length of the {where} "
                "or min_tokens.",
                parameter="min_tokens", value=self.min_output_tokens)
        if self.output_param is None:
            needed = f"at least {self.room_needed} token{'s' if self.room_needed > 1 else ''}"
        elif self.output_tokens:
            needed = f"{self.output_param}={self.output_tokens}"
        else:
            needed = (f"{self.output_param}=0 scores the prompt with one decoding step, which "
                      "needs 1 token")
        raise VLLMValidationError(
            f"This model's maximum context length is {limit} tokens. However, the {where} has "
            f"{prompt_tokens} tokens, which leaves no room for the completion ({needed}). "
            f"Please reduce the length of the {where}.",
            parameter=where, value=prompt_tokens)
