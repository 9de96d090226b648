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
    reward_bench.add_parser(commands)
    return parser


def parse_args(argv: list[str]):
    args = build_parser().parse_args(argv)
    # vLLM's parser turns `--model X` into the positional model tag; keep one place for it.
    if getattr(args, "model_tag", None) and not args.model:
        args.model = args.model_tag
    return args


def _resolve_model(args) -> bool:
    """Fill in the model; returns True when it is the embedded smoke-test model."""
    from server.default_model import DEFAULT_MODEL_NAME, ensure_default_model

    if args.model:
        return False
    args.model = str(ensure_default_model())
    if not args.served_model_name:
        args.served_model_name = [DEFAULT_MODEL_NAME]
    logger.warning("no --model given: serving the embedded smoke-test model %s (random weights, "
                   "meaningless output) from %s", DEFAULT_MODEL_NAME, args.model)
    return True


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

    from server.app import build_app
    from server.config import ServerSettings
    from server.reward.engine import resolve_reward_model

    smoke = _resolve_model(args)
    _apply_platform_defaults(args)
    _apply_flux_router(args)
    settings = ServerSettings.from_args(args, smoke_test_model=smoke)
    reward = resolve_reward_model(args, chat_is_smoke_test=smoke)
    app = build_app(args, settings, reward)
    uvicorn.run(app, host=args.host or "0.0.0.0", port=args.port,
                log_level=args.uvicorn_log_level, timeout_graceful_shutdown=10)


def main(argv: list[str] | None = None) -> None:
    _prepare_metrics_dir()
    logging.basicConfig(level=logging.INFO,
                        format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "serve":
        serve(args)
    elif args.command == "reward-bench":
        from evaluation.reward_bench import run_from_args

        sys.exit(run_from_args(args))


if __name__ == "__main__":
    main()
