"""Set-up shared by the CPU serving benchmarks (cpu_long_context.py, cpu_serving_decode.py),
which start their servers as child processes. Scripts import it from their own folder."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory (default: the smoke-test model)")


def child_server_setup(model: str | None, name: str) -> tuple[str, Path, dict[str, str]]:
    """``(checkpoint, log folder, environment)`` for the child servers of benchmark `name`:
    `model`, or the embedded smoke-test checkpoint (made on first use) when None; a new
    temporary folder ``<name>-*`` for their logs; this process's environment with a 2 GiB CPU
    KV cache (``VLLM_CPU_KVCACHE_SPACE``) and without ``PROMETHEUS_MULTIPROC_DIR``."""
    if model is None:
        from server.default_model import ensure_default_model

        model = str(ensure_default_model())
    logs = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return model, logs, env
