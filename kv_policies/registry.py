"""Name -> policy registry (one instance per policy class; policies are stateless)."""

from __future__ import annotations

from kv_policies.base import KVPolicy
from kv_policies.options import POLICY_NAMES

_REGISTRY: dict[str, KVPolicy] = {}


def register_policy(cls: type[KVPolicy]) -> type[KVPolicy]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
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


# Importing the package registers the built-in policies.
from kv_policies import policies as _builtin  # noqa: E402,F401

# The request schema lists the names it accepts; keep it and the registry in step.
assert set(POLICY_NAMES) <= set(_REGISTRY), (POLICY_NAMES, tuple(_REGISTRY))
