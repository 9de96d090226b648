"""Per-request KV-eviction options, as sent in the request body (`kv_policy`) and as the engine
reads them back from `SamplingParams.extra_args["kv_policy"]`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

EXTRA_ARGS_KEY = "kv_policy"

# Kept in sync with the policy registry (kv_policies.registry), which checks it at import.
POLICY_NAMES = ("none", "streaming", "snapkv", "calidrop")


class KVPolicyOptions(BaseModel):
    """Which KV-eviction policy compresses this request's prompt KV after prefill.

    A prompt that fits in ``budget`` tokens is never touched.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="none", description=f"One of {', '.join(POLICY_NAMES)}.")
    budget: int = Field(default=2048, ge=2, description="KV tokens kept per layer and KV head.")
    window: int = Field(
        default=32, ge=1, description="Observation window (the last prompt tokens, always kept)."
    )
    pool_kernel: int = Field(default=7, ge=1, description="Max-pool kernel over scores (odd).")
    sink: int = Field(default=4, ge=0, description="Sink tokens kept by the streaming policy.")
    tau: float = Field(
        default=0.9, ge=-1.0, le=1.0,
        description="Cosine threshold for applying the calibration term (calidrop).",
    )

    @field_validator("name")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        if v not in POLICY_NAMES:
            raise ValueError(f"unknown kv_policy.name {v!r}; expected one of {list(POLICY_NAMES)}")
        return v

    @field_validator("pool_kernel")
    @classmethod
    def _odd_kernel(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("kv_policy.pool_kernel must be odd")
        return v

    @model_validator(mode="after")
    def _window_in_budget(self) -> KVPolicyOptions:
        if self.window >= self.budget:
            raise ValueError("kv_policy.window must be smaller than kv_policy.budget")
        if self.name == "streaming" and self.sink >= self.budget:
            raise ValueError("kv_policy.sink must be smaller than kv_policy.budget")
        return self

    def to_extra_args(self) -> dict:
        return self.model_dump()
