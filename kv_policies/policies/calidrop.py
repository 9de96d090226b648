"""``calidrop``: SnapKV selection; the runtime additionally keeps, per (layer, query head), the
evicted set's attention output and log-sum-exp under the last prompt query, merged at decode
when the decode query is close enough to it (see docs/kv_policies.md)."""

from __future__ import annotations

from kv_policies.policies.snapkv import SnapKVPolicy
from kv_policies.registry import register_policy


@register_policy
class CaliDropPolicy(SnapKVPolicy):
    name = "calidrop"
    calibrates = True
