"""fluxserve's own server options (the vLLM engine and frontend options ride along unchanged)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from pydantic import ValidationError

from attention_backends.flux.options import FluxOptions
from attention_backends.flux.router import router_available
from kv_policies.eviction.options import POLICY_NAMES, KVPolicyOptions
from server.transport import TransportLimits

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
    limits = TransportLimits()
    group.add_argument("--max-request-body-bytes", type=int,
                       default=limits.max_request_body_bytes,
                       help="Largest request body accepted; larger bodies get 413, checked while "
                            "the body streams in (0: no limit).")
    group.add_argument("--http-header-timeout", type=float, default=limits.header_timeout_s,
                       help="Seconds a client has to send a request's headers, from connecting "
                            "or from the request's first byte; then 408 and the connection "
                            "closes (0: no timeout).")
    group.add_argument("--http-keep-alive-timeout", type=int,
                       default=limits.keep_alive_timeout_s,
                       help="Seconds an idle keep-alive connection stays open between requests.")
    group.add_argument("--max-connections", type=int, default=limits.max_connections,
                       help="Open HTTP connections at once; further ones get 503 and are closed "
                            "(0: no limit).")
    group.add_argument("--drain-timeout", type=float, default=30.0,
                       help="On SIGTERM, seconds the requests in flight get to finish before "
                            "they are cut with an error and the process exits.")
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
    transport: TransportLimits = field(default_factory=TransportLimits)
    drain_timeout_s: float = 30.0

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, smoke_test_model: bool) -> ServerSettings:
        keys = list(args.api_key or [])
        if not keys and os.environ.get(API_KEY_ENV):
            keys = [os.environ[API_KEY_ENV]]
        flux_kwargs: dict = {"mode": args.flux_mode}
        if args.flux_sparse_layers:
            try:
                flux_kwargs["sparse_layers"] = [int(i) for i in args.flux_sparse_layers.split(",")]
            except ValueError:
                raise SystemExit(f"--flux-sparse-layers {args.flux_sparse_layers!r}: expected "
                                 "comma-separated layer indices, e.g. 0,2,5") from None
        if args.flux_sink is not None:
            flux_kwargs["sink"] = args.flux_sink
        if args.flux_window is not None:
            flux_kwargs["window"] = args.flux_window
        if args.max_in_flight_requests < 0:
            raise SystemExit("--max-in-flight-requests must be >= 0 (0: no limit), "
                             f"got {args.max_in_flight_requests}")
        try:
            flux = FluxOptions(**flux_kwargs)
        except ValidationError as exc:
            raise SystemExit(f"--flux-* defaults rejected: {_errors(exc)}") from None
        try:
            kv = KVPolicyOptions(name=args.kv_policy, budget=args.kv_budget, window=args.kv_window,
                                 pool_kernel=args.kv_pool_kernel, tau=args.kv_tau)
        except ValidationError as exc:
            raise SystemExit(f"--kv-* defaults rejected: {_errors(exc)}") from None
        router = router_available(args.model, args.flux_router)
        if args.flux_router and not router:
            raise SystemExit(f"--flux-router {args.flux_router}: no router weights found there")
        if args.flux_mode == "auto" and not router:
            raise SystemExit("--flux-mode auto needs a Flux router: serve a Flux checkpoint "
                             "or pass --flux-router PATH")
        return cls(api_keys=tuple(keys), default_flux=flux,
                   default_kv_policy=kv, router_available=router,
                   smoke_test_model=smoke_test_model,
                   max_in_flight_requests=args.max_in_flight_requests,
                   transport=transport_limits(args), drain_timeout_s=args.drain_timeout)


def _errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}"
                     for e in exc.errors())


def transport_limits(args: argparse.Namespace) -> TransportLimits:
    for flag in ("max_request_body_bytes", "http_header_timeout", "http_keep_alive_timeout",
                 "max_connections", "drain_timeout"):
        if getattr(args, flag) < 0:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    return TransportLimits(max_request_body_bytes=args.max_request_body_bytes,
                           header_timeout_s=args.http_header_timeout,
                           keep_alive_timeout_s=args.http_keep_alive_timeout,
                           max_connections=args.max_connections,
                           max_header_bytes=args.h11_max_incomplete_event_size,
                           max_header_count=args.h11_max_header_count)
