"""CPU: wall time of long-prompt requests by policy (prefill + decode, and decode alone), on one
fluxserve server.

Starts ``fluxserve serve`` on the checkpoint (``--max-model-len`` the longest prompt plus the
tokens, ``--reward-model none``), then for each prompt length and each round sends, per
policy, one non-streamed ``/v1/completions`` request of ``--tokens`` tokens and one of a single
token, the policies one after another in an order rotated every round (so load from other
work hits them alike). Every prompt is fresh random token ids (no prefix-cache hits); every
request generates exactly the tokens asked (``ignore_eos``). Prints per (length, policy) the
median wall time of the long request and dense ``full``'s / the policy's (above 1: faster than
dense), then the decode time per token, ``(long - single) / (tokens - 1)`` from the medians
(prefill, and for KV eviction the compression, cancel out), and its ratio likewise. CPU
absolute times are not figures to quote; the ratios, measured in one run, are.

    .venv/bin/python benchmarks/cpu_long_context.py [--model DIR] [--lengths 4096 8064 16000]
        [--tokens 128] [--runs 3] [--policies full sparse calidrop]

Policies: ``full``; ``sparse`` (flux.mode=sparse with the model's default sink 128 and window
2048); ``calidrop`` (kv_policy calidrop, budget 2048). With no --model, the embedded
smoke-test checkpoint.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import httpx
from cpu_server import add_model_argument, child_server_setup

from server.child_process import child_server

POLICIES = {
    "full": {"flux": {"mode": "full"}},
    "sparse": {"flux": {"mode": "sparse"}},
    "calidrop": {"kv_policy": {"name": "calidrop", "budget": 2048}},
}


def _request_s(client: httpx.Client, base: str, prompt: list[int], tokens: int,
               extra: dict) -> float:
    body = {"model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, **extra}
    t0 = time.perf_counter()
    resp = client.post(f"{base}/v1/completions", json=body)
    elapsed = time.perf_counter() - t0
    resp.raise_for_status()
    if resp.json()["usage"]["completion_tokens"] != tokens:
        raise RuntimeError("a request did not generate the tokens asked")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_argument(ap)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8064, 16000])
    ap.add_argument("--tokens", type=int, default=128,
                    help="tokens generated per long request (at least 2)")
    ap.add_argument("--runs", type=int, default=3, help="timed rounds per length")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    args = ap.parse_args()
    args.model, logs, env = child_server_setup(args.model, "cpu_long_context")
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", args.model, "--host",
           "127.0.0.1", "--max-model-len", str(max(args.lengths) + args.tokens),
           "--enforce-eager", "--max-num-seqs", "4", "--served-model-name", "bench",
           "--reward-model", "none"]
    policies = ["full", *[p for p in args.policies if p != "full"]]
    rng = random.Random(0)
    times: dict[tuple[int, str, int], list[float]] = {}
    with child_server(cmd, env=env, log_path=logs / "fluxserve.log", ready_path="/v1/models",
                      timeout_s=300) as (base, _), httpx.Client(timeout=1200) as client:
        for length in args.lengths:
            for r in range(args.runs + 1):  # round 0 warms up
                order = policies[r % len(policies):] + policies[:r % len(policies)]
                for name in order:
                    for tokens in (args.tokens, 1):
                        prompt = [rng.randrange(10, 2000) for _ in range(length)]
                        t = _request_s(client, base, prompt, tokens, POLICIES[name])
                        if r:
                            times.setdefault((length, name, tokens), []).append(t)
    print(f"{args.tokens} tokens per request, non-streamed, median of {args.runs} "
          f"(logs in {logs})")
    print("prompt | policy | median s | full / policy | decode ms/token | full / policy")

    def medians(length: int, name: str) -> tuple[float, float]:
        long, single = (statistics.median(times[(length, name, t)]) for t in (args.tokens, 1))
        return long, (long - single) / (args.tokens - 1) * 1e3

    for length in args.lengths:
        full, full_tpot = medians(length, "full")
        for name in policies:
            med, tpot = medians(length, name)
            print(f"{length:6d} | {name:8s} | {med:8.2f} | {full / med:13.2f} | {tpot:15.2f} | "
                  f"{full_tpot / tpot:.2f}")


if __name__ == "__main__":
    main()
