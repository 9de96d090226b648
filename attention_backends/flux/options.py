"""Per-request Flux routing options, as sent in the request body (`flux`) and as the engine reads
them back from `SamplingParams.extra_args["flux"]`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FluxMode = Literal["auto", "full", "sparse", "layers"]

EXTRA_ARGS_KEY = "flux"


class FluxOptions(BaseModel):
    """How the layers of one request attend.

    - ``full``: every layer runs full (dense causal) attention.
    - ``sparse``: every layer runs sparse attention (the first ``sink`` tokens plus the last
      ``window`` tokens before each query).
    - ``layers``: the layers listed in ``sparse_layers`` run sparse, the others full.
    - ``auto``: the Flux router of each layer decides at prefill; needs a router.
    """

    model_config = ConfigDict(extra="forbid")

    mode: FluxMode = "full"
    sparse_layers: list[int] | None = Field(
        default=None, description="Layer indices that run sparse attention (mode=layers)."
    )
    # None = the model's default: a Flux checkpoint's ``sink_size`` / ``local_window_size`` (or a
    # standalone router's config), else 128 / 2048 as in the paper's released runs.
    sink: int | None = Field(
        default=None, ge=0, le=1 << 20,
        description="Attention-sink tokens kept (None: model default).",
    )
    window: int | None = Field(
        default=None, ge=1, le=1 << 24, description="Local window in tokens (None: model default)."
    )

    @model_validator(mode="after")
    def _check_layers(self) -> FluxOptions:
        if self.mode == "layers":
            if self.sparse_layers is None:
                raise ValueError("flux.mode='layers' needs flux.sparse_layers")
            if any(i < 0 for i in self.sparse_layers):
                raise ValueError("flux.sparse_layers must be non-negative layer indices")
        elif self.sparse_layers is not None:
            raise ValueError("flux.sparse_layers is only valid with flux.mode='layers'")
        return self

    def to_extra_args(self) -> dict:
        return self.model_dump()
