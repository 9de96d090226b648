"""Scheduler subclasses that hand each request's eviction plan to the KV-cache managers.

They also relay the engine's per-request accounting reports (``flux.accounting``) to the API
process: the eviction report of each compressed request (from its plan) and the routing
reports the worker attaches to a step's ``ModelRunnerOutput`` are put, under
``accounting.REPORT_KEY``, into the ``kv_transfer_params`` of the request's first output (the
step its prompt completes), where the API process takes them out again. Requests with neither
(``full`` routing, no eviction) have no report: a step with no report pending costs one check.

See ``kv_policies.vllm_glue.engine`` for how the pieces fit together.
"""

from __future__ import annotations

import copy

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, replace_as

from attention_backends.flux.accounting import REPORT_KEY, ROUTING_REPORTS_ATTR, EvictionReport
from kv_policies.eviction import metrics
from kv_policies.eviction.options import EXTRA_ARGS_KEY
from kv_policies.eviction.plan import policy_name
from kv_policies.vllm_glue.manager import KVPolicyAttentionSpec, KVPolicyManager, register_spec


def with_policy_specs(kv_cache_config: KVCacheConfig) -> KVCacheConfig:
    """A copy of the config whose plain full-attention groups use ``KVPolicyAttentionSpec``."""

    cfg = copy.copy(kv_cache_config)
    groups = []
    for group in kv_cache_config.kv_cache_groups:
        if type(group.kv_cache_spec) is FullAttentionSpec:
            group = copy.copy(group)
            group.kv_cache_spec = replace_as(group.kv_cache_spec, KVPolicyAttentionSpec)
        groups.append(group)
    cfg.kv_cache_groups = groups
    return cfg


class _KVPolicySchedulerMixin:
    """Records each request's eviction plan where the KV-cache managers can see it."""

    def __init__(self, *args, **kwargs) -> None:
        register_spec()
        if "kv_cache_config" in kwargs:
            kwargs["kv_cache_config"] = with_policy_specs(kwargs["kv_cache_config"])
        else:
            args = (args[0], with_policy_specs(args[1]), *args[2:])
        super().__init__(*args, **kwargs)
        managers = self.kv_cache_manager.coordinator.single_type_managers
        self._kv_policy_managers = [m for m in managers if isinstance(m, KVPolicyManager)]
        cfg = self.kv_cache_manager.kv_cache_config
        self._block_bytes = sum(
            g.kv_cache_spec.page_size_bytes * len(g.layer_names) for g in cfg.kv_cache_groups)
        # bytes of one block index in every group whose blocks eviction frees
        self._evictable_block_bytes = sum(
            g.kv_cache_spec.page_size_bytes * len(g.layer_names) for g in cfg.kv_cache_groups
            if isinstance(g.kv_cache_spec, KVPolicyAttentionSpec))
        self._kv_policy_names: dict[str, str] = {}
        # req_id -> accounting report not yet sent (sent with the request's first output);
        # those of requests freed in the step being processed wait in _reports_of_freed
        self._reports: dict[str, dict] = {}
        self._reports_of_freed: dict[str, dict] = {}

    def add_request(self, request) -> None:
        if request.request_id not in self.requests and request.sampling_params is not None:
            extra = request.sampling_params.extra_args or {}
            kv_policy = extra.get(EXTRA_ARGS_KEY)
            planned = [m.set_plan(request.request_id, kv_policy, request.num_prompt_tokens)
                       for m in self._kv_policy_managers]
            if any(planned):
                # Compaction rewrites the request's first blocks: they must be its own.
                request.skip_reading_prefix_cache = True
                plan = self._kv_policy_managers[planned.index(True)].plans[
                    request.request_id][0]
                self._reports[request.request_id] = {"eviction": EvictionReport(
                    plan.kept_end, plan.gap_end,
                    len(plan.freed_blocks) * self._evictable_block_bytes).to_wire()}
            self._kv_policy_names[request.request_id] = policy_name(kv_policy)
        super().add_request(request)

    def update_from_output(self, scheduler_output, model_runner_output):
        routing = getattr(model_runner_output, ROUTING_REPORTS_ATTR, None)
        if routing:
            for req_id, report in routing.items():
                if req_id in self.requests:
                    self._reports.setdefault(req_id, {})["routing"] = report
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if self._reports or self._reports_of_freed:
            self._send_reports(outputs)
        return outputs

    def _send_reports(self, outputs) -> None:
        """Put each pending report into its request's output of this step, if it has one (a
        request has none until its prompt completes); drop those of requests freed without."""
        for engine_outputs in outputs.values():
            for eco in engine_outputs.outputs:
                report = (self._reports.pop(eco.request_id, None)
                          or self._reports_of_freed.pop(eco.request_id, None))
                if report is not None:
                    eco.kv_transfer_params = {**(eco.kv_transfer_params or {}),
                                              REPORT_KEY: report}
        self._reports_of_freed.clear()

    def _free_blocks(self, request) -> None:
        # private vLLM API, checked at start-up: attention_backends.vllm_glue.vllm_private
        req_id = request.request_id
        report = self._reports.pop(req_id, None)
        if report is not None:  # its last output may still be built in this step
            self._reports_of_freed[req_id] = report
        name = self._kv_policy_names.pop(req_id, "none")
        held = max((m.num_held_blocks(req_id) for m in self._kv_policy_managers), default=0)
        if held:
            metrics.KV_BYTES_PER_REQUEST.labels(name).observe(held * self._block_bytes)
        super()._free_blocks(request)
        for m in self._kv_policy_managers:
            m.drop_plan(req_id)

    # ------------------------------------------------------------ introspection (tests, ops)

    def kv_policy_stats(self) -> dict:
        pool = self.kv_cache_manager.block_pool
        return {
            "num_free_blocks": pool.get_num_free_blocks(),
            "num_blocks": pool.num_gpu_blocks,
            "num_running": len(self.running),
            "num_plans": sum(len(m.plans) for m in self._kv_policy_managers),
        }


class KVPolicyScheduler(_KVPolicySchedulerMixin, Scheduler):
    """vLLM's scheduler plus per-request eviction plans (engine arg ``scheduler_cls``)."""


class KVPolicyAsyncScheduler(_KVPolicySchedulerMixin, AsyncScheduler):
    """The async-scheduling variant of ``KVPolicyScheduler``."""


