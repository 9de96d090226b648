"""The built-in policies, one module each. ``BUILTIN_POLICIES`` is what the registry
(``kv_policies.eviction.registry``) serves: a new policy is one module here plus one entry there."""

from kv_policies.eviction.policies.calidrop import CaliDropPolicy
from kv_policies.eviction.policies.none import NoEvictionPolicy
from kv_policies.eviction.policies.snapkv import SnapKVPolicy
from kv_policies.eviction.policies.streaming import StreamingPolicy

BUILTIN_POLICIES = (NoEvictionPolicy, StreamingPolicy, SnapKVPolicy, CaliDropPolicy)

__all__ = ["BUILTIN_POLICIES", "CaliDropPolicy", "NoEvictionPolicy", "SnapKVPolicy",
           "StreamingPolicy"]
