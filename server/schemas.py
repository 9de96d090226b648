"""Request models: vLLM's OpenAI request models plus fluxserve's per-request extension fields.

The extension fields (`flux`, `kv_policy`) are validated here and reach the engine through
`SamplingParams.extra_args`, which is how vLLM carries per-request data to its workers.

Every constraint vLLM checks on a single field is declared here as a field constraint as well
(`minimum`, `maxLength`, `minItems`, required, nullable), so that the OpenAPI document at
`/openapi.json` states what the server accepts: a body valid against it is not rejected for its
shape, and one invalid against it is rejected with 400 before it reaches the engine. Checks that
need the model or the engine (context length, vocabulary, the chat template, structured-output
grammars) stay where they are and answer 400 as well.
"""

from __future__ import annotations

from functools import cache
from typing import Annotated, Any, Literal

import vllm.envs as envs
from pydantic import (
    BaseModel,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import InitErrorDetails
from vllm.config import ModelConfig
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest,
    ChatCompletionToolsParam,
)
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.exceptions import VLLMValidationError
from vllm.renderers.params import TokenizeParams
from vllm.sampling_params import SamplingParams
from vllm.utils import random_uuid

from attention_backends.flux.options import EXTRA_ARGS_KEY as FLUX_KEY
from attention_backends.flux.options import FluxOptions
from kv_policies.eviction.options import EXTRA_ARGS_KEY as KV_POLICY_KEY
from kv_policies.eviction.options import KVPolicyOptions
from server.context_length import ContextFit
from server.messages import ChatMessage

FLUX_DESCRIPTION = "fluxserve: per-request Flux layer routing (full / sparse / layers / auto)."
KV_POLICY_DESCRIPTION = "fluxserve: per-request KV-eviction policy applied after prefill."

# vLLM 0.12 removed these in favour of `structured_outputs` / `response_format` and ignores them
# since (unconstrained output); a client that sends one expects a constraint, so it gets a 400.
REMOVED_GUIDED_FIELDS = {
    "guided_json": "structured_outputs.json (or response_format json_schema)",
    "guided_regex": "structured_outputs.regex",
    "guided_choice": "structured_outputs.choice",
    "guided_grammar": "structured_outputs.grammar",
    "guided_decoding_backend": "the server option --structured-outputs-config.backend",
    "guided_whitespace_pattern": "the server option "
                                 "--structured-outputs-config.whitespace_pattern",
}

# Field constraints shared by both endpoints: the same bounds SamplingParams checks, declared
# so that they appear in the OpenAPI document.
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)] | None
Temperature = Annotated[float, Field(ge=0.0, le=2.0)] | None
TopP = Annotated[float, Field(gt=0.0, le=1.0)] | None
TopK = Annotated[int, Field(ge=-1, description="0 or -1: no top-k cut")] | None
MinP = Annotated[float, Field(ge=0.0, le=1.0)] | None
RepetitionPenalty = Annotated[float, Field(gt=0.0)] | None
NumLogprobs = Annotated[int, Field(ge=-1, description="-1: the whole vocabulary")] | None
NumChoices = Annotated[int, Field(ge=1, le=envs.VLLM_MAX_N_SEQUENCES)]
NonEmptyStr = Annotated[str, Field(min_length=1)]
Stop = (NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=envs.VLLM_MAX_STOP_STRINGS)]
        | None)
# vLLM holds token ids as int32; ids past the vocabulary are a 400 from the engine
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
JSONBytes = Annotated[bytes, Field(strict=False)]
ThinkingTokenBudget = Annotated[int, Field(ge=-1, description="-1: unlimited")] | None
_INT64_MAX = 2**63 - 1
# 0 would keep no prompt token at all; -1 keeps what fits in the context with the completion
TruncatePromptTokens = (Literal[-1] | Annotated[int, Field(ge=1, le=_INT64_MAX)] | None)
# The request id is echoed in the response `id`, logged, and sent as a header: bounded, and
# visible ASCII only (no whitespace or control characters to split a log line or a header).
REQUEST_ID_MAX_LENGTH = 128
REQUEST_ID_PATTERN = r"^[!-~]+$"
RequestId = Annotated[str, Field(min_length=1, max_length=REQUEST_ID_MAX_LENGTH,
                                 pattern=REQUEST_ID_PATTERN)]


def _unset_or(name: str, schema: dict) -> dict:
    """JSON Schema: field `name` is absent or matches `schema`."""
    return {"properties": {name: schema}}


def _set_to(name: str, schema: dict) -> dict:
    """JSON Schema: field `name` is present and matches `schema`."""
    return {"required": [name], "properties": {name: schema}}


def _either(*alternatives: dict) -> dict:
    return {"anyOf": list(alternatives)}


# Cross-field rules of vLLM's request validators, stated in the OpenAPI document as well (as
# "absent or harmless, or the field it needs is set": no `not`, which generators handle poorly).
STREAM_OPTIONS_NEED_STREAM = _either(_unset_or("stream_options", {"type": "null"}),
                                     _set_to("stream", {"const": True}))
PROMPT_LOGPROBS_NOT_STREAMED = _either(_unset_or("prompt_logprobs", {"enum": [0, None]}),
                                       _unset_or("stream", {"enum": [False, None]}))
NO_LOGPROB_TOKEN_IDS = _unset_or("logprob_token_ids",
                                 {"anyOf": [{"type": "null"}, {"maxItems": 0}]})


# JSON Schema's integers include 5.0, and floats beyond this are not exact
_EXACT_FLOAT_INT = 2**53


def integral_floats_to_ints(data: Any) -> Any:
    """Turn 5.0 into 5 throughout a request body, so that strict validation (which rejects
    `"5"` and `true` for an integer, as the schema does) still accepts 5.0, as the schema does.
    Iterative: a deeply nested body cannot exhaust the stack here."""
    todo = [data]
    while todo:
        node = todo.pop()
        items = node.items() if isinstance(node, dict) else (
            enumerate(node) if isinstance(node, list) else ())
        for key, value in list(items):
            if isinstance(value, float) and value.is_integer() and abs(value) <= _EXACT_FLOAT_INT:
                node[key] = int(value)
            elif isinstance(value, dict | list):
                todo.append(value)
    return data


def _prepare(data: Any) -> Any:
    return integral_floats_to_ints(_reject_removed_guided_fields(data))


def _reject_removed_guided_fields(data: Any) -> Any:
    if isinstance(data, dict):
        for name, replacement in REMOVED_GUIDED_FIELDS.items():
            if name in data:
                raise VLLMValidationError(
                    f"`{name}` is no longer supported (vLLM removed it); use {replacement}.",
                    parameter=name)
    return data


@cache
def _field_adapter(info: FieldInfo) -> TypeAdapter:
    return TypeAdapter(Annotated[info.annotation, info])


def _located_type_errors(cls: type[BaseModel], data: Any, exc: Exception) -> ValidationError:
    """The validation errors of the body's fields checked one by one against their declared
    types, for a body on which a before-validator of vLLM's request model raised ``exc`` (a
    TypeError or AttributeError: vLLM reads raw fields there assuming their types, e.g. iterates
    `messages` or calls `structured_outputs.get`). Falls back to one error on the body naming
    ``exc`` when every field passes alone."""
    errors: list[InitErrorDetails] = []
    if isinstance(data, dict):
        for name, value in data.items():
            info = cls.model_fields.get(name)
            if info is None:
                continue
            try:
                _field_adapter(info).validate_python(value)
            except ValidationError as field_exc:
                errors.extend({"type": e["type"], "loc": (name, *e["loc"]), "input": e["input"],
                               **({"ctx": e["ctx"]} if "ctx" in e else {})}
                              for e in field_exc.errors())
    if not errors:
        errors.append({"type": "value_error", "loc": (), "input": data,
                       "ctx": {"error": f"invalid request body: {exc}"}})
    return ValidationError.from_exception_data(cls.__name__, errors)


def with_extensions(params: SamplingParams, flux: FluxOptions | None,
                    kv_policy: KVPolicyOptions | None) -> SamplingParams:
    """``params`` with `flux` / `kv_policy` in its ``extra_args`` under each options model's
    ``EXTRA_ARGS_KEY``: how the options reach the engine (the one mapping)."""
    extra: dict[str, Any] = dict(params.extra_args or {})
    if flux is not None:
        extra[FLUX_KEY] = flux.to_extra_args()
    if kv_policy is not None:
        extra[KV_POLICY_KEY] = kv_policy.to_extra_args()
    params.extra_args = extra or None
    return params


class _Extensions(BaseModel):
    """The fields and checks both request models share: vLLM's sampling bounds declared so that
    they appear in the OpenAPI document, and fluxserve's extension fields, which travel to the
    engine in ``SamplingParams.extra_args`` under each options model's ``EXTRA_ARGS_KEY``."""

    frequency_penalty: Penalty = None
    presence_penalty: Penalty = None
    repetition_penalty: RepetitionPenalty = None
    temperature: Temperature = None
    top_p: TopP = None
    top_k: TopK = None
    min_p: MinP = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    stop: Stop = []
    stop_token_ids: list[TokenId] | None = []
    bad_words: list[NonEmptyStr] = Field(default_factory=list)
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1)] | None = None
    thinking_token_budget: ThinkingTokenBudget = None
    truncate_prompt_tokens: TruncatePromptTokens = Field(
        default=None,
        description="Keep only this many prompt tokens (>= 1; -1: as many as fit in the "
                    "model's context with the requested completion).")
    request_id: RequestId = Field(
        default_factory=random_uuid,
        description=f"Echoed in the response id; at most {REQUEST_ID_MAX_LENGTH} visible ASCII "
                    "characters. A random id when not sent.")
    flux: FluxOptions | None = Field(default=None, description=FLUX_DESCRIPTION)
    kv_policy: KVPolicyOptions | None = Field(default=None, description=KV_POLICY_DESCRIPTION)

    # whether the body set `max_tokens` (not null): /v1/completions fills in 16 otherwise
    _max_tokens_sent: bool = PrivateAttr(default=False)

    # the request's prompt field, as errors about the prompt name it
    _PROMPT_PARAM = "prompt"

    @model_validator(mode="before")
    @classmethod
    def _prepare(cls, data: Any) -> Any:
        return _prepare(data)

    @model_validator(mode="wrap")
    @classmethod
    def _wrong_types_are_validation_errors(cls, data: Any,
                                           handler: ModelWrapValidatorHandler) -> Any:
        # Outermost (defined on the subclass): it wraps vLLM's before-validators, whose
        # TypeError / AttributeError on a wrongly typed field would otherwise answer 400 with
        # Python's message and no `param`, or 500. Whether `max_tokens` was sent is read before
        # vLLM's before-validators, which fill in /v1/completions' default for a null one.
        max_tokens_sent = isinstance(data, dict) and data.get("max_tokens") is not None
        try:
            model = handler(data)
        except (TypeError, AttributeError, KeyError) as exc:
            raise _located_type_errors(cls, data, exc) from None
        model._max_tokens_sent = max_tokens_sent
        model._check_min_tokens()
        return model

    @property
    def output_limit(self) -> tuple[str, int] | None:
        """The output limit the client sent, as (field, tokens); None when it sent none."""
        raise NotImplementedError

    @property
    def max_output_tokens(self) -> tuple[str, int] | None:
        """The most tokens the request may generate before the context is considered, as
        (field, tokens): the limit sent, or the endpoint's default; None: no limit."""
        return self.output_limit

    def _check_min_tokens(self) -> None:
        limit = self.max_output_tokens
        if limit is not None and self.min_tokens > limit[1]:
            name, tokens = limit
            default = "" if self.output_limit else f" (the default when {name} is not sent)"
            raise VLLMValidationError(
                f"min_tokens={self.min_tokens} is more than {name}={tokens}{default}: the "
                f"completion cannot be that long. Send min_tokens <= {name}.",
                parameter="min_tokens", value=self.min_tokens)

    def build_tok_params(self, model_config: ModelConfig) -> TokenizeParams:
        """vLLM's tokenization parameters, which also check that each prompt leaves the
        completion its room in the context (``server.context_length``)."""
        limit = self.output_limit
        return ContextFit.of(
            super().build_tok_params(model_config),  # type: ignore[misc]
            prompt_param=self._PROMPT_PARAM, output_param=limit and limit[0],
            output_tokens=limit[1] if limit else 0, min_output_tokens=self.min_tokens)

    def to_sampling_params(self, *args: Any, **kwargs: Any) -> SamplingParams:
        return with_extensions(super().to_sampling_params(*args, **kwargs),  # type: ignore[misc]
                               self.flux, self.kv_policy)


class ChatRequest(_Extensions, ChatCompletionRequest):
    """`POST /v1/chat/completions`. `max_tokens` / `max_completion_tokens` are at least 1: a chat
    completion always generates (there is no prompt echo to return instead)."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: Annotated[list[ChatCompletionToolsParam], Field(min_length=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        deprecated="max_tokens is deprecated in favor of the max_completion_tokens field")
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    n: NumChoices | None = 1
    prompt_logprobs: NumLogprobs = None

    _PROMPT_PARAM = "messages"

    @property
    def output_limit(self) -> tuple[str, int] | None:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        max_tokens = self.__dict__["max_tokens"]  # not the attribute, which warns it is deprecated
        return None if max_tokens is None else ("max_tokens", max_tokens)

    model_config = {
        "strict": True,  # no coercion ("5" -> 5, true -> 1): what the schema rejects, we reject
        "json_schema_extra": {
            # Not stated here (schemathesis' generator gives up beyond four such rules): that
            # prompt_logprobs is not streamed; the server still answers it with a 400.
            "allOf": [
                STREAM_OPTIONS_NEED_STREAM,
                _either({"properties": {**_unset_or("top_logprobs", {"enum": [0, None]})[
                            "properties"], **NO_LOGPROB_TOKEN_IDS["properties"]}},
                        _set_to("logprobs", {"const": True})),
                _either(_unset_or("continue_final_message", {"const": False}),
                        _set_to("add_generation_prompt", {"const": False})),
                _either(_unset_or("tool_choice", {"enum": ["none", None]}),
                        _set_to("tools", {"type": "array"})),
            ],
        },
    }


Prompt = (
    NonEmptyStr
    | Annotated[list[str], Field(min_length=1)]
    | Annotated[list[TokenId], Field(min_length=1)]
    | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
)


class CompletionsRequest(_Extensions, CompletionRequest):
    """`POST /v1/completions`. `max_tokens: 0` is accepted together with `echo: true` only: it
    returns the prompt (with its logprobs when `logprobs` is set) without generating, which is
    how prompts are scored; without `echo` there would be nothing to return."""

    prompt: Prompt = Field(
        default=None,
        description="The prompt: a string, a list of strings, a list of token ids or a list of "
                    "lists of token ids. Required unless `prompt_embeds` is given.")
    max_tokens: Annotated[int, Field(ge=0)] | None = Field(
        default=16, description="At least 1; 0 only with `echo: true` (prompt scoring).")
    n: NumChoices = 1
    logprobs: NumLogprobs = None
    prompt_logprobs: NumLogprobs = None
    # JSON carries bytes as (base64) strings: the one field where conversion is expected
    prompt_embeds: JSONBytes | list[JSONBytes] | None = None

    model_config = {
        "strict": True,  # no coercion ("5" -> 5, true -> 1): what the schema rejects, we reject
        "json_schema_extra": {
            "allOf": [
                _either({"required": ["prompt"]},
                        _set_to("prompt_embeds", {"type": ["string", "array"]})),
                _either(_unset_or("max_tokens", {"anyOf": [{"minimum": 1}, {"type": "null"}]}),
                        _set_to("echo", {"const": True})),
                STREAM_OPTIONS_NEED_STREAM,
                PROMPT_LOGPROBS_NOT_STREAMED,
                _either(NO_LOGPROB_TOKEN_IDS, _set_to("logprobs", {"type": "integer"})),
            ],
        },
    }

    @property
    def output_limit(self) -> tuple[str, int] | None:
        return ("max_tokens", self.max_tokens) if self._max_tokens_sent else None

    @property
    def max_output_tokens(self) -> tuple[str, int] | None:
        return "max_tokens", self.max_tokens

    @property
    def echo_only(self) -> bool:
        """Prompt scoring: the prompt comes back (with its logprobs), nothing is generated."""
        return bool(self.echo) and self.max_tokens == 0

    @model_validator(mode="after")
    def _check_max_tokens(self) -> CompletionsRequest:
        if self.max_tokens == 0 and not self.echo:
            raise VLLMValidationError(
                "max_tokens must be at least 1, got 0 (0 is accepted only with echo=true, "
                "to return the prompt and its logprobs without generating)",
                parameter="max_tokens", value=0)
        return self
