"""Built-in policies; importing this package registers them."""

from kv_policies.policies.calidrop import CaliDropPolicy
from kv_policies.policies.none import NoEvictionPolicy
from kv_policies.policies.snapkv import SnapKVPolicy
from kv_policies.policies.streaming import StreamingPolicy

__all__ = ["CaliDropPolicy", "NoEvictionPolicy", "SnapKVPolicy", "StreamingPolicy"]
