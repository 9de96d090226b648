"""The interface every KV-eviction policy implements.

A policy decides, once per layer when a request's prompt is complete, which prompt slots each KV
head keeps. It only selects: compaction, freeing blocks and calibration are done by the runtime
(``kv_policies.eviction.runtime``) and the scheduler-side manager
(``kv_policies.vllm_glue.manager``) alike for every policy, so a new policy is one small class in
``kv_policies/eviction/policies/`` plus its entry in ``BUILTIN_POLICIES`` there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from kv_policies.eviction.options import KVPolicyOptions

_DEFAULTS = {name: f.default for name, f in KVPolicyOptions.model_fields.items()}


def resolved_options(kv_policy: dict | None) -> dict:
    """The request's ``kv_policy`` dict with every missing field at its default."""
    return {**_DEFAULTS, **(kv_policy or {})}


@dataclass(frozen=True)
class SelectionInputs:
    """What a policy may look at to choose the kept slots of one layer of one request.

    ``q_obs`` are the queries (RoPE applied) of the last ``q_obs.shape[0]`` prompt positions,
    ending at ``prompt_len - 1``; ``kv_cache``/``block_row`` locate the layer's keys and values
    (vLLM's paged layout ``[num_blocks, Hkv, block_size, 2*D]``); ``options`` is the resolved
    ``kv_policy`` dict (``resolved_options``).
    """

    q_obs: Tensor
    kv_cache: Tensor
    block_row: Tensor
    prompt_len: int
    scale: float
    options: dict

    @property
    def num_kv_heads(self) -> int:
        return int(self.kv_cache.shape[1])

    @property
    def budget(self) -> int:
        return int(self.options["budget"])


class KVPolicy(ABC):
    """One eviction policy. Stateless: instances are shared by all requests."""

    name: ClassVar[str]
    # Whether the runtime stores (q_ref, o_E, lse_E) of the evicted set for decode-time merging.
    calibrates: ClassVar[bool] = False
    # False only for the policy that never evicts.
    evicts: ClassVar[bool] = True

    @abstractmethod
    def select(self, inputs: SelectionInputs) -> Tensor:
        """Kept slots ``[Hkv, budget]`` int64, ascending per head, all ``< prompt_len``.

        Called only when ``prompt_len > budget``.
        """
