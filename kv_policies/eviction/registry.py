"""Name -> policy registry (one instance per policy class; policies are stateless).

Serves the built-in policies (``kv_policies.eviction.policies.BUILTIN_POLICIES``, whose options
models make up the request schema) and any class registered with ``register_policy`` (usable
by Python callers of the runtime; the request schema accepts the built-in names only).
"""

from __future__ import annotations

from kv_policies.eviction.base import KVPolicy
from kv_policies.eviction.policies import BUILTIN_POLICIES

_REGISTRY: dict[str, KVPolicy] = {}


def register_policy(cls: type[KVPolicy]) -> type[KVPolicy]:
    """Make ``cls`` available under ``cls.name`` (usable as a class decorator)."""
    existing = _REGISTRY.get(cls.name)
    if existing is not None and type(existing) is not cls:
        raise ValueError(f"kv policy {cls.name!r} already registered by {type(existing)}")
    _REGISTRY[cls.name] = cls()
    return cls


def get_policy(name: str | None) -> KVPolicy:
    """The policy registered under ``name`` (None means ``none``)."""
    try:
        return _REGISTRY[name or "none"]
    except KeyError:
        raise ValueError(f"unknown kv policy {name!r}; known: {sorted(_REGISTRY)}") from None


def policy_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


for _cls in BUILTIN_POLICIES:
    register_policy(_cls)
