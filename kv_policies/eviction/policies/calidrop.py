"""``calidrop``: SnapKV selection; the runtime additionally keeps, per (layer, query head), the
evicted set's attention output and log-sum-exp under the last prompt query, merged at decode
when the decode query is close enough to it (see docs/kv_policies.md)."""

from __future__ import annotations

from kv_policies.eviction.policies.snapkv import SnapKVPolicy


class CaliDropPolicy(SnapKVPolicy):
    name = "calidrop"
    calibrates = True
