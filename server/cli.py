"""`fluxserve serve`: the OpenAI-compatible server on a vLLM engine.

Every vLLM engine and frontend option (`--max-model-len`, `--tensor-parallel-size`, ...) is
accepted and passed through; fluxserve adds its own options (see `fluxserve serve --help`).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile

logger = logging.getLogger("fluxserve")

CPU_DEFAULT_KV_CACHE_BYTES = 2 << 30


def _prepare_metrics_dir() -> None:
    # Must happen before prometheus_client is first imported (it picks its value store at import)
    # and before vLLM spawns its engine processes, which inherit the variable.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    path = tempfile.mkdtemp(prefix="fluxserve-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    atexit.register(shutil.rmtree, path, True)


def build_parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from evaluation import reward_bench
    from server import config
    from server.reward import engine as reward_engine

    parser = FlexibleArgumentParser(prog="fluxserve", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="Serve a model over the OpenAI API.",
        description="Serve a model (a local Hugging Face directory or hub id; the embedded "
                    "smoke-test model when none is given) over the OpenAI API.")
    make_arg_parser(serve)
    config.add_cli_args(serve)
    reward_engine.add_cli_args(serve)
    serve.set_defaults(model=None)
    from evaluation.cli import add_bench_parser, add_eval_parser

    add_eval_parser(commands)
    add_bench_parser(commands)
    reward_bench.add_parser(commands)
    return parser


class UsageError(SystemExit):
    """A command line fluxserve cannot serve; the message says why, in fluxserve's words."""

    def __init__(self, message: str) -> None:
        super().__init__(f"fluxserve: error: {message}")


def _take_model_option(argv: list[str]) -> tuple[list[str], str | None]:
    """Remove ``--model X`` / ``--model=X`` from ``argv``; return the rest and X."""
    rest, models = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--model":
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                raise UsageError("--model needs a value: a local Hugging Face directory or hub id")
            models.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--model="):
            models.append(arg.removeprefix("--model="))
        else:
            rest.append(arg)
        i += 1
    if len(models) > 1:
        raise UsageError(f"--model given {len(models)} times ({', '.join(models)}); give it once")
    return rest, (models[0] if models else None)


def parse_args(argv: list[str]):
    """Parse a fluxserve command line. For ``serve``, the model is the first argument after
    ``serve`` or ``--model MODEL`` (not both); with neither, ``args.model`` is None and the
    embedded smoke-test model is served. Raises SystemExit with a usage message."""
    if argv[:1] == ["serve"]:
        rest, model = _take_model_option(argv[1:])
        positional = rest[0] if rest and not rest[0].startswith("-") else None
        if model is not None and positional is not None:
            raise UsageError(f"the model is given twice ({positional!r} and --model {model!r}): "
                             "give it once, as `fluxserve serve MODEL` or `--model MODEL`")
        if model is not None:
            rest = [model, *rest]
        elif positional is None:
            # An explicit empty model keeps vLLM's `vllm serve` argument rules (which demand a
            # positional model next to --served-model-name) out of the way; it means "none".
            rest = ["", *rest]
        argv = ["serve", *rest]
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        args.model = getattr(args, "model_tag", None) or None
        args.model_tag = args.model
    return args


def _resolve_model(args) -> bool:
    """Fill in the model; returns True when it is the embedded smoke-test model."""
    from server.default_model import DEFAULT_MODEL_NAME, ensure_default_model

    if args.model:
        return False
    check_embedded_model_args(args)
    args.model = str(ensure_default_model())
    if not args.served_model_name:
        args.served_model_name = [DEFAULT_MODEL_NAME]
    logger.warning("no --model given: serving the embedded smoke-test model %s (random weights, "
                   "meaningless output) from %s", DEFAULT_MODEL_NAME, args.model)
    return True


def check_embedded_model_args(args) -> None:
    """Refuse, in fluxserve's words, options the embedded smoke-test model cannot serve (they
    would otherwise fail later, inside vLLM's engine start)."""
    from server.default_model import DEFAULT_MODEL_NAME, MAX_POSITION_EMBEDDINGS, NUM_LAYERS

    if args.max_model_len is not None and args.max_model_len > MAX_POSITION_EMBEDDINGS:
        raise UsageError(f"--max-model-len {args.max_model_len}: the embedded model "
                         f"{DEFAULT_MODEL_NAME} supports at most {MAX_POSITION_EMBEDDINGS} "
                         "tokens; serve a real model with --model for longer contexts")
    layers = [s for s in (args.flux_sparse_layers or "").split(",") if s.strip()]
    bad = [s for s in layers if not s.strip().isdigit() or int(s) >= NUM_LAYERS]
    if bad:
        raise UsageError(f"--flux-sparse-layers {','.join(bad)}: the embedded model "
                         f"{DEFAULT_MODEL_NAME} has layers 0-{NUM_LAYERS - 1}")


def _apply_platform_defaults(args) -> None:
    from vllm.platforms import current_platform

    if current_platform.is_cuda():
        # fluxserve's GPU attention backend (Triton kernels) is vLLM's CUSTOM slot, and its
        # per-request routing hooks target the V1 model runner.
        if args.attention_backend is None:
            args.attention_backend = "CUSTOM"
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    if current_platform.is_cpu() and args.kv_cache_memory_bytes is None \
            and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        # vLLM's CPU default reserves 92% of the NUMA node for KV, which fails on small hosts.
        args.kv_cache_memory_bytes = CPU_DEFAULT_KV_CACHE_BYTES


def _apply_flux_router(args) -> None:
    if args.flux_router:
        # additional_config reaches every engine process; the worker loads the router from it.
        args.additional_config = {**(args.additional_config or {}),
                                  "flux_router": os.path.abspath(args.flux_router)}


def serve(args) -> None:
    import uvicorn
    from vllm.utils.system_utils import set_ulimit

    from server.app import build_app
    from server.config import ServerSettings
    from server.lifecycle import UVICORN_GRACEFUL_SHUTDOWN_S, DrainingServer
    from server.reward.engine import resolve_reward_model
    from server.transport import LimitedHttpToolsProtocol

    smoke = _resolve_model(args)
    _apply_platform_defaults(args)
    _apply_flux_router(args)
    settings = ServerSettings.from_args(args, smoke_test_model=smoke)
    reward = resolve_reward_model(args, chat_is_smoke_test=smoke)
    app = build_app(args, settings, reward)
    config = uvicorn.Config(
        app, host=args.host or "0.0.0.0", port=args.port, log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log, http=LimitedHttpToolsProtocol,
        timeout_keep_alive=settings.transport.keep_alive_timeout_s,
        # the drain (server.lifecycle) runs before uvicorn's own, shorter, grace period
        timeout_graceful_shutdown=UVICORN_GRACEFUL_SHUTDOWN_S)
    config.transport_limits = settings.transport  # read by LimitedHttpToolsProtocol
    set_ulimit()  # so that --max-connections, not the file-descriptor limit, is the bound
    server = DrainingServer(config, app.state.lifecycle)
    app.state.server = server  # vLLM's error handlers read it
    server.run()
    _exit(app.state.lifecycle.exit_code)


def _exit(code: int) -> None:
    """End the process once the server and its engine are shut down: run the exit handlers,
    then skip the interpreter's teardown, which can block for tens of seconds on the engine's
    ZeroMQ sockets after the engine core died (an orchestrator would see a hung process)."""
    import atexit

    logger.info("exiting with status %d", code)
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:
        # an HTTP client of any server: it needs neither vLLM nor the server's modules
        from evaluation.cli import main as eval_main

        sys.exit(eval_main(argv[1:]))
    if argv[:1] == ["bench"]:
        from evaluation.cli import bench_main

        sys.exit(bench_main(argv[1:]))
    if argv[:1] == ["reward-bench"]:
        from evaluation.reward_bench import main as reward_bench_main

        sys.exit(reward_bench_main(argv[1:]))
    _prepare_metrics_dir()
    logging.basicConfig(level=logging.INFO,
                        format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.command == "serve":
        serve(args)


if __name__ == "__main__":
    main()
