"""Scheduler-process side of eviction: a KV-cache spec/manager that frees evicted blocks.

vLLM's scheduler asks each KV-cache manager, for every request at every allocation, to
``remove_skipped_blocks(request_id, processed_tokens, num_prompt_tokens)``. Our manager
(``KVPolicyManager``, a ``FullAttentionManager``) answers it from the request's eviction plan:
once the prompt is fully processed (the worker compacted the kept KV into the first ``budget``
slots in that step), it frees ``plan.freed_blocks`` - the blocks lying wholly in the gap - and
leaves ``null_block`` in their place, like vLLM's R-SWA manager does for its gap.

The manager only gets a request id, so the per-request ``kv_policy`` must reach it through the
scheduler: ``KVPolicyScheduler`` (select it with the engine arg
``scheduler_cls="kv_policies.engine.KVPolicyScheduler"``, or ``KVPolicyAsyncScheduler`` with
async scheduling) records each request's plan on arrival and drops it when the request finishes.
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

SCHEDULER_CLS = "kv_policies.engine.KVPolicyScheduler"
ASYNC_SCHEDULER_CLS = "kv_policies.engine.KVPolicyAsyncScheduler"

# Resolved lazily so that register() (run at plugin load in every process) stays cheap.
_LAZY = {
    "KVPolicyScheduler": "kv_policies.scheduler",
    "KVPolicyAsyncScheduler": "kv_policies.scheduler",
    "KVPolicyManager": "kv_policies.manager",
    "KVPolicyAttentionSpec": "kv_policies.manager",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


def scheduler_cls(async_scheduling: bool) -> str:
    """The ``scheduler_cls`` engine arg to pass for the given scheduling mode."""
    return ASYNC_SCHEDULER_CLS if async_scheduling else SCHEDULER_CLS


_REGISTERED = False


def register() -> None:
    """Called by the plugin's register() in every vLLM process; idempotent and cheap.

    Loads the policy registry. The eviction state of finished and preempted requests is dropped
    by the model-runner hook in ``attention_backends.runner_hooks``. The KV-cache spec registers
    itself when the scheduler starts (vLLM's own specs must be registered first), and the
    scheduler is chosen by the ``scheduler_cls`` engine arg.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    import kv_policies.registry  # noqa: F401

    _REGISTERED = True
