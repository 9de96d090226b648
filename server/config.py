"""fluxserve's own server options (the vLLM engine and frontend options ride along unchanged)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import get_args

from pydantic import ValidationError

from attention_backends.flux.options import FluxMode, FluxOptions
from attention_backends.flux.router import router_available
from kv_policies.eviction.options import (
    DEFAULT_POLICY,
    POLICY_NAMES,
    KVPolicyOptions,
    option_fields,
    parse_kv_policy,
)
from server.transport import TransportLimits

WARMUP_CHOICES = ("auto", "on", "off")

API_KEY_ENV = "FLUXSERVE_API_KEY"


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fluxserve")
    group.add_argument("--flux-mode", choices=list(get_args(FluxMode)),
                       default=FluxOptions.model_fields["mode"].default,
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
    group.add_argument("--warmup", choices=WARMUP_CHOICES, default="auto",
                       help="Before /ready, run short requests of every flux mode and KV policy "
                            "so that no user request pays a kernel compile (auto: on GPUs only; "
                            "server/warmup.py).")
    group.add_argument("--kv-policy", choices=list(POLICY_NAMES), default=DEFAULT_POLICY,
                       help="Default KV-eviction policy for requests that send no `kv_policy`.")
    # One flag per option field of the policies' models (`--kv-pool-kernel` sets `pool_kernel`),
    # for the policies that have it; unset means the model's default.
    for name, (info, policies) in option_fields().items():
        group.add_argument(f"--kv-{name.replace('_', '-')}", type=info.annotation, default=None,
                           help=f"Default kv_policy.{name} ({', '.join(policies)}): "
                                f"{info.description} (default {info.default})")


@dataclass(frozen=True)
class ServerSettings:
    api_keys: tuple[str, ...] = ()
    default_flux: FluxOptions = field(default_factory=FluxOptions)
    default_kv_policy: KVPolicyOptions = field(default_factory=lambda: parse_kv_policy({}))
    router_available: bool = False
    smoke_test_model: bool = False
    max_in_flight_requests: int = 1024
    transport: TransportLimits = field(default_factory=TransportLimits)
    drain_timeout_s: float = 30.0
    warmup: str = "auto"

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
            kv = parse_kv_policy({"name": args.kv_policy, **{
                name: getattr(args, f"kv_{name}") for name in option_fields()
                if getattr(args, f"kv_{name}") is not None}})
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
                   transport=transport_limits(args), drain_timeout_s=args.drain_timeout,
                   warmup=args.warmup)


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
