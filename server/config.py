"""fluxserve's own server options (the vLLM engine and frontend options ride along unchanged)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from attention_backends.flux.options import FluxOptions
from attention_backends.flux.router import router_available
from kv_policies.eviction.options import POLICY_NAMES, KVPolicyOptions

API_KEY_ENV = "FLUXSERVE_API_KEY"


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fluxserve")
    group.add_argument("--flux-mode", choices=["auto", "full", "sparse", "layers"], default="full",
                       help="Default Flux routing for requests that send no `flux` field.")
    group.add_argument("--flux-sparse-layers", type=str, default=None,
                       help="Comma-separated layer indices that run sparse "
                            "(with --flux-mode layers).")
    group.add_argument("--flux-sink", type=int, default=None,
                       help="Default attention-sink tokens of sparse layers (default 128, or the "
                            "checkpoint's sink_size).")
    group.add_argument("--flux-window", type=int, default=None,
                       help="Default local window of sparse layers (default 2048, or the "
                            "checkpoint's local_window_size).")
    group.add_argument("--flux-router", type=str, default=None,
                       help="Standalone Flux router (safetensors + JSON config) for a stock model.")
    group.add_argument("--max-in-flight-requests", type=int, default=1024,
                       help="Generation requests served or queued at once; more get 429 "
                            "(0: no limit).")
    group.add_argument("--kv-policy", choices=list(POLICY_NAMES), default="none",
                       help="Default KV-eviction policy for requests that send no `kv_policy`.")
    group.add_argument("--kv-budget", type=int, default=2048, help="Default KV budget (tokens).")
    group.add_argument("--kv-window", type=int, default=32, help="Default observation window.")
    group.add_argument("--kv-pool-kernel", type=int, default=7, help="Default score pool kernel.")
    group.add_argument("--kv-tau", type=float, default=0.9,
                       help="Default calibration cosine threshold (calidrop).")


@dataclass(frozen=True)
class ServerSettings:
    api_keys: tuple[str, ...] = ()
    default_flux: FluxOptions = field(default_factory=FluxOptions)
    default_kv_policy: KVPolicyOptions = field(default_factory=KVPolicyOptions)
    router_available: bool = False
    smoke_test_model: bool = False
    max_in_flight_requests: int = 1024

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, smoke_test_model: bool) -> ServerSettings:
        keys = list(args.api_key or [])
        if not keys and os.environ.get(API_KEY_ENV):
            keys = [os.environ[API_KEY_ENV]]
        flux_kwargs: dict = {"mode": args.flux_mode}
        if args.flux_sparse_layers:
            flux_kwargs["sparse_layers"] = [int(i) for i in args.flux_sparse_layers.split(",")]
        if args.flux_sink is not None:
            flux_kwargs["sink"] = args.flux_sink
        if args.flux_window is not None:
            flux_kwargs["window"] = args.flux_window
        kv = KVPolicyOptions(name=args.kv_policy, budget=args.kv_budget, window=args.kv_window,
                             pool_kernel=args.kv_pool_kernel, tau=args.kv_tau)
        router = router_available(args.model, args.flux_router)
        if args.flux_router and not router:
            raise SystemExit(f"--flux-router {args.flux_router}: no router weights found there")
        if args.flux_mode == "auto" and not router:
            raise SystemExit("--flux-mode auto needs a Flux router: serve a Flux checkpoint "
                             "or pass --flux-router PATH")
        return cls(api_keys=tuple(keys), default_flux=FluxOptions(**flux_kwargs),
                   default_kv_policy=kv, router_available=router,
                   smoke_test_model=smoke_test_model,
                   max_in_flight_requests=args.max_in_flight_requests)
