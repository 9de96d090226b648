"""``calidrop``: SnapKV's selection, plus a calibration of what it evicted.

At eviction, per (layer, query head), CaliDrop keeps the evicted set's attention output ``o_E``
and log-sum-exp ``lse_E`` under the last prompt query ``q_ref`` (``summarize_evicted``). At
decode, wherever the decode query's cosine similarity to ``q_ref`` reaches ``tau``, the kernel
merges ``(o_E, lse_E)`` into the attention over the kept slots as if the evicted slots were
still there (``batched_calibration`` builds the kernel's ``ops.Calibration`` input; the merge is
in ``attention_backends.kernels``). See docs/kv_policies.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from attention_backends.kernels import ops
from attention_backends.kernels.host import to_device
from kv_policies.eviction.base import SelectionInputs
from kv_policies.eviction.policies.snapkv import SnapKVOptions, SnapKVPolicy


class CaliDropOptions(SnapKVOptions):
    """``{"name": "calidrop", "budget", "window", "pool_kernel", "tau"}``: SnapKV's fields and
    the calibration threshold."""

    name: Literal["calidrop"] = "calidrop"  # type: ignore[assignment]
    tau: float = Field(
        default=0.9, ge=-1.0, le=1.0,
        description="Cosine threshold between the decode query and the last prompt query at "
                    "or above which the calibration term is applied (-1: always).")

    @field_validator("tau")
    @classmethod
    def _finite_tau(cls, v: float) -> float:
        if not math.isfinite(v):  # allow_inf_nan covers JSON; this covers Python callers too
            raise ValueError("kv_policy.tau must be finite")
        return v


@dataclass
class LayerCalibration:
    """The evicted set of one (request, layer), summarised per query head."""

    q_ref: Tensor  # [Hq, D], the last prompt query (RoPE applied), in the query dtype
    o_e: Tensor  # [Hq, D] float32, attention output of q_ref over the evicted slots
    lse_e: Tensor  # [Hq] float32, log-sum-exp of q_ref's scores over the evicted slots
    tau: float  # the request's kv_policy.tau


class CaliDropPolicy(SnapKVPolicy):
    name = "calidrop"
    options_cls = CaliDropOptions
    calibrates = True

    def summarize_evicted(self, inputs: SelectionInputs, kept: Tensor,
                          q_ref: Tensor) -> LayerCalibration:
        """``ops.evicted_partial`` of ``q_ref [Hq, D]`` over the prompt slots not in ``kept``;
        must run before compaction overwrites the slots it reads."""
        o_e, lse_e = ops.evicted_partial(q_ref, inputs.kv_cache, inputs.block_row, kept,
                                         inputs.prompt_len, inputs.scale, inputs.kv_layout)
        return LayerCalibration(q_ref=q_ref.detach().clone(), o_e=o_e, lse_e=lse_e,
                                tau=inputs.options.tau)


def batched_calibration(rows: Sequence[LayerCalibration | None],
                        device: torch.device | str) -> ops.Calibration | None:
    """The kernel's ``ops.Calibration`` for one layer of a batch of ``S = len(rows)`` requests,
    in batch order, or None when no row has one. Rows without calibration get
    ``enabled = False`` (zeros, ``lse_E = -inf``); each row keeps its own ``tau``."""
    present = [c for c in rows if c is not None]
    if not present:
        return None
    (hq, d), dev = present[0].q_ref.shape, present[0].q_ref.device
    # one stack per tensor (rows without calibration read a shared blank row), and the host
    # values copied without a host sync
    blank_q = torch.zeros(hq, d, dtype=present[0].q_ref.dtype, device=dev)
    blank_o = torch.zeros(hq, d, dtype=torch.float32, device=dev)
    blank_l = torch.full((hq,), float("-inf"), dtype=torch.float32, device=dev)
    q_ref = torch.stack([blank_q if c is None else c.q_ref for c in rows]).to(device)
    o_e = torch.stack([blank_o if c is None else c.o_e for c in rows]).to(device)
    lse_e = torch.stack([blank_l if c is None else c.lse_e for c in rows]).to(device)
    enabled = torch.tensor([c is not None for c in rows], dtype=torch.bool)
    taus = torch.tensor([1.0 if c is None else c.tau for c in rows], dtype=torch.float32)
    return ops.Calibration(q_ref=q_ref, o_e=o_e, lse_e=lse_e,
                           enabled=to_device(enabled, device), tau=to_device(taus, device))
