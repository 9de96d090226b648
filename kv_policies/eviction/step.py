"""The eviction part of a step's attention metadata, built by the KV-policy code only.

For every row of the step: the request's eviction plan (None: its KV is untouched) and its
validated ``kv_policy`` options; ``kept_end`` / ``gap_end [num_rows]`` int32 on rows compressed
in an earlier step (else 0, 0: attention masks slots ``[kept_end, gap_end)``); and the rows whose
prompt
completes in this step, which the attention step compresses right after each layer's attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from attention_backends.kernels.host import to_device
from kv_policies.eviction.base import PolicyOptions
from kv_policies.eviction.options import EXTRA_ARGS_KEY
from kv_policies.eviction.plan import EvictionPlan
from kv_policies.eviction.runtime import KVPolicyRuntime


class StepRow(Protocol):
    """One request of the step (``attention_backends.flux.request_state.BatchRow``)."""

    req_id: str
    prompt_len: int
    num_computed: int  # tokens computed before this step
    extra_args: dict | None


@dataclass
class EvictionStep:
    plans: list[EvictionPlan | None]
    policies: list[PolicyOptions | None]  # each row's validated options (None: no plan)
    kept_end: torch.Tensor | None = None  # [R] int32, CPU; None when no row has a plan
    gap_end: torch.Tensor | None = None
    # rows whose prompt completes in this step and that have a plan:
    # (row, first token, end token in the batch, rows of the chunk up to the last prompt query)
    compress_rows: list[tuple[int, int, int, int]] = field(default_factory=list)
    any_compressed: bool = False  # a row reads KV compressed in an earlier step
    _device_gaps: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def has_plans(self) -> bool:
        # kept_end is set exactly when a row has a plan (build_eviction_step); asked per layer
        return self.kept_end is not None or any(p is not None for p in self.plans)

    @property
    def active(self) -> bool:
        """A row reads compressed KV (compressed in an earlier step) or compresses in this one.
        A step without such rows needs nothing from eviction: a planned request's prompt
        chunks before the last are plain dense attention."""
        return self.any_compressed or bool(self.compress_rows)

    def bounds(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kept_end, gap_end)`` on ``device``, copied once per step."""
        if self._device_gaps is None or self._device_gaps[0].device != device:
            self._device_gaps = (to_device(self.kept_end, device),
                                 to_device(self.gap_end, device))
        return self._device_gaps


def build_eviction_step(num_rows: int, query_start_loc: Sequence[int],
                        rows: Sequence[StepRow | None], block_size: int | None,
                        runtime: KVPolicyRuntime) -> EvictionStep:
    """The step's eviction metadata. ``query_start_loc [num_rows + 1]`` host ints; ``rows`` in
    batch order (None or missing: padding); ``block_size`` None: no eviction.

    Given the runtime's plans (``runtime.plan_version``), a row's part depends on its tokens only
    through whether its prompt is done before the step (``num_computed >= prompt_len``) and
    whether it completes in the step (``vllm_glue.metadata`` reuses a step on that basis)."""
    qsl = query_start_loc
    plans: list[EvictionPlan | None] = [None] * num_rows
    policies: list[PolicyOptions | None] = [None] * num_rows
    kept_l = [0] * num_rows
    gap_l = [0] * num_rows
    compress_rows: list[tuple[int, int, int, int]] = []
    for i in range(min(num_rows, len(rows)) if block_size else 0):
        r = rows[i]
        if r is None or not r.extra_args:
            continue
        policy = r.extra_args.get(EXTRA_ARGS_KEY)
        if not policy:
            continue
        plan, options = runtime.planned(r.req_id, policy, r.prompt_len, block_size)
        if plan is None:
            continue
        plans[i], policies[i] = plan, options
        if r.num_computed >= r.prompt_len:
            kept_l[i], gap_l[i] = plan.kept_end, plan.gap_end
        elif r.prompt_len <= r.num_computed + qsl[i + 1] - qsl[i]:  # the prompt completes now
            compress_rows.append((i, qsl[i], qsl[i + 1], r.prompt_len - r.num_computed))
    if not any(p is not None for p in plans):
        return EvictionStep(plans, policies)
    # through numpy: torch.tensor(list) costs three times as much
    return EvictionStep(plans, policies, torch.from_numpy(np.array(kept_l, dtype=np.int32)),
                        torch.from_numpy(np.array(gap_l, dtype=np.int32)), compress_rows,
                        any_compressed=any(kept_l))
