"""The built-in policies, one module each (its options model and its policy class).
``BUILTIN_POLICIES`` is the one registration: the registry (``kv_policies.eviction.registry``)
serves these, and the request schema (``kv_policies.eviction.options.KVPolicyOptions``) is the
union of their options models."""

from kv_policies.eviction.policies.calidrop import CaliDropPolicy
from kv_policies.eviction.policies.none import NoEvictionPolicy
from kv_policies.eviction.policies.snapkv import SnapKVPolicy
from kv_policies.eviction.policies.streaming import StreamingPolicy

BUILTIN_POLICIES = (NoEvictionPolicy, StreamingPolicy, SnapKVPolicy, CaliDropPolicy)

__all__ = ["BUILTIN_POLICIES", "CaliDropPolicy", "NoEvictionPolicy", "SnapKVPolicy",
           "StreamingPolicy"]
