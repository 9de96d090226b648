"""The scheduler-side KV-cache spec and manager that free a compressed request's gap blocks.

See ``kv_policies.vllm_glue.engine`` for how the pieces fit together.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from kv_policies.eviction import metrics
from kv_policies.eviction.plan import EvictionPlan, eviction_plan, policy_name


class KVPolicyManager(FullAttentionManager):
    """Full-attention manager that frees a compressed request's gap blocks after its prompt."""

    def __init__(self, kv_cache_spec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        # req_id -> (plan, policy name); set by the scheduler, for compressed requests only.
        self.plans: dict[str, tuple[EvictionPlan, str]] = {}
        # Requests whose gap is already freed (reset when their blocks are freed: preemption).
        self._gap_freed: set[str] = set()

    def set_plan(self, request_id: str, kv_policy: dict | None, num_prompt_tokens: int) -> bool:
        plan = eviction_plan(kv_policy, num_prompt_tokens, self.block_size)
        if plan is None:
            return False
        self.plans[request_id] = (plan, policy_name(kv_policy))
        return True

    def drop_plan(self, request_id: str) -> None:
        self.plans.pop(request_id, None)
        self._gap_freed.discard(request_id)

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        entry = self.plans.get(request_id)
        if (entry is None or request_id in self._gap_freed
                or processed_computed_tokens < entry[0].gap_end):
            return
        plan, name = entry
        self._gap_freed.add(request_id)
        blocks = self.req_to_blocks.get(request_id, [])
        stop = min(plan.freed_blocks.stop, len(blocks))
        freed = sum(1 for i in range(plan.freed_blocks.start, stop)
                    if blocks[i] is not self._null_block)
        # private vLLM API, checked at start-up: attention_backends.vllm_glue.vllm_private
        self._remove_blocks_in_range(request_id, plan.freed_blocks.start, stop)
        metrics.KV_COMPRESSED_REQUESTS.labels(name).inc()
        metrics.KV_TOKENS_EVICTED.labels(name).inc(plan.num_evicted)
        if freed:
            metrics.KV_BLOCKS_FREED.labels(name).inc(freed)

    def cache_blocks(self, request, num_tokens: int, retention_interval=None, *,
                     replay_boundaries) -> None:
        # A compressed request's first blocks are rewritten by compaction: never publish them.
        if request.request_id in self.plans:
            return
        super().cache_blocks(request, num_tokens, retention_interval,
                             replay_boundaries=replay_boundaries)

    def pop_blocks_for_free(self, request_id: str):
        self._gap_freed.discard(request_id)
        return super().pop_blocks_for_free(request_id)

    def num_held_blocks(self, request_id: str) -> int:
        return sum(1 for b in self.req_to_blocks.get(request_id, ()) if not b.is_null)


@dataclass(frozen=True, kw_only=True)
class KVPolicyAttentionSpec(FullAttentionSpec):
    """Full attention whose blocks ``KVPolicyManager`` may free after prefill (scheduler only)."""


_SPEC_REGISTERED = False


def register_spec() -> None:
    """Register our spec once vLLM's built-in specs are (registering earlier would stop vLLM from
    registering its own: its registry fills itself lazily only while empty)."""
    global _SPEC_REGISTERED
    if _SPEC_REGISTERED:
        return
    # Any lookup fills the built-in registrations first.
    KVCacheSpecRegistry.get_manager_class(
        FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=8, dtype=_float32()))
    KVCacheSpecRegistry.register(KVPolicyAttentionSpec, KVPolicyManager,
                                 uniform_type_base_spec=FullAttentionSpec)
    _SPEC_REGISTERED = True


def _float32():
    import torch

    return torch.float32


