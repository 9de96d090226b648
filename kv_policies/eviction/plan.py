"""The eviction plan: which KV slots and blocks a compressed request keeps.

Both the scheduler process (which frees blocks) and the worker (which compacts KV in place)
compute the plan from the same three inputs - the request's ``kv_policy`` dict, its prompt length
and the KV block size - so the two sides agree without exchanging any message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydantic import ValidationError

from kv_policies.eviction.base import PolicyOptions
from kv_policies.eviction.options import parse_kv_policy

logger = logging.getLogger(__name__)


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


def checked_options(kv_policy: object) -> PolicyOptions | None:
    """A request's ``kv_policy`` extra arg as its policy's validated options model (e.g.
    ``SnapKVOptions``); None when absent or invalid.

    The server rejects invalid options with a 400; a plain vLLM caller can still put anything
    in ``extra_args``, and in the engine an invalid value must not raise (that would kill the
    engine for every request): such a request runs without eviction, as with ``none``.
    """
    if not kv_policy:
        return None
    try:
        return parse_kv_policy(kv_policy)
    except (ValidationError, TypeError) as exc:
        logger.warning("invalid kv_policy %.200r ignored (no eviction): %s", kv_policy,
                       str(exc).splitlines()[0])
        return None


def policy_name(kv_policy: object) -> str:
    """The policy name of a request's ``kv_policy`` dict (absent or invalid means ``none``)."""
    if isinstance(kv_policy, dict) and kv_policy.get("name") in (None, "", "none"):
        return "none"  # the common case, without validation
    opts = checked_options(kv_policy)
    return opts.name if opts is not None else "none"


def eviction_plan(kv_policy: object, prompt_len: int, block_size: int) -> EvictionPlan | None:
    """The plan for one request, or None when its KV is left untouched.

    None when the policy is absent, invalid (``checked_options``) or ``none``, or when the prompt
    fits the budget. The freed
    blocks are those whose every slot lies in the gap ``[budget, prompt_len)``:
    ``range(ceil(budget / block_size), prompt_len // block_size)`` (possibly empty).
    """
    if policy_name(kv_policy) == "none":
        return None
    return plan_for_options(checked_options(kv_policy), prompt_len, block_size)


def plan_for_options(opts: PolicyOptions | None, prompt_len: int,
                     block_size: int) -> EvictionPlan | None:
    """``eviction_plan`` from already validated options (None: no eviction)."""
    if opts is None or opts.name == "none":
        return None
    budget = opts.budget  # every policy but `none` has one
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
