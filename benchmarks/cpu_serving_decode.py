"""CPU: wall time of fixed-length requests without options, stock vLLM against fluxserve.

Serves the same checkpoint with the same engine flags twice, one server after the other: first
stock vLLM with ``VLLM_PLUGINS=none`` (vLLM's own CPU attention, no fluxserve code), then
``fluxserve serve`` (its plugin, its front end; ``--reward-model none``, so that no second engine
shares the cores). On each, for every concurrency ``c``: one warm-up batch, then ``--runs``
batches of ``c`` simultaneous non-streamed ``/v1/completions`` requests, greedy, ``ignore_eos``
and ``max_tokens = --tokens``, so every request decodes exactly that many tokens (checked
against ``usage.completion_tokens``). A batch's time is from sending its first request to
receiving its last response. ``--rounds R`` repeats the pair (stock, then fluxserve) R times, so
that a change in the load of a shared machine hits both servers alike. Prints, per
concurrency, the median batch time of each server over all rounds, fluxserve's / stock's ratio
of those medians, and the ratio of the fastest batches (on a machine shared with other work, a
batch is only ever slowed down by it, so the fastest is the closest to the code's own cost).
CPU absolute times depend on the load of the machine and are not figures to quote; the ratios,
measured in one run, are.

Also printed: the engine's own mean time per output token over the timed batches, from vLLM's
``vllm:request_time_per_output_token_seconds`` histogram on ``/metrics`` (engine-core
timestamps, so the API process's delivery does not enter it; both servers export it).

Not measured: the mean gap between streamed events. vLLM's API process hands stream events
over in bursts (stock vLLM too; at times all of a request's tokens at once), so that gap measures
delivery, not decoding.

    .venv/bin/python benchmarks/cpu_serving_decode.py [--model DIR] [--tokens 400] [--runs 5]
        [--rounds 1] [--concurrency 1 4 8] [--json OUT.json]

With no --model, the embedded smoke-test checkpoint (generated on first use).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from cpu_server import add_model_argument, child_server_setup
from prometheus_client.parser import text_string_to_metric_families

from server.child_process import child_server

COMMON = ["--host", "127.0.0.1", "--max-model-len", "2048", "--enforce-eager",
          "--max-num-seqs", "16", "--served-model-name", "bench"]
PROMPT = "Count from one to a thousand, one number per line."
TPOT_METRIC = "vllm:request_time_per_output_token_seconds"


def _complete(client: httpx.Client, base: str, tokens: int) -> None:
    body = {"model": "bench", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "stream": False}
    resp = client.post(f"{base}/v1/completions", json=body)
    resp.raise_for_status()
    got = resp.json()["usage"]["completion_tokens"]
    if got != tokens:
        raise RuntimeError(f"a request generated {got} tokens, not {tokens}")


def _batch_s(pool: ThreadPoolExecutor, client: httpx.Client, base: str, tokens: int,
             concurrency: int) -> float:
    t0 = time.perf_counter()
    list(pool.map(lambda _: _complete(client, base, tokens), range(concurrency)))
    return time.perf_counter() - t0


def _tpot_sum_count(client: httpx.Client, base: str) -> tuple[float, float]:
    """Sum and count of the engine's per-request time per output token, over all engines."""
    total = count = 0.0
    for family in text_string_to_metric_families(client.get(f"{base}/metrics").text):
        if family.name != TPOT_METRIC:
            continue
        for sample in family.samples:
            if sample.name == f"{TPOT_METRIC}_sum":
                total += sample.value
            elif sample.name == f"{TPOT_METRIC}_count":
                count += sample.value
    return total, count


def measure(base: str, tokens: int, runs: int, levels: list[int]) -> dict[int, dict]:
    """Per concurrency: the batch times (s) and the engine's mean TPOT (ms) over them."""
    out: dict[int, dict] = {}
    limits = httpx.Limits(max_connections=max(levels))
    with httpx.Client(timeout=600, limits=limits) as client, \
            ThreadPoolExecutor(max(levels)) as pool:
        for c in levels:
            _batch_s(pool, client, base, tokens, c)  # warm-up
            s0, n0 = _tpot_sum_count(client, base)
            times = [_batch_s(pool, client, base, tokens, c) for _ in range(runs)]
            s1, n1 = _tpot_sum_count(client, base)
            tpot = (s1 - s0) / (n1 - n0) * 1e3 if n1 > n0 else float("nan")
            out[c] = {"batch_s": times, "median_s": statistics.median(times),
                      "engine_tpot_ms": tpot}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_argument(ap)
    ap.add_argument("--tokens", type=int, default=400, help="tokens generated per request")
    ap.add_argument("--runs", type=int, default=5, help="timed batches per concurrency")
    ap.add_argument("--rounds", type=int, default=1,
                    help="times the pair of servers (stock, then fluxserve) is run")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--json", type=Path, help="also write every batch time here")
    args = ap.parse_args()
    args.model, logs, env = child_server_setup(args.model, "cpu_serving_decode")
    servers = {
        "stock": ([sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                   "--model", args.model, *COMMON], {**env, "VLLM_PLUGINS": "none"}),
        "fluxserve": ([sys.executable, "-m", "server.cli", "serve", "--model", args.model,
                       *COMMON, "--reward-model", "none"], env),
    }
    results: dict[str, list[dict[int, dict]]] = {name: [] for name in servers}
    for r in range(args.rounds):
        for name, (cmd, server_env) in servers.items():
            # /v1/models answers 200 on both servers only once their engine is ready
            with child_server(cmd, env=server_env, log_path=logs / f"{name}-{r}.log",
                              ready_path="/v1/models", timeout_s=300) as (base, _):
                results[name].append(measure(base, args.tokens, args.runs, args.concurrency))
    print(f"{args.tokens} tokens per request, non-streamed, median of {args.runs} batches x "
          f"{args.rounds} rounds (logs in {logs})")
    print("concurrency | stock s | fluxserve s | fluxserve / stock | fastest / fastest | "
          "engine TPOT ratio")
    for c in args.concurrency:
        st, fx = ({"times": [t for rnd in results[name] for t in rnd[c]["batch_s"]],
                   "tpot": statistics.median(rnd[c]["engine_tpot_ms"] for rnd in results[name])}
                  for name in ("stock", "fluxserve"))
        med_st, med_fx = statistics.median(st["times"]), statistics.median(fx["times"])
        print(f"{c:11d} | {med_st:7.2f} | {med_fx:11.2f} | {med_fx / med_st:17.3f} | "
              f"{min(fx['times']) / min(st['times']):17.3f} | {fx['tpot'] / st['tpot']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"tokens": args.tokens, "runs": args.runs,
                                         "rounds": args.rounds, "results": results},
                                        indent=1))


if __name__ == "__main__":
    main()
