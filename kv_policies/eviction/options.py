"""Per-request KV-eviction options, as sent in the request body (`kv_policy`) and as the engine
reads them back from `SamplingParams.extra_args["kv_policy"]`.

Every field is bounded (docs/request_options.md lists the bounds and why): statically here, and
against the served model by ``model_limit_errors``, which the front end calls with the model's
``max_model_len``. Bounded values also stay far inside int64, which is what msgspec can carry
from the front end to the engine.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

EXTRA_ARGS_KEY = "kv_policy"

# Kept in sync with the policy registry (kv_policies.eviction.registry), which checks it at import.
POLICY_NAMES = ("none", "streaming", "snapkv", "calidrop")

# A static ceiling for every token-count option, far above any model's context length (the
# model's own max_model_len is the real bound, checked by model_limit_errors).
MAX_TOKENS_OPTION = 1 << 24
# SnapKV pools scores over a small neighbourhood (the paper's kernel is 7); past a few dozen
# positions pooling only smears the selection. 63 keeps the pooling cost (O(L * k) per head) below
# that of computing the scores it pools (O(L * window * head_dim) per head).
MAX_POOL_KERNEL = 63


class KVPolicyOptions(BaseModel):
    """Which KV-eviction policy compresses this request's prompt KV after prefill.

    A prompt that fits in ``budget`` tokens is never touched.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(default="none", description=f"One of {', '.join(POLICY_NAMES)}.")
    budget: int = Field(
        default=2048, ge=2, le=MAX_TOKENS_OPTION,
        description="KV tokens kept per layer and KV head (at most the model's max length).",
    )
    window: int = Field(
        default=32, ge=1, le=MAX_TOKENS_OPTION, validate_default=True,
        description="Observation window (the last prompt tokens, always kept); below `budget`.",
    )
    pool_kernel: int = Field(
        default=7, ge=1, le=MAX_POOL_KERNEL, validate_default=True,
        description=f"Max-pool kernel over scores (odd, at most {MAX_POOL_KERNEL} and `budget`).",
    )
    sink: int = Field(
        default=4, ge=0, le=MAX_TOKENS_OPTION, validate_default=True,
        description="Sink tokens kept by the streaming policy (below `budget`).",
    )
    tau: float = Field(
        default=0.9, ge=-1.0, le=1.0,
        description="Cosine threshold for applying the calibration term (calidrop).",
    )

    # Cross-field checks are field validators (fields validate in declaration order, so the
    # earlier ones are in info.data; validate_default: defaults are checked against the sent
    # budget too): the error's location, and so the API's `param`, is the offending field.
    @field_validator("name")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        if v not in POLICY_NAMES:
            raise ValueError(f"unknown kv_policy.name {v!r}; expected one of {list(POLICY_NAMES)}")
        return v

    @field_validator("window")
    @classmethod
    def _window_in_budget(cls, v: int, info: ValidationInfo) -> int:
        budget = info.data.get("budget")
        if budget is not None and v >= budget:
            raise ValueError(f"kv_policy.window ({v}) must be smaller than kv_policy.budget "
                             f"({budget})")
        return v

    @field_validator("pool_kernel")
    @classmethod
    def _odd_kernel(cls, v: int, info: ValidationInfo) -> int:
        if v % 2 == 0:
            raise ValueError("kv_policy.pool_kernel must be odd")
        budget = info.data.get("budget")
        if budget is not None and v > budget:
            raise ValueError(f"kv_policy.pool_kernel ({v}) must be at most kv_policy.budget "
                             f"({budget})")
        return v

    @field_validator("sink")
    @classmethod
    def _sink_in_budget(cls, v: int, info: ValidationInfo) -> int:
        budget = info.data.get("budget")
        if info.data.get("name") == "streaming" and budget is not None and v >= budget:
            raise ValueError(f"kv_policy.sink ({v}) must be smaller than kv_policy.budget "
                             f"({budget})")
        return v

    @field_validator("tau")
    @classmethod
    def _finite_tau(cls, v: float) -> float:
        if not math.isfinite(v):  # allow_inf_nan covers JSON; this covers Python callers too
            raise ValueError("kv_policy.tau must be finite")
        return v

    def model_limit_errors(self, max_model_len: int) -> list[tuple[str, str]]:
        """The bounds that depend on the served model: ``(field, message)`` for each field that
        exceeds them (empty when all fit)."""
        errors = []
        if self.budget > max_model_len:
            errors.append(("budget", f"kv_policy.budget ({self.budget}) must be at most the "
                                     f"model's max length ({max_model_len} tokens)"))
        if self.sink > max_model_len:
            errors.append(("sink", f"kv_policy.sink ({self.sink}) must be at most the model's "
                                   f"max length ({max_model_len} tokens)"))
        return errors

    def to_extra_args(self) -> dict:
        return self.model_dump()
