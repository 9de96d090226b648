"""The eviction plan: which KV slots and blocks a compressed request keeps.

Both the scheduler process (which frees blocks) and the worker (which compacts KV in place)
compute the plan from the same three inputs - the request's ``kv_policy`` dict, its prompt length
and the KV block size - so the two sides agree without exchanging any message.
"""

from __future__ import annotations

from dataclasses import dataclass

from kv_policies.eviction.options import KVPolicyOptions

_FIELDS = KVPolicyOptions.model_fields
DEFAULT_BUDGET: int = _FIELDS["budget"].default


@dataclass(frozen=True, slots=True)
class EvictionPlan:
    """Where a compressed request's KV lives after its prompt is complete.

    Every layer keeps exactly ``budget`` prompt tokens per KV head, compacted into slots
    ``[0, kept_end)``. Slots ``[kept_end, gap_end)`` are a gap: the blocks lying wholly inside it
    (``freed_blocks``, logical block indices of the request) go back to vLLM's pool, and the
    partial blocks at its two ends hold stale data that attention must mask. Decode tokens keep
    their logical slots ``>= gap_end``.
    """

    budget: int
    kept_end: int
    gap_end: int
    freed_blocks: range

    @property
    def num_evicted(self) -> int:
        """Prompt tokens dropped per layer and KV head."""
        return self.gap_end - self.kept_end


def policy_name(kv_policy: dict | None) -> str:
    """The policy name of a request's ``kv_policy`` dict (absent means ``none``)."""
    if not kv_policy:
        return "none"
    return kv_policy.get("name") or "none"


def eviction_plan(kv_policy: dict | None, prompt_len: int, block_size: int) -> EvictionPlan | None:
    """The plan for one request, or None when its KV is left untouched.

    None when the policy is absent or ``none``, or when the prompt fits the budget. The freed
    blocks are those whose every slot lies in the gap ``[budget, prompt_len)``:
    ``range(ceil(budget / block_size), prompt_len // block_size)`` (possibly empty).
    """
    if policy_name(kv_policy) == "none":
        return None
    budget = int(kv_policy.get("budget") or DEFAULT_BUDGET)  # type: ignore[union-attr]
    if prompt_len <= budget:
        return None
    first_freed = -(-budget // block_size)
    last_freed = prompt_len // block_size
    return EvictionPlan(
        budget=budget,
        kept_end=budget,
        gap_end=prompt_len,
        freed_blocks=range(first_freed, max(first_freed, last_freed)),
    )
