"""``streaming``: keep the first ``sink`` tokens and the most recent ``budget - sink``
(StreamingLLM's attention sinks plus a recent window, applied once to the prompt)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from kv_policies.eviction.base import (
    MAX_TOKENS_OPTION,
    BudgetOptions,
    KVPolicy,
    SelectionInputs,
    smaller_than_budget,
)


class StreamingOptions(BudgetOptions):
    """``{"name": "streaming", "budget", "sink"}``."""

    name: Literal["streaming"] = "streaming"
    sink: int = Field(
        default=4, ge=0, le=MAX_TOKENS_OPTION, validate_default=True,
        description="Sink tokens: the first prompt tokens, always kept (below `budget`).")

    _sink_in_budget = field_validator("sink")(smaller_than_budget)


class StreamingPolicy(KVPolicy):
    name = "streaming"
    options_cls = StreamingOptions

    def select(self, inputs: SelectionInputs) -> Tensor:
        budget, length = inputs.budget, inputs.prompt_len
        sink = min(inputs.options.sink, budget)
        dev = inputs.kv_cache.device
        kept = torch.cat([
            torch.arange(sink, dtype=torch.int64, device=dev),
            torch.arange(length - (budget - sink), length, dtype=torch.int64, device=dev),
        ])
        # Position-only: every KV head keeps the same slots.
        return kept[None, :].expand(inputs.num_kv_heads, budget).contiguous()
