"""``none``: keep every token (no plan is ever made for it)."""

from __future__ import annotations

from torch import Tensor

from kv_policies.eviction.base import KVPolicy, SelectionInputs


class NoEvictionPolicy(KVPolicy):
    name = "none"
    evicts = False

    def select(self, inputs: SelectionInputs) -> Tensor:
        raise RuntimeError("the 'none' policy never evicts; no eviction plan should exist")
