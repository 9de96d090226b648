"""Chat messages as OpenAI's Chat Completions API defines them, validated before rendering.

vLLM's own message type also admits any role with any (or no) content, so `{"role": "user"}`
would reach the chat template. Here each role has the fields OpenAI requires:

| role | required | content |
|---|---|---|
| `developer`, `system` | `content` | string, or a non-empty list of `text` parts |
| `user` | `content` | string, or a non-empty list of `text` parts |
| `assistant` | non-null `content`, non-empty `tool_calls` or `function_call` | string, a \
  non-empty list of `text` / `refusal` parts, or null |
| `tool` | `content`, `tool_call_id` | string, or a non-empty list of `text` parts |
| `function` (deprecated) | `content` (may be null), `name` | string or null |

Any other role is a 400, as are image, audio and file parts: fluxserve serves text-generation
models. Validated messages stay plain dicts (TypedDicts), which is what vLLM's renderer reads;
unknown keys are kept (vLLM reads e.g. `reasoning` on assistant turns).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Required

from pydantic import AfterValidator, ConfigDict, Discriminator, Field, Tag
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

_KEEP_EXTRA = ConfigDict(extra="allow")


class TextPart(TypedDict):
    __pydantic_config__ = _KEEP_EXTRA  # type: ignore[misc]
    type: Literal["text"]
    text: str


class RefusalPart(TypedDict):
    __pydantic_config__ = _KEEP_EXTRA  # type: ignore[misc]
    type: Literal["refusal"]
    refusal: str


TextContent = str | Annotated[list[TextPart], Field(min_length=1)]
AssistantPart = Annotated[TextPart | RefusalPart, Field(discriminator="type")]
AssistantContent = str | Annotated[list[AssistantPart], Field(min_length=1)] | None


class FunctionCall(TypedDict):
    name: str
    arguments: str


class ToolCall(TypedDict):
    __pydantic_config__ = _KEEP_EXTRA  # type: ignore[misc]
    id: str
    type: Literal["function"]
    function: FunctionCall


class AudioRef(TypedDict):
    id: str


class DeveloperMessage(TypedDict, total=False):
    __pydantic_config__ = _KEEP_EXTRA  # type: ignore[misc]
    role: Required[Literal["developer"]]
    content: Required[TextContent]
    name: str


class SystemMessage(TypedDict, total=False):
    __pydantic_config__ = _KEEP_EXTRA  # type: ignore[misc]
    role: Required[Literal["system"]]
    content: Required[TextContent]
    name: str


class UserMessage(TypedDict, total=False):
    __pydantic_config__ = _KEEP_EXTRA  # type: ignore[misc]
    role: Required[Literal["user"]]
    content: Required[TextContent]
    name: str


_ASSISTANT_NEEDS = (
    "an assistant message needs non-null `content`, a non-empty `tool_calls` or a "
    "`function_call`"
)


class AssistantMessage(TypedDict, total=False):
    __pydantic_config__ = ConfigDict(  # type: ignore[misc]
        extra="allow",
        json_schema_extra={
            "description": _ASSISTANT_NEEDS,
            "anyOf": [
                {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
                {"required": ["tool_calls"]},
                {"required": ["function_call"],
                 "properties": {"function_call": {"not": {"type": "null"}}}},
            ],
        })
    role: Required[Literal["assistant"]]
    content: AssistantContent
    refusal: str | None
    name: str
    tool_calls: Annotated[list[ToolCall], Field(min_length=1)]
    function_call: FunctionCall | None
    audio: AudioRef | None
    reasoning: str | None  # vLLM: the turn's reasoning, for interleaved thinking


def _assistant_says_something(message: AssistantMessage) -> AssistantMessage:
    if (message.get("content") is None and not message.get("tool_calls")
            and message.get("function_call") is None):
        raise ValueError(_ASSISTANT_NEEDS)
    return message


class ToolMessage(TypedDict):
    __pydantic_config__ = _KEEP_EXTRA  # type: ignore[misc]
    role: Literal["tool"]
    content: TextContent
    tool_call_id: str


class FunctionMessage(TypedDict):
    __pydantic_config__ = _KEEP_EXTRA  # type: ignore[misc]
    role: Literal["function"]
    content: str | None
    name: str


def _role(message: Any) -> str | None:
    return message.get("role") if isinstance(message, dict) else None


# Tagged by `role`: a missing or unknown role is one clear error, not one per union member.
ChatMessage = Annotated[
    Annotated[DeveloperMessage, Tag("developer")]
    | Annotated[SystemMessage, Tag("system")]
    | Annotated[UserMessage, Tag("user")]
    | Annotated[AssistantMessage, AfterValidator(_assistant_says_something), Tag("assistant")]
    | Annotated[ToolMessage, Tag("tool")]
    | Annotated[FunctionMessage, Tag("function")],
    Discriminator(_role, custom_error_type="invalid_role",
                  custom_error_message="`role` must be one of 'developer', 'system', 'user', "
                                       "'assistant', 'tool', 'function'"),
]
