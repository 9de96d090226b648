"""``snapkv``: keep per KV head the top ``budget - window`` prompt tokens by the attention the
last ``window`` prompt queries pay them (max-pooled along positions, summed over each GQA group),
plus the window itself."""

from __future__ import annotations

from torch import Tensor

from attention_backends.kernels import ops
from kv_policies.eviction.base import KVPolicy, SelectionInputs


class SnapKVPolicy(KVPolicy):
    name = "snapkv"

    def select(self, inputs: SelectionInputs) -> Tensor:
        opts = inputs.options
        scores = ops.snapkv_scores(inputs.q_obs, inputs.kv_cache, inputs.block_row,
                                   inputs.prompt_len, inputs.scale, int(opts["pool_kernel"]))
        return ops.select_kept(scores, inputs.budget, int(opts["window"]))
