"""Request models: vLLM's OpenAI request models plus fluxserve's per-request extension fields.

The extension fields (`flux`, `kv_policy`) are validated here and reach the engine through
`SamplingParams.extra_args`, which is how vLLM carries per-request data to its workers.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, model_validator
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.sampling_params import SamplingParams

from attention_backends.flux.options import EXTRA_ARGS_KEY as FLUX_KEY
from attention_backends.flux.options import FluxOptions
from kv_policies.eviction.options import EXTRA_ARGS_KEY as KV_POLICY_KEY
from kv_policies.eviction.options import KVPolicyOptions

FLUX_DESCRIPTION = "fluxserve: per-request Flux layer routing (full / sparse / layers / auto)."
KV_POLICY_DESCRIPTION = "fluxserve: per-request KV-eviction policy applied after prefill."


def _check_token_limits(req: ChatCompletionRequest | CompletionRequest) -> None:
    for name in ("max_tokens", "max_completion_tokens"):
        value = vars(req).get(name)  # not getattr: max_tokens warns as deprecated
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


class _Extensions(BaseModel):
    """fluxserve's extension fields, shared by both request models; they travel to the engine in
    ``SamplingParams.extra_args`` under each options model's ``EXTRA_ARGS_KEY``."""

    flux: FluxOptions | None = Field(default=None, description=FLUX_DESCRIPTION)
    kv_policy: KVPolicyOptions | None = Field(default=None, description=KV_POLICY_DESCRIPTION)

    def to_sampling_params(self, *args: Any, **kwargs: Any) -> SamplingParams:
        params = super().to_sampling_params(*args, **kwargs)  # type: ignore[misc]
        extra: dict[str, Any] = dict(params.extra_args or {})
        if self.flux is not None:
            extra[FLUX_KEY] = self.flux.to_extra_args()
        if self.kv_policy is not None:
            extra[KV_POLICY_KEY] = self.kv_policy.to_extra_args()
        params.extra_args = extra or None
        return params


class ChatRequest(_Extensions, ChatCompletionRequest):
    @model_validator(mode="after")
    def _check_request(self) -> ChatRequest:
        if not self.messages:
            raise ValueError("messages must contain at least one message")
        _check_token_limits(self)
        return self


class CompletionsRequest(_Extensions, CompletionRequest):
    @model_validator(mode="after")
    def _check_request(self) -> CompletionsRequest:
        _check_token_limits(self)
        return self
