"""CPU: time per output token of streamed requests (one, or several at once), stock vLLM against
fluxserve, on the same checkpoint and engine settings, one server after the other in one run.
Prints the ratio; CPU absolute times are not figures to quote.

Stock vLLM runs with `VLLM_PLUGINS=none`, so it uses vLLM's own CPU attention; fluxserve runs
its plugin (the float32 reference path for decode on the CPU).

    .venv/bin/python benchmarks/cpu_serving_decode.py [--model DIR] [--tokens 1500] [--runs 3]
        [--concurrency 1]

With no --model, the embedded smoke-test checkpoint (generated on first use).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from server.child_process import child_server

COMMON = ["--host", "127.0.0.1", "--max-model-len", "2048", "--enforce-eager",
          "--max-num-seqs", "16", "--served-model-name", "bench"]


def _stream_ms_per_token(base: str, tokens: int) -> float:
    body = {"model": "bench", "messages": [{"role": "user", "content": "Count forever."}],
            "max_tokens": tokens, "min_tokens": tokens, "temperature": 0, "stream": True}
    stamps = []
    with httpx.Client(timeout=300) as client, client.stream(
            "POST", f"{base}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3


def _ms_per_token(base: str, tokens: int, runs: int, concurrency: int) -> float:
    """Median over runs of the mean inter-token time of `concurrency` simultaneous streams."""
    per_run = []
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(runs + 1):  # the first run warms up
            per_stream = list(pool.map(lambda _: _stream_ms_per_token(base, tokens),
                                       range(concurrency)))
            per_run.append(statistics.mean(per_stream))
    return statistics.median(per_run[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="checkpoint directory (default: the smoke-test model)")
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=1, help="simultaneous streams")
    args = ap.parse_args()
    if args.model is None:
        from server.default_model import ensure_default_model

        args.model = str(ensure_default_model())
    logs = Path(tempfile.mkdtemp(prefix="cpu_serving_decode-"))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    stock_cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                 "--model", args.model]
    ours_cmd = [sys.executable, "-m", "server.cli", "serve", "--model", args.model]
    # /v1/models answers 200 on both servers only once their engine is ready
    with child_server([*stock_cmd, *COMMON], env={**env, "VLLM_PLUGINS": "none"},
                      log_path=logs / "stock.log", ready_path="/v1/models",
                      timeout_s=300) as (base, _):
        stock = _ms_per_token(base, args.tokens, args.runs, args.concurrency)
    with child_server([*ours_cmd, *COMMON], env=env, log_path=logs / "fluxserve.log",
                      ready_path="/v1/models", timeout_s=300) as (base, _):
        ours = _ms_per_token(base, args.tokens, args.runs, args.concurrency)
    print(f"{args.concurrency} x {args.tokens} streamed tokens, median of {args.runs} runs "
          f"(logs in {logs}):")
    print(f"  stock vLLM {stock:.2f} ms/token, fluxserve {ours:.2f} ms/token: "
          f"fluxserve takes {ours / stock:.2f}x the time per token")


if __name__ == "__main__":
    main()
