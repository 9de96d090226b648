"""``none``: keep every token (no plan is ever made for it)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from kv_policies.eviction.base import KVPolicy, PolicyOptions, SelectionInputs


class NoEvictionOptions(PolicyOptions):
    """``{"name": "none"}``: the KV cache is left as vLLM fills it. No other field."""

    name: Literal["none"] = "none"


class NoEvictionPolicy(KVPolicy):
    name = "none"
    options_cls = NoEvictionOptions
    evicts = False

    def select(self, inputs: SelectionInputs) -> Tensor:
        raise RuntimeError("the 'none' policy never evicts; no eviction plan should exist")
