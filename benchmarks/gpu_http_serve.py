"""`fluxserve serve` over HTTP on the GPU: start-up (with its warm-up), then the first and the
second request of every mode, streamed, with the time to first token of each.

The model is `gpu_serving.py`'s Llama-3.1-8B shape (32 layers, hidden 4096, 32 q / 8 KV heads,
vocab 128256) with random weights (``--load-format dummy``). Its tokenizer is the smoke-test
model's, padded with reserved tokens to the model's vocabulary so that every id the model can
emit decodes. Prompts are token ids (``/v1/completions``), each of its own (no prefix-cache hit).

What it shows: whether the first request of a mode pays for compiling our kernels (it should
not, with the warm-up on), the server's own start-up phases, and the `/metrics` series a real
GPU run fills.

    python3 benchmarks/gpu_http_serve.py --out $OUT              # GPU (bundle on PYTHONPATH)
    python3 benchmarks/gpu_http_serve.py --out /tmp/x --tiny     # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpu_serving as gs  # noqa: E402  (the model shape, the modes and the prompts)

from server.child_process import child_server  # noqa: E402

API_KEY = "gpu-http-serve"
MODES = ["none", "full", "sparse", "layers90", "calidrop", "snapkv", "sparse+calidrop", "auto"]


def pad_tokenizer(model_dir: Path, vocab: int) -> None:
    """Give the tokenizer ``vocab`` ids: reserved tokens after its own, reachable by id only."""
    path = model_dir / "tokenizer.json"
    tok = json.loads(path.read_text())
    table = tok["model"]["vocab"]
    for i in range(len(table), vocab):
        table[f"<|reserved_{i}|>"] = i
    path.write_text(json.dumps(tok))


def stream_ttft(base_url: str, prompt: list[int], options: dict, max_tokens: int) -> dict:
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            **options}
    t0 = time.perf_counter()
    ttft, usage, error = None, None, None
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=600,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
        if resp.status_code != 200:
            return {"status": resp.status_code, "error": resp.read().decode()[:500]}
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]
            if ttft is None and chunk.get("choices"):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                usage = chunk["usage"]
    return {"status": 200, "ttft_s": ttft, "total_s": time.perf_counter() - t0,
            "usage": usage, "error": error}


def start_phases(log: str) -> dict:
    """Seconds from the first log line to the warm-up's end and to ``engine ready``."""
    stamps = []
    for line in log.splitlines():
        m = re.match(r"\S+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ", line)
        if m:
            t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1e3
            stamps.append((t, line))
    if not stamps:
        return {}
    t0 = stamps[0][0]
    out = {}
    for t, line in stamps:
        if "warm-up:" in line:
            out["warmup_line"] = line.split("warm-up:", 1)[1].strip()
            out["warmup_done_s"] = round(t - t0, 1)
        if "engine ready" in line:
            out["engine_ready_s"] = round(t - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_http_out")))
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke run)")
    ap.add_argument("--warmup", default="on", choices=["auto", "on", "off"])
    ap.add_argument("--prompt-tokens", type=int, default=None,
                    help="prompt length (default: the scale's 32K context)")
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    scale = gs.TINY if args.tiny else gs.GPU
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_http_serve_"))  # not under --out: few files back
    model = gs.write_model(work / "model", scale)
    pad_tokenizer(model, scale.vocab)
    sparse = gs.mode_options(scale, check=False)["sparse"]["flux"]
    router = gs.write_router(work / "router", scale, sparse["sink"], sparse["window"])
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(model),
           "--flux-router", str(router),
           "--served-model-name", "m", "--load-format", "dummy", "--host", "127.0.0.1",
           "--api-key", API_KEY, "--reward-model", "none", "--warmup", args.warmup,
           "--max-model-len", str(scale.max_model_len), "--max-num-seqs", "64",
           "--max-num-batched-tokens", str(scale.max_num_batched_tokens), "--seed", "0"]
    if args.tiny:
        cmd += ["--enforce-eager"]
    else:
        cmd += ["--gpu-memory-utilization", "0.85"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", VLLM_USE_FLASHINFER_SAMPLER="0",
               TOKENIZERS_PARALLELISM="false")
    log_path = args.out / "server.log"
    n = args.prompt_tokens or scale.ctx_32k
    options = gs.mode_options(scale, check=False)
    results: dict = {"cmd": cmd, "prompt_tokens": n, "max_tokens": args.max_tokens,
                     "requests": {}}
    t_start = time.perf_counter()
    with child_server(cmd, env=env, log_path=log_path, ready_path="/ready",
                      timeout_s=1200) as (base_url, _proc):
        results["ready_after_s"] = round(time.perf_counter() - t_start, 1)
        for i, mode in enumerate(MODES):
            runs = []
            for k in range(2):
                prompt = gs.prompt_ids(n, gs.SEED + 500 + 2 * i + k, scale.vocab)
                runs.append(stream_ttft(base_url, prompt, options[mode], args.max_tokens))
                print(f"{mode} #{k + 1}: {runs[-1]}", flush=True)
            results["requests"][mode] = runs
        metrics = httpx.get(f"{base_url}/metrics", timeout=30).text
    results["metrics"] = [ln for ln in metrics.splitlines()
                          if ln.startswith(("fluxserve:", "vllm:request_success_total",
                                            "vllm:num_preemptions"))
                          and "_bucket" not in ln]
    log = log_path.read_text()
    results["start"] = start_phases(log)
    (args.out / "gpu_http_serve.json").write_text(json.dumps(results, indent=1))

    print(f"\nready after {results['ready_after_s']} s; {results['start']}")
    print(f"{'mode':<16} {'TTFT 1st (s)':>13} {'TTFT 2nd (s)':>13} {'1st/2nd':>8}  tokens")
    for mode, (a, b) in results["requests"].items():
        if a.get("ttft_s") and b.get("ttft_s"):
            print(f"{mode:<16} {a['ttft_s']:>13.3f} {b['ttft_s']:>13.3f} "
                  f"{a['ttft_s'] / b['ttft_s']:>8.2f}  "
                  f"{(a.get('usage') or {}).get('completion_tokens')}")
        else:
            print(f"{mode:<16} failed: {a.get('error') or a} / {b.get('error') or b}")


if __name__ == "__main__":
    main()
