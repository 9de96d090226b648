"""``streaming``: keep the first ``sink`` tokens and the most recent ``budget - sink``."""

from __future__ import annotations

import torch
from torch import Tensor

from kv_policies.eviction.base import KVPolicy, SelectionInputs


class StreamingPolicy(KVPolicy):
    name = "streaming"

    def select(self, inputs: SelectionInputs) -> Tensor:
        budget, length = inputs.budget, inputs.prompt_len
        sink = min(int(inputs.options["sink"]), budget)
        dev = inputs.kv_cache.device
        kept = torch.cat([
            torch.arange(sink, dtype=torch.int64, device=dev),
            torch.arange(length - (budget - sink), length, dtype=torch.int64, device=dev),
        ])
        # Position-only: every KV head keeps the same slots.
        return kept[None, :].expand(inputs.num_kv_heads, budget).contiguous()
