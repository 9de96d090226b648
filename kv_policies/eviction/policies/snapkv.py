"""``snapkv``: keep per KV head the top ``budget - window`` prompt tokens by the attention the
last ``window`` prompt queries pay them (max-pooled along positions, summed over each GQA group),
plus the window itself."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator
from torch import Tensor

from attention_backends.kernels import ops
from kv_policies.eviction.base import (
    MAX_TOKENS_OPTION,
    BudgetOptions,
    KVPolicy,
    SelectionInputs,
    smaller_than_budget,
)

# SnapKV pools scores over a small neighbourhood (the paper's kernel is 7); past a few dozen
# positions pooling only smears the selection. 63 keeps the pooling cost (O(L * k) per head) below
# that of computing the scores it pools (O(L * window * head_dim) per head).
MAX_POOL_KERNEL = 63


class SnapKVOptions(BudgetOptions):
    """``{"name": "snapkv", "budget", "window", "pool_kernel"}``."""

    name: Literal["snapkv"] = "snapkv"
    window: int = Field(
        default=32, ge=1, le=MAX_TOKENS_OPTION, validate_default=True,
        description="Observation window (the last prompt tokens, always kept); below `budget`.")
    pool_kernel: int = Field(
        default=7, ge=1, le=MAX_POOL_KERNEL, validate_default=True,
        description=f"Max-pool kernel over scores (odd, at most {MAX_POOL_KERNEL} and `budget`).")

    _window_in_budget = field_validator("window")(smaller_than_budget)

    # Cross-field, like `smaller_than_budget`: budget validates first (declaration order).
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


class SnapKVPolicy(KVPolicy):
    name = "snapkv"
    options_cls = SnapKVOptions

    def observation_window(self, options: SnapKVOptions) -> int:
        return options.window

    def select(self, inputs: SelectionInputs) -> Tensor:
        opts = inputs.options
        scores = ops.snapkv_scores(inputs.q_obs, inputs.kv_cache, inputs.block_row,
                                   inputs.prompt_len, inputs.scale, opts.pool_kernel,
                                   inputs.kv_layout)
        return ops.select_kept(scores, inputs.budget, opts.window)
