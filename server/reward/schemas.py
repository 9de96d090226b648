"""`/v1/reward` request and response models (they document the endpoint in the OpenAPI schema)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from vllm.entrypoints.serve.engine.protocol import UsageInfo

from attention_backends.flux.options import FluxOptions
from kv_policies.eviction.options import KVPolicyOptions
from server.reward.prompts import MAX_JUDGE_CANDIDATES, JudgePrompt
from server.schemas import integral_floats_to_ints

RewardMode = Literal["scalar", "judge"]

MAX_ITEMS = 64
MAX_CANDIDATES = 16
MAX_MESSAGES = 256
MAX_JUDGE_TOKENS = 8192
DEFAULT_JUDGE_TOKENS = 1024
assert MAX_CANDIDATES <= MAX_JUDGE_CANDIDATES


# As the chat and completions bodies: no coercion (`"64"` is not a number, `"yes"` not a
# boolean), except that an integer may be written 5.0 (`RewardRequest._integral_floats`).
_STRICT = ConfigDict(extra="forbid", strict=True)


def _non_empty(text: str, what: str) -> str:
    if not text.strip():
        raise ValueError(f"{what} must not be empty")
    return text


class RewardMessage(BaseModel):
    """One context message (OpenAI chat format, text content only)."""

    model_config = _STRICT

    role: Literal["system", "user", "assistant"]
    content: str = Field(description="Message text; must not be empty.")

    @field_validator("content")
    @classmethod
    def _content(cls, v: str) -> str:
        return _non_empty(v, "message content")


class RewardItem(BaseModel):
    """One context with the candidate responses to score or judge."""

    model_config = _STRICT

    messages: list[RewardMessage] = Field(
        min_length=1, max_length=MAX_MESSAGES,
        description="The context: chat messages the candidates respond to.")
    candidates: list[str] = Field(
        min_length=2, max_length=MAX_CANDIDATES,
        description=f"2..{MAX_CANDIDATES} candidate assistant responses.")
    mode: RewardMode = Field(
        description="`scalar`: the reward model scores each candidate (first logit). `judge`: the "
                    "chat model compares them with LongRM's judge prompt.")
    model: str | None = Field(
        default=None, description="The judge (chat model) or scorer (reward model) to use; it "
                                  "must be the one this server serves for the mode.")
    judge_prompt: JudgePrompt | None = Field(
        default=None, description="judge: LongRM's `pairwise` prompt (2 candidates, verdict "
                                  "[[A]]/[[B]]) or `ranking` prompt (best-of-N, [[A>B>C]]). "
                                  "Default: pairwise for 2 candidates, ranking for more.")
    swap: bool = Field(
        default=False, description="judge: also judge the candidates in reversed order and "
                                   "report whether the two verdicts agree.")
    max_tokens: int = Field(
        default=DEFAULT_JUDGE_TOKENS, ge=1, le=MAX_JUDGE_TOKENS,
        description="judge: the most tokens the judge may write (greedy decoding).")
    flux: FluxOptions | None = Field(
        default=None, description="judge: Flux layer routing for the judge's request.")
    kv_policy: KVPolicyOptions | None = Field(
        default=None, description="judge: KV-eviction policy for the judge's request.")

    @field_validator("candidates")
    @classmethod
    def _candidates(cls, v: list[str]) -> list[str]:
        for i, text in enumerate(v):
            _non_empty(text, f"candidates[{i}]")
        return v

    @model_validator(mode="after")
    def _mode_options(self) -> RewardItem:
        if self.mode == "scalar":
            given = [name for name in ("judge_prompt", "flux", "kv_policy")
                     if getattr(self, name) is not None]
            if self.swap:
                given.append("swap")
            if given:
                raise ValueError(f"{', '.join(given)} only apply to mode='judge'")
        elif self.judge_prompt == "pairwise" and len(self.candidates) != 2:
            raise ValueError("judge_prompt='pairwise' compares exactly 2 candidates; use "
                             "'ranking' for more")
        return self

    @property
    def resolved_judge_prompt(self) -> JudgePrompt:
        if self.judge_prompt is not None:
            return self.judge_prompt
        return "pairwise" if len(self.candidates) == 2 else "ranking"


class RewardRequest(BaseModel):
    model_config = _STRICT

    items: list[RewardItem] = Field(min_length=1, max_length=MAX_ITEMS,
                                    description=f"1..{MAX_ITEMS} items, scored independently.")

    @model_validator(mode="before")
    @classmethod
    def _integral_floats(cls, data: Any) -> Any:
        return integral_floats_to_ints(data)


class CandidateResult(BaseModel):
    index: int = Field(description="Position of the candidate in the request.")
    score: float | None = Field(default=None,
                                description="scalar: the reward model's first logit.")
    rank: int | None = Field(default=None,
                             description="judge: 1 = best; null when the verdict failed.")


class PromptTruncation(BaseModel):
    """A prompt over the model's limit, cut to LongRM's head and tail (counts in tokens)."""

    candidate: int | None = Field(default=None, description="scalar: the candidate's prompt.")
    order: Literal["given", "reversed"] | None = Field(
        default=None, description="judge: the candidate order of the judge prompt.")
    original_tokens: int
    kept_tokens: int
    head_tokens: int
    tail_tokens: int
    budget_tokens: int = Field(description="Tokens the prompt may use.")


class Judgment(BaseModel):
    """One judge call: the candidates in the order shown (A, B, ...), its raw text and verdict."""

    order: Literal["given", "reversed"]
    shown: list[int] = Field(description="Candidate indices shown as A, B, C, ...")
    text: str = Field(description="The judge's raw output.")
    finish_reason: str | None = None
    ranking: list[int] | None = Field(
        default=None, description="Candidate indices, best first, parsed from the text.")
    error: str | None = Field(default=None, description="Why no verdict could be read.")


class RewardItemResult(BaseModel):
    index: int
    mode: RewardMode
    model: str
    candidates: list[CandidateResult]
    preferred: int | None = Field(
        description="Index of the best candidate; null when the judge gave no usable verdict.")
    reason: str | None = Field(default=None, description="Why `preferred` is null.")
    judge_prompt: JudgePrompt | None = None
    judgments: list[Judgment] | None = Field(
        default=None, description="judge: one judgment, or two with `swap`.")
    swap_agreement: bool | None = Field(
        default=None, description="judge with swap: both orders gave the same ranking.")
    truncated: bool = Field(description="Some prompt of this item was cut to fit the model.")
    truncation: list[PromptTruncation] = Field(default_factory=list)
    usage: UsageInfo


class RewardResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"reward-{uuid.uuid4().hex}")
    object: Literal["reward"] = "reward"
    created: int = Field(default_factory=lambda: int(time.time()))
    data: list[RewardItemResult]
    usage: UsageInfo
