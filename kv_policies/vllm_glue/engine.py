"""Engine-core side of eviction: a KV-cache spec/manager that frees evicted blocks.

vLLM's scheduler asks each KV-cache manager, for every request at every allocation, to
``remove_skipped_blocks(request_id, processed_tokens, num_prompt_tokens)``. Our manager
(``KVPolicyManager``, a ``FullAttentionManager``) answers it from the request's eviction plan:
once the prompt is fully processed (the worker compacted the kept KV into the first ``budget``
slots in that step), it frees ``plan.freed_blocks`` - the blocks lying wholly in the gap - and
leaves ``null_block`` in their place, like vLLM's R-SWA manager does for its gap.

The manager only gets a request id, so the per-request ``kv_policy`` must reach it through the
scheduler: ``KVPolicyScheduler`` (select it with the engine arg ``scheduler_cls=SCHEDULER_CLS``,
or ``ASYNC_SCHEDULER_CLS`` with async scheduling; the server does) records each request's plan
on arrival and drops it when the request finishes. The spec registers itself
(``register_kv_cache_spec``'s registry) when the scheduler starts, after vLLM's own specs.
The same subclass swaps the scheduler-side copy of the KV-cache config's full-attention spec
for ``KVPolicyAttentionSpec`` (same fields, so same memory layout), whose registered manager is
``KVPolicyManager``; workers never see it.

Prefix caching: a compressed request neither reads cached prefix blocks (compaction rewrites its
first blocks in place, which must not be shared) nor publishes its blocks (they stop holding the
prompt once compacted). Requests without a plan use the prefix cache as usual.

Preemption: vLLM frees all blocks of a preempted request and recomputes it; the plan is kept
(the prompt length does not change), the manager forgets that it already freed the gap, and the
gap is freed again once the recomputed prompt is processed (the worker compresses it again).
"""

from __future__ import annotations

SCHEDULER_CLS = "kv_policies.vllm_glue.scheduler.KVPolicyScheduler"
ASYNC_SCHEDULER_CLS = "kv_policies.vllm_glue.scheduler.KVPolicyAsyncScheduler"


def scheduler_cls(async_scheduling: bool) -> str:
    """The ``scheduler_cls`` engine arg to pass for the given scheduling mode."""
    return ASYNC_SCHEDULER_CLS if async_scheduling else SCHEDULER_CLS


# The worker side (compaction, calibration) is ``kv_policies.eviction.runtime``, driven by the
# attention step (``attention_backends.vllm_glue.attention``); the eviction state of finished
# and preempted requests is released by the model-runner hook in
# ``attention_backends.vllm_glue.vllm_private``.
