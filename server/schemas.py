"""Request models: vLLM's OpenAI request models plus fluxserve's per-request extension fields.

The extension fields (`flux`, `kv_policy`) are validated here and reach the engine through
`SamplingParams.extra_args`, which is how vLLM carries per-request data to its workers.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.sampling_params import SamplingParams

from attention_backends.options import FluxOptions
from kv_policies.options import KVPolicyOptions

FLUX_DESCRIPTION = "fluxserve: per-request Flux layer routing (full / sparse / layers / auto)."
KV_POLICY_DESCRIPTION = "fluxserve: per-request KV-eviction policy applied after prefill."


def _check_token_limits(req: ChatCompletionRequest | CompletionRequest) -> None:
    for name in ("max_tokens", "max_completion_tokens"):
        value = vars(req).get(name)  # not getattr: max_tokens warns as deprecated
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def _with_extensions(params: SamplingParams, flux: FluxOptions | None,
                     kv_policy: KVPolicyOptions | None) -> SamplingParams:
    extra: dict[str, Any] = dict(params.extra_args or {})
    if flux is not None:
        extra["flux"] = flux.to_extra_args()
    if kv_policy is not None:
        extra["kv_policy"] = kv_policy.to_extra_args()
    params.extra_args = extra or None
    return params


class ChatRequest(ChatCompletionRequest):
    flux: FluxOptions | None = Field(default=None, description=FLUX_DESCRIPTION)
    kv_policy: KVPolicyOptions | None = Field(default=None, description=KV_POLICY_DESCRIPTION)

    @model_validator(mode="after")
    def _check_request(self) -> ChatRequest:
        if not self.messages:
            raise ValueError("messages must contain at least one message")
        _check_token_limits(self)
        return self

    def to_sampling_params(self, *args: Any, **kwargs: Any) -> SamplingParams:
        return _with_extensions(super().to_sampling_params(*args, **kwargs),
                                self.flux, self.kv_policy)


class CompletionsRequest(CompletionRequest):
    flux: FluxOptions | None = Field(default=None, description=FLUX_DESCRIPTION)
    kv_policy: KVPolicyOptions | None = Field(default=None, description=KV_POLICY_DESCRIPTION)

    @model_validator(mode="after")
    def _check_request(self) -> CompletionsRequest:
        _check_token_limits(self)
        return self

    def to_sampling_params(self, *args: Any, **kwargs: Any) -> SamplingParams:
        return _with_extensions(super().to_sampling_params(*args, **kwargs),
                                self.flux, self.kv_policy)
