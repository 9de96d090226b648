"""Model-runner hook: drop eviction state of finished *and preempted* requests every step.

A preempted request recomputes its prompt (and generated tokens) with full attention and is
compressed again when the recompute passes the prompt's end; calibration state kept across the
preemption would be merged into the recompute's attention. vLLM tells the worker about both in
the scheduler output (``finished_req_ids``, ``preempted_req_ids``), which ``_update_states``
receives first thing every step, so we wrap it (calling the original unchanged).
"""

from __future__ import annotations

import functools

_MARK = "_fluxserve_kv_release_wrapped"


def release_from_scheduler_output(scheduler_output) -> None:
    from kv_policies.runtime import get_runtime

    rt = get_runtime()
    if not rt.num_requests():
        return
    for attr in ("finished_req_ids", "preempted_req_ids"):
        for req_id in getattr(scheduler_output, attr, None) or ():
            rt.release(req_id)


def install() -> None:
    """Wrap the V1 model runner's ``_update_states`` (idempotent)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    orig = GPUModelRunner._update_states
    if getattr(orig, _MARK, False):
        return

    @functools.wraps(orig)
    def _update_states(self, scheduler_output, *args, **kwargs):
        release_from_scheduler_output(scheduler_output)
        return orig(self, scheduler_output, *args, **kwargs)

    setattr(_update_states, _MARK, True)
    GPUModelRunner._update_states = _update_states
