"""The ``kv_policy`` request field: a union of the policies' options models, picked by ``name``.

Each policy's options model lives with the policy (``policies/<name>.py``: ``StreamingOptions``,
``SnapKVOptions``, ...) and declares its own bounded fields; this module only joins the
registered ones (``policies.BUILTIN_POLICIES``). The engine reads the same models back from
``SamplingParams.extra_args["kv_policy"]`` (``plan.checked_options``).

Every field is bounded (docs/request_options.md lists the bounds and why): statically on the
models, and against the served model by ``model_limit_errors``, which the front end calls with
the model's ``max_model_len``. A field the named policy does not have is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from kv_policies.eviction.base import MAX_TOKENS_OPTION, PolicyOptions
from kv_policies.eviction.policies import BUILTIN_POLICIES
from kv_policies.eviction.policies.snapkv import MAX_POOL_KERNEL

EXTRA_ARGS_KEY = "kv_policy"

OPTIONS_BY_NAME: dict[str, type[PolicyOptions]] = {p.name: p.options_cls for p in BUILTIN_POLICIES}
POLICY_NAMES: tuple[str, ...] = tuple(OPTIONS_BY_NAME)
# The policy of a `kv_policy` object without `name`, and of a request without `kv_policy`.
DEFAULT_POLICY = "none"


_UNKNOWN_NAME = "unknown_kv_policy"


def _policy_name(value: Any) -> Any:
    """The union's tag: the ``name`` (absent means ``none``, the default policy). A value that
    is not an object goes to ``none``, whose model refuses it as not an object."""
    if isinstance(value, dict):
        return value.get("name", DEFAULT_POLICY)
    return value.name if isinstance(value, PolicyOptions) else DEFAULT_POLICY


KVPolicyOptions = Annotated[
    Union[tuple(Annotated[cls, Tag(name)] for name, cls in OPTIONS_BY_NAME.items())],  # noqa: UP007
    Discriminator(
        _policy_name, custom_error_type=_UNKNOWN_NAME,
        custom_error_message=f"unknown kv_policy.name; expected one of {list(POLICY_NAMES)}"),
]
"""Which KV-eviction policy compresses this request's prompt KV after prefill, and its options:
one of the policies' options models, by ``name``."""

_ADAPTER: TypeAdapter[PolicyOptions] = TypeAdapter(KVPolicyOptions)


def api_loc(loc: tuple, error_type: str = "") -> tuple:
    """An error location within a ``kv_policy`` value as the API names it (``param``).

    pydantic places the union's tag (the policy name) after the field holding the union (or
    first, for a value validated alone): it is dropped, so that ``kv_policy.snapkv.window``
    reads ``kv_policy.window``. An unknown name is located at ``kv_policy.name``.
    """
    out = [part for i, part in enumerate(loc)
           if not (part in OPTIONS_BY_NAME and (i == 0 or loc[i - 1] == EXTRA_ARGS_KEY))]
    if error_type == _UNKNOWN_NAME:
        out.append("name")
    return tuple(out)


def api_errors(errors: Sequence[dict]) -> list[dict]:
    """pydantic ``errors()`` with each location rewritten by ``api_loc``."""
    return [{**e, "loc": api_loc(tuple(e["loc"]), e["type"])} for e in errors]


def parse_kv_policy(value: Any) -> PolicyOptions:
    """``value`` (a dict, JSON text or an options model) as its policy's options model.

    Raises ``pydantic.ValidationError`` located as the API names it (``api_loc``), with the
    same error types and messages.
    """
    try:
        if isinstance(value, str | bytes):
            return _ADAPTER.validate_json(value)
        return _ADAPTER.validate_python(value)
    except ValidationError as exc:
        raise ValidationError.from_exception_data(exc.title, [
            # The message is kept as rendered (a custom error without context is verbatim).
            {"type": PydanticCustomError(e["type"], e["msg"]), "loc": e["loc"],
             "input": e["input"]}
            for e in api_errors(exc.errors())]) from None


def option_fields() -> dict[str, tuple[FieldInfo, tuple[str, ...]]]:
    """Every option field of the policies but ``name``: its declaration (the first policy's)
    and the names of the policies that have it, e.g. ``"tau": (..., ("calidrop",))``."""
    fields: dict[str, tuple[FieldInfo, tuple[str, ...]]] = {}
    for name, cls in OPTIONS_BY_NAME.items():
        for field, info in cls.model_fields.items():
            if field != "name":
                first, names = fields.get(field, (info, ()))
                fields[field] = (first, (*names, name))
    return fields


__all__ = ["DEFAULT_POLICY", "EXTRA_ARGS_KEY", "MAX_POOL_KERNEL", "MAX_TOKENS_OPTION",
           "OPTIONS_BY_NAME", "POLICY_NAMES", "KVPolicyOptions", "api_errors", "api_loc",
           "option_fields", "parse_kv_policy"]
