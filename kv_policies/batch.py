"""Per-step KV-policy metadata for the attention backend, and its per-layer hooks.

The attention backend (``attention_backends/backend.py``) uses this module in three places:

1. Metadata build, once per step: ``build_kv_batch(rows, query_start_loc_cpu, extra_args_of)``
   with the batch the model runner published (request id, prompt length, tokens computed before
   this step, per row). It returns a ``KVBatch``:

   - ``compressed[r]``: row r's KV is already compacted (its prompt completed in an earlier
     step). Its attention must go through ``ops.paged_attention`` with ``kept_end``/``gap_end``
     (vLLM's stock kernel would read the gap, whose blocks are freed and reused).
   - ``kept_end``/``gap_end [R]`` int32 (0/0 on other rows, which masks nothing).
   - ``compress_rows``: rows whose prompt completes in this step.

2. Before each layer's attention over compressed rows: ``kv.calibration(layer_idx, rows,
   device)`` gives the ``ops.Calibration`` for those rows (in the given order) or None; after
   it, ``kv.record_hits(layer_idx, rows, hits, sub_query_start_loc)``.

3. Right after each layer's attention: ``kv.compress_after_attention(layer_idx, query,
   kv_cache, block_table, scale)`` evicts and compacts the rows of ``compress_rows`` in place
   (``query [T, Hq, D]`` with RoPE applied, the whole batch's; ``block_table [R, max_blocks]``).

And once per step in the model runner, before its own state update:
``release_from_scheduler_output(scheduler_output)`` drops the state of finished *and preempted*
requests (a preempted request recomputes its prompt with full attention and is compressed
again; calibration state kept across that would be applied to the recompute).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kv_policies.options import EXTRA_ARGS_KEY
from kv_policies.plan import EvictionPlan, eviction_plan
from kv_policies.runtime import get_runtime

# eviction_plan needs a block size only for the freed block range, which the worker never uses.
_ANY_BLOCK_SIZE = 16


@dataclass
class KVBatch:
    req_ids: list[str | None]
    plans: list[EvictionPlan | None]
    policies: list[dict | None]
    compressed: Tensor  # [R] bool, CPU
    kept_end: Tensor  # [R] int32, CPU
    gap_end: Tensor  # [R] int32, CPU
    compress_rows: list[int]  # rows whose prompt completes in this step
    q_ends: dict[int, int]  # row -> query rows of this step up to its last prompt token
    query_start_loc: list[int]

    @property
    def any_compressed(self) -> bool:
        return bool(self.compressed.any())

    def calibration(self, layer_idx: int, rows: Sequence[int], device):
        ids = [self.req_ids[r] or "" for r in rows]
        return get_runtime().calibration_for(layer_idx, ids, device)

    def record_hits(self, layer_idx: int, rows: Sequence[int], hits: Tensor | None,
                    query_start_loc: Sequence[int] | Tensor | None = None) -> None:
        ids = [self.req_ids[r] or "" for r in rows]
        get_runtime().record_hits(layer_idx, ids, hits, query_start_loc)

    def compress_after_attention(self, layer_idx: int, query: Tensor, kv_cache: Tensor,
                                 block_table: Tensor, scale: float) -> None:
        if not self.compress_rows:
            return
        rt = get_runtime()
        qsl = self.query_start_loc
        for r in self.compress_rows:
            rt.compress_layer(self.req_ids[r], layer_idx, self.plans[r], self.policies[r],
                              query[qsl[r]:qsl[r + 1]], kv_cache, block_table[r], scale,
                              q_end=self.q_ends[r])


def build_kv_batch(rows: Sequence, query_start_loc_cpu: Tensor,
                   extra_args_of: Callable[[str], dict | None] | None,
                   num_rows: int | None = None) -> KVBatch | None:
    """The step's KV-policy metadata, or None when no row of the batch has an eviction plan.

    ``rows[i]`` has ``req_id``, ``prompt_len`` and ``num_computed`` (tokens computed before
    this step), or is None (padding).
    """
    qsl = [int(v) for v in query_start_loc_cpu.tolist()]
    n = len(qsl) - 1 if num_rows is None else num_rows
    req_ids: list[str | None] = [None] * n
    plans: list[EvictionPlan | None] = [None] * n
    policies: list[dict | None] = [None] * n
    compressed = torch.zeros(n, dtype=torch.bool)
    kept_end = torch.zeros(n, dtype=torch.int32)
    gap_end = torch.zeros(n, dtype=torch.int32)
    compress_rows: list[int] = []
    q_ends: dict[int, int] = {}
    for i in range(min(n, len(rows))):
        row = rows[i]
        if row is None or extra_args_of is None:
            continue
        policy = (extra_args_of(row.req_id) or {}).get(EXTRA_ARGS_KEY)
        plan = eviction_plan(policy, row.prompt_len, _ANY_BLOCK_SIZE)
        if plan is None:
            continue
        req_ids[i], plans[i], policies[i] = row.req_id, plan, policy
        q_len = qsl[i + 1] - qsl[i]
        if row.num_computed >= plan.gap_end:
            compressed[i] = True
            kept_end[i] = plan.kept_end
            gap_end[i] = plan.gap_end
        elif row.num_computed + q_len >= plan.gap_end:
            compress_rows.append(i)
            q_ends[i] = plan.gap_end - row.num_computed
    if not (compress_rows or bool(compressed.any())):
        return None
    return KVBatch(req_ids, plans, policies, compressed, kept_end, gap_end, compress_rows,
                   q_ends, qsl)


def release_from_scheduler_output(scheduler_output) -> None:
    """Drop the eviction state of requests finished or preempted since the last step."""
    rt = get_runtime()
    for attr in ("finished_req_ids", "preempted_req_ids"):
        for req_id in getattr(scheduler_output, attr, None) or ():
            rt.release(req_id)
