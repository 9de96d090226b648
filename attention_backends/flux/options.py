"""Per-request Flux routing options, as sent in the request body (`flux`) and as the engine reads
them back from `SamplingParams.extra_args["flux"]`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

FluxMode = Literal["auto", "full", "sparse", "layers"]

EXTRA_ARGS_KEY = "flux"

# No served model has this many layers; bounds the list (and each index) before the model's own
# layer count is known.
MAX_LAYERS = 1024


class FluxOptions(BaseModel):
    """How the layers of one request attend.

    - ``full``: every layer runs full (dense causal) attention.
    - ``sparse``: every layer runs sparse attention (the first ``sink`` tokens plus the last
      ``window`` tokens before each query).
    - ``layers``: the layers listed in ``sparse_layers`` run sparse, the others full.
    - ``auto``: the Flux router of each layer decides at prefill; needs a router.

    Bounded statically here and against the served model by ``model_limit_errors``
    (docs/request_options.md).
    """

    # strict: `"128"` or `true` is not a token count (as in the request body around it)
    model_config = ConfigDict(extra="forbid", strict=True)

    mode: FluxMode = "full"
    sparse_layers: list[Annotated[int, Field(ge=0, lt=MAX_LAYERS)]] | None = Field(
        default=None, max_length=MAX_LAYERS, validate_default=True,
        description="Distinct layer indices that run sparse attention (mode=layers).",
    )
    # None = the model's default: a Flux checkpoint's ``sink_size`` / ``local_window_size`` (or a
    # standalone router's config), else 128 / 2048 as in the paper's released runs.
    sink: int | None = Field(
        default=None, ge=0, le=1 << 20,
        description="Attention-sink tokens kept (None: model default; at most the model's max "
                    "length).",
    )
    window: int | None = Field(
        default=None, ge=1, le=1 << 24,
        description="Local window in tokens (None: model default; at most the model's max "
                    "length).",
    )

    @field_validator("sparse_layers")
    @classmethod
    def _check_layers(cls, v: list[int] | None, info: ValidationInfo) -> list[int] | None:
        mode = info.data.get("mode")
        if mode == "layers":
            if v is None:
                raise ValueError("flux.mode='layers' needs flux.sparse_layers")
            if len(set(v)) != len(v):
                raise ValueError("flux.sparse_layers must not repeat a layer")
        elif v is not None:
            raise ValueError("flux.sparse_layers is only valid with flux.mode='layers'")
        return v

    def model_limit_errors(self, max_model_len: int, num_layers: int) -> list[tuple[str, str]]:
        """The bounds that depend on the served model: ``(field, message)`` for each field that
        exceeds them (empty when all fit)."""
        errors = []
        bad = [i for i in self.sparse_layers or () if i >= num_layers]
        if bad:
            errors.append(("sparse_layers", f"flux.sparse_layers {bad[:8]} out of range: the "
                                            f"model has {num_layers} layers"))
        for name in ("sink", "window"):
            value = getattr(self, name)
            if value is not None and value > max_model_len:
                errors.append((name, f"flux.{name} ({value}) must be at most the model's max "
                                     f"length ({max_model_len} tokens)"))
        return errors

    def to_extra_args(self) -> dict:
        return self.model_dump()
