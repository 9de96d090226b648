"""The policy-spec syntax of `fluxserve eval --policies`.

A policy is one Flux attention part and/or one KV-eviction part, joined by ``+``::

    full                      full attention, no eviction (the baseline; the only policy that a
                              server without fluxserve's extension fields can run)
    auto                      the Flux router chooses per layer (needs a router on the server)
    sparse | sparse:W         sink + local window everywhere (window W tokens; default: the
                              server's)
    layers:0-3,8              sink + window on the listed layers, full attention elsewhere
    streaming:B | snapkv:B | calidrop:B
                              evict after prefill down to B tokens per layer and KV head
                              (B defaults to 2048); ``calidrop:256,512`` expands to one policy
                              per budget
    sparse+snapkv:512         both at once

`all` expands to every policy at the budgets 256, 512, 1024 and 2048. Specs are separated by
spaces on the command line (commas belong to layer lists and budget lists).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KV_POLICIES = ("streaming", "snapkv", "calidrop")
FLUX_MODES = ("full", "auto", "sparse", "layers")
DEFAULT_BUDGET = 2048
BUDGET_RANGE = (16, 1 << 20)
WINDOW_RANGE = (1, 1 << 24)
MAX_LAYER = 4096
SWEEP_BUDGETS = (256, 512, 1024, 2048)

PRESETS = {
    "all": ["full", "auto", "sparse",
            *(f"{kv}:{','.join(map(str, SWEEP_BUDGETS))}" for kv in KV_POLICIES),
            "sparse+calidrop:1024"],
}


class PolicySpecError(ValueError):
    """A policy spec that does not parse (the message says why)."""


@dataclass(frozen=True)
class Policy:
    """One parsed policy. `flux` and `kv_policy` are the request's extension fields, as
    fluxserve's API takes them (None: not set by this policy)."""

    name: str
    flux: dict[str, Any] | None = None
    kv_policy: dict[str, Any] | None = None

    @property
    def is_baseline(self) -> bool:
        """Full attention without eviction: runs on any server."""
        return (self.flux is None or self.flux == {"mode": "full"}) and self.kv_policy is None

    def request_fields(self, accepted: set[str]) -> dict[str, Any]:
        """The extension fields to send to a server that accepts `accepted` of them.

        To fluxserve, both fields are always sent (``full`` / ``none`` when the policy leaves one
        unset) so that the server's defaults do not change what is measured. Raises
        `PolicySpecError` when the policy needs a field the server does not accept."""
        if not accepted:
            if not self.is_baseline:
                raise PolicySpecError(f"policy {self.name!r} needs a server that accepts the "
                                      "flux/kv_policy request fields (fluxserve)")
            return {}
        fields: dict[str, Any] = {}
        if "flux" in accepted:
            fields["flux"] = self.flux or {"mode": "full"}
        elif self.flux not in (None, {"mode": "full"}):
            raise PolicySpecError(f"policy {self.name!r} needs the flux request field")
        if "kv_policy" in accepted:
            fields["kv_policy"] = self.kv_policy or {"name": "none"}
        elif self.kv_policy is not None:
            raise PolicySpecError(f"policy {self.name!r} needs the kv_policy request field")
        return fields

    def attributes(self) -> dict[str, Any]:
        """Flat description for tables: flux mode and KV policy/budget."""
        return {"flux_mode": (self.flux or {"mode": "full"})["mode"],
                "kv_policy": (self.kv_policy or {"name": "none"})["name"],
                "kv_budget": (self.kv_policy or {}).get("budget")}


def _int(text: str, what: str, bounds: tuple[int, int]) -> int:
    try:
        value = int(text)
    except ValueError:
        raise PolicySpecError(f"{what} must be an integer, got {text!r}") from None
    if not bounds[0] <= value <= bounds[1]:
        raise PolicySpecError(f"{what} must be in [{bounds[0]}, {bounds[1]}], got {value}")
    return value


def _layers(text: str) -> list[int]:
    layers: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, sep, hi = part.partition("-")
        first = _int(lo, "a layer index", (0, MAX_LAYER))
        last = _int(hi, "a layer index", (0, MAX_LAYER)) if sep else first
        if last < first:
            raise PolicySpecError(f"empty layer range {part!r}")
        layers.update(range(first, last + 1))
    if not layers:
        raise PolicySpecError("layers: needs at least one layer, e.g. layers:0-3,8")
    return sorted(layers)


def _format_layers(layers: list[int]) -> str:
    runs: list[str] = []
    start = prev = layers[0]
    for i in [*layers[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(runs)


def parse_policy(spec: str) -> list[Policy]:
    """Parse one spec into its policies (more than one when a budget list expands).

    Raises `PolicySpecError` with the reason."""
    spec = spec.strip()
    if not spec:
        raise PolicySpecError("empty policy spec")
    flux: dict[str, Any] | None = None
    flux_name = ""
    kv_name: str | None = None
    budgets: list[int | None] = [None]
    for part in spec.split("+"):
        head, _, arg = part.strip().partition(":")
        head = head.strip().lower()
        if head in FLUX_MODES:
            if flux is not None:
                raise PolicySpecError(f"{spec!r}: more than one attention part")
            if head in ("full", "auto"):
                if arg:
                    raise PolicySpecError(f"{spec!r}: {head!r} takes no argument")
                flux, flux_name = {"mode": head}, head
            elif head == "sparse":
                flux, flux_name = {"mode": "sparse"}, "sparse"
                if arg:
                    flux["window"] = _int(arg, "the sparse window", WINDOW_RANGE)
                    flux_name = f"sparse:{flux['window']}"
            else:
                if not arg:
                    raise PolicySpecError(f"{spec!r}: layers needs a list, e.g. layers:0-3,8")
                layers = _layers(arg)
                flux = {"mode": "layers", "sparse_layers": layers}
                flux_name = f"layers:{_format_layers(layers)}"
        elif head in KV_POLICIES:
            if kv_name is not None:
                raise PolicySpecError(f"{spec!r}: more than one KV policy")
            kv_name = head
            budgets = ([_int(b, "a KV budget", BUDGET_RANGE) for b in arg.split(",") if b]
                       if arg else [DEFAULT_BUDGET])
        else:
            raise PolicySpecError(
                f"{spec!r}: unknown part {head!r}; expected one of "
                f"{', '.join(FLUX_MODES + KV_POLICIES)} (see `fluxserve eval --help`)")
    policies = []
    for budget in budgets:
        kv = {"name": kv_name, "budget": budget} if kv_name else None
        parts = [flux_name] if flux_name and not (flux_name == "full" and kv) else []
        if kv:
            parts.append(f"{kv_name}:{budget}")
        flux_field = None if flux == {"mode": "full"} else flux
        policies.append(Policy(name="+".join(parts) or "full", flux=flux_field, kv_policy=kv))
    return policies


def parse_policies(specs: list[str]) -> list[Policy]:
    """Parse and expand specs (and presets such as ``all``), dropping duplicates."""
    out: dict[str, Policy] = {}
    for spec in specs:
        for expanded in PRESETS.get(spec.strip().lower(), [spec]):
            for policy in parse_policy(expanded):
                out.setdefault(policy.name, policy)
    return list(out.values())
