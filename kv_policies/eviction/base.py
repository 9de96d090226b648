"""The interface every KV-eviction policy implements, and the base of its options model.

A policy decides, once per layer when a request's prompt is complete, which prompt slots each KV
head keeps. It only selects (and, if it calibrates, summarises what it dropped): compaction and
freeing blocks are done by the runtime (``kv_policies.eviction.runtime``) and the scheduler-side
manager (``kv_policies.vllm_glue.manager``) alike for every policy. A new policy is one module in
``kv_policies/eviction/policies/`` (its options model and its policy class) plus its entry in
``BUILTIN_POLICIES`` there (docs/architecture.md, "Adding things").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo
from torch import Tensor

from attention_backends.kernels.kv_layout import KVLayout

# A static ceiling for every token-count option, far above any model's context length (the
# model's own max_model_len is the real bound, checked by model_limit_errors). Bounded values
# also stay far inside int64, which is what msgspec can carry from the front end to the engine.
MAX_TOKENS_OPTION = 1 << 24


class PolicyOptions(BaseModel):
    """The options of one policy: the ``kv_policy`` request field once its ``name`` picked the
    policy. Subclasses narrow ``name`` to a ``Literal`` of their policy's name and add their own
    bounded fields; a field another policy has is refused (``extra="forbid"``). Strict: `"0.5"`
    is not a number and `true` is not a token count (as in the request body around it)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    name: str

    # Token-count fields bounded by the served model's max length (model_limit_errors).
    MODEL_BOUNDED: ClassVar[tuple[str, ...]] = ("budget", "sink")

    def model_limit_errors(self, max_model_len: int) -> list[tuple[str, str]]:
        """The bounds that depend on the served model: ``(field, message)`` for each token-count
        field above ``max_model_len`` tokens (empty when all fit)."""
        return [(f, f"kv_policy.{f} ({getattr(self, f)}) must be at most the model's max length "
                    f"({max_model_len} tokens)")
                for f in self.MODEL_BOUNDED
                if f in type(self).model_fields and getattr(self, f) > max_model_len]

    def to_extra_args(self) -> dict:
        """The dict stored in ``SamplingParams.extra_args["kv_policy"]`` (every field)."""
        return self.model_dump()


class BudgetOptions(PolicyOptions):
    """The options of a policy that evicts: how many prompt tokens it keeps."""

    budget: int = Field(
        default=2048, ge=2, le=MAX_TOKENS_OPTION,
        description="KV tokens kept per layer and KV head (at most the model's max length); a "
                    "prompt that fits is never touched.")


def smaller_than_budget(value: int, info: ValidationInfo) -> int:
    """The check of a `BudgetOptions` field that counts tokens kept within the budget (the
    ``streaming`` sink, the ``snapkv`` window): ValueError ``kv_policy.<field> (<value>) must be
    smaller than kv_policy.budget (<budget>)`` unless it is. A subclass attaches it with
    ``_name_in_budget = field_validator("<field>")(smaller_than_budget)`` and declares the field
    with ``validate_default=True``, so that a default is checked against the budget sent too.

    Cross-field checks are field validators: fields validate in declaration order, so ``budget``
    is in ``info.data`` (absent when it failed its own bounds, and then not compared), and the
    error's location, and so the API's ``param``, is the offending field."""
    budget = info.data.get("budget")
    if budget is not None and value >= budget:
        raise ValueError(f"kv_policy.{info.field_name} ({value}) must be smaller than "
                         f"kv_policy.budget ({budget})")
    return value


@dataclass(frozen=True)
class SelectionInputs:
    """What a policy may look at to choose the kept slots of one layer of one request.

    ``q_obs [n, Hq, D]`` are the queries (RoPE applied) of the last ``n`` prompt positions,
    ending at ``prompt_len - 1`` (``n`` = the policy's ``observation_window``, fewer when the
    prompt's last chunk is shorter);
    ``kv_cache``/``block_row`` locate the layer's keys and values (vLLM's paged cache
    ``[num_blocks, Hkv, block_size, 2*D]``), ``kv_layout`` where K and V lie inside its blocks
    (None: slot-major; pass it on to every ``kernels.ops`` call that reads ``kv_cache``);
    ``options`` is the request's validated options model (the policy's own class).
    """

    q_obs: Tensor
    kv_cache: Tensor
    block_row: Tensor
    prompt_len: int
    scale: float
    options: BudgetOptions
    kv_layout: KVLayout | None = None

    @property
    def num_kv_heads(self) -> int:
        return int(self.kv_cache.shape[1])

    @property
    def budget(self) -> int:
        return self.options.budget


class KVPolicy(ABC):
    """One eviction policy. Stateless: instances are shared by all requests."""

    name: ClassVar[str]
    # The policy's options model; its `name` field is `Literal[name]`.
    options_cls: ClassVar[type[PolicyOptions]]
    # False only for the policy that never evicts.
    evicts: ClassVar[bool] = True
    # Whether ``summarize_evicted`` returns something, merged back at decode (CaliDrop).
    calibrates: ClassVar[bool] = False

    @abstractmethod
    def select(self, inputs: SelectionInputs) -> Tensor:
        """Kept slots ``[Hkv, budget]`` int64, ascending per head, all ``< prompt_len``.

        Called only when ``prompt_len > budget``.
        """

    def observation_window(self, options: PolicyOptions) -> int:
        """How many of the last prompt queries ``select`` reads (``SelectionInputs.q_obs``).
        Default: none."""
        return 0

    def summarize_evicted(self, inputs: SelectionInputs, kept: Tensor,
                          q_ref: Tensor) -> object | None:
        """What the policy keeps of the evicted slots of one layer, before compaction
        overwrites them (``q_ref [Hq, D]``: the last prompt query). The runtime stores it per
        (request, layer) for the decode-time calibration (``policies.calidrop``). Default:
        nothing."""
        return None
