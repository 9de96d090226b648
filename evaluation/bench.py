"""`fluxserve bench`: serving latency of each policy across context lengths, through the HTTP API.

One run: discover the server, keep the policies it accepts (the dense baseline ``full`` always
runs), then for each context length run rounds of `concurrency` simultaneous streamed
completions per policy, the policies interleaved round by round so the baseline and the others
are measured side by side under the same conditions. Each request has its own prompt of exactly
`length` tokens (no prefix-cache hit between requests) and generates exactly `output_tokens`
tokens (vLLM's ``ignore_eos``, where the server declares it).

Per request: time to first token (TTFT: from sending the request to the first streamed token),
time per output token (TPOT: ``(time of the last token - TTFT) / (output tokens - 1)``, vLLM's
benchmark definition) and latency. Per (length, policy): mean, median and p95 of each, and the
speedup over the baseline at the same length (baseline median / policy median: above 1 is
faster than dense). Writes requests.csv, summary.csv, summary.json and PNG plots.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from evaluation import plotting, words
from evaluation.client import (
    DEFAULT_URL,
    ApiError,
    AsyncClient,
    ClientConfig,
    ServerInfo,
    SyncClient,
    discover_or_raise,
)
from evaluation.long_context import attention_work_saved
from evaluation.policies import Policy, PolicySpecError, parse_policies, parse_policy
from evaluation.results import format_table, write_csv, write_json
from evaluation.tokenization import APPROX_CHARS_PER_TOKEN, choose_tokenizer

DEFAULT_LENGTHS = [4096, 16384, 32768, 65536, 131072]
DEFAULT_POLICIES = ["full", "sparse", "calidrop:2048"]
BASELINE = "full"
MIN_LENGTH = 16
MAX_LENGTH = 1 << 20
MAX_OUTPUT_TOKENS = 1 << 16
POOL_WORDS = 4096  # random words whose tokens make up the prompts
PROBE_TOKENS = 16
COMPLETIONS = "/v1/completions"


@dataclass
class BenchConfig:
    """Options of one `fluxserve bench` run (see `evaluation.cli` for their meaning)."""

    url: str = DEFAULT_URL
    api_key: str | None = None
    model: str | None = None
    lengths: list[int] = field(default_factory=lambda: list(DEFAULT_LENGTHS))
    policies: list[str] = field(default_factory=lambda: list(DEFAULT_POLICIES))
    output_tokens: int = 128
    concurrency: int = 1
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    tokenizer: str | None = None
    out: str = "fluxserve-bench"
    timeout_s: float = 600.0
    max_retries: int = 4
    progress: bool = True


class BenchError(RuntimeError):
    """The run cannot start (unreachable server, no policy or length it can run)."""


@dataclass(frozen=True)
class Job:
    """One request of the sweep: request `index` of round `round` of a (length, policy) cell.
    Warm-up rounds are sent but not summarized."""

    length: int
    policy: str
    round: int
    index: int
    warmup: bool = False


# ---------------------------------------------------------------------------------------------
# prompts


class PromptSource:
    """Distinct prompts of an exact length in tokens.

    With a tokenizer that encodes (a local one, or the server's ``/tokenize``), a pool of token
    ids is made once from random words, and each prompt is a token-id list of exactly the
    requested length drawn from the pool with its own seed: no two requests share a first KV
    block, so the prefix cache never serves one from another. Without one, prompts are random
    words at about 4 characters per token (`exact` is False) and the server's ``usage`` tells
    the real length."""

    def __init__(self, tokenizer: Any, seed: int):
        self.seed = seed
        rng = random.Random(f"{seed}:pool")
        vocabulary = words.vocabulary()
        self.exact = hasattr(tokenizer, "encode")
        if self.exact:
            self.pool: list[Any] = tokenizer.encode(" ".join(rng.choices(vocabulary,
                                                                         k=POOL_WORDS)))
            if not self.pool:
                raise BenchError("the tokenizer returned no tokens for the prompt pool")
        else:
            self.pool = list(vocabulary)

    def prompt(self, job: Job) -> list[int] | str:
        """Job's prompt: `job.length` token ids, or a text of about that many tokens."""
        rng = random.Random(f"{self.seed}:{job.length}:{job.policy}:{job.round}:{job.index}:"
                            f"{job.warmup}")
        if self.exact:
            return rng.choices(self.pool, k=job.length)
        chars = job.length * APPROX_CHARS_PER_TOKEN
        out: list[str] = []
        size = 0
        while size < chars:
            word = rng.choice(self.pool)
            out.append(word)
            size += len(word) + 1
        return " ".join(out)


def request_body(info: ServerInfo, prompt: list[int] | str, output_tokens: int,
                 fields: dict[str, Any]) -> dict[str, Any]:
    """A streamed `/v1/completions` body: greedy, `output_tokens` generated whatever the model
    says (``ignore_eos``, else ``min_tokens``, when the server declares it), usage reported in
    the last event, and the policy's extension `fields`."""
    body: dict[str, Any] = {"model": info.model, "prompt": prompt, "max_tokens": output_tokens,
                            "temperature": 0.0, "stream": True,
                            "stream_options": {"include_usage": True}, **fields}
    if "ignore_eos" in info.completion_options:
        body["ignore_eos"] = True
    elif "min_tokens" in info.completion_options:
        body["min_tokens"] = output_tokens
    return body


# ---------------------------------------------------------------------------------------------
# one request


async def measure(client: AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    """Send one streamed completion and time it.

    Returns ``ttft_s`` (first event carrying a choice), ``tpot_s`` (None with one output token),
    ``latency_s`` (last event), ``output_tokens`` (``usage.completion_tokens``, else the number
    of events with a choice), ``prompt_tokens`` (None without usage) and
    ``attention_work_saved`` (None unless the server's usage carries fluxserve's accounting).
    Raises `ApiError` when the request fails or the stream has no token."""
    first = last = end = None
    chunks = 0
    usage: dict | None = None
    async for elapsed, event in client.stream_events(COMPLETIONS, body):
        end = elapsed
        if not isinstance(event, dict):
            continue
        if event.get("choices"):
            chunks += 1
            first = elapsed if first is None else first
            last = elapsed
        if event.get("usage"):
            usage = event["usage"]
    if first is None or last is None or end is None:
        raise ApiError(200, "the stream ended without a token", COMPLETIONS)
    output = int((usage or {}).get("completion_tokens") or chunks)
    return {"ttft_s": first, "tpot_s": (last - first) / (output - 1) if output > 1 else None,
            "latency_s": end, "output_tokens": output,
            "prompt_tokens": (usage or {}).get("prompt_tokens"),
            "attention_work_saved": attention_work_saved(usage)}


# ---------------------------------------------------------------------------------------------
# statistics


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between order statistics (numpy's
    default). Raises ValueError on an empty list."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _ms(values: list[float], how: str) -> float | None:
    if not values:
        return None
    value = statistics.fmean(values) if how == "mean" else percentile(values, float(how[1:]))
    return round(1000 * value, 3)


def summarize(records: list[dict], policies: list[Policy]) -> list[dict]:
    """One row per (length, policy), warm-up requests left out: counts, mean prompt and output
    tokens, TTFT / TPOT / latency statistics in milliseconds (mean, p50, p95), and
    ``ttft_speedup`` / ``tpot_speedup``: the baseline's p50 over this policy's p50 at the same
    length (None where either is missing). Rows are sorted by length, then policy order."""
    groups: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for r in records:
        if not r.get("warmup"):
            groups[(r["length"], r["policy"])].append(r)
    by_name = {p.name: p for p in policies}
    rows = []
    for (length, name), rs in groups.items():
        ok = [r for r in rs if r.get("error") is None]
        ttft = [r["ttft_s"] for r in ok]
        tpot = [r["tpot_s"] for r in ok if r.get("tpot_s") is not None]
        latency = [r["latency_s"] for r in ok]
        prompt = [r["prompt_tokens"] for r in ok if r.get("prompt_tokens") is not None]
        saved = [r["attention_work_saved"] for r in ok
                 if r.get("attention_work_saved") is not None]
        rows.append({
            "length": length, "policy": name,
            **(by_name[name].attributes() if name in by_name else {}),
            "requests": len(ok), "errors": len(rs) - len(ok),
            "prompt_tokens": round(statistics.fmean(prompt), 1) if prompt else None,
            "output_tokens": round(statistics.fmean(r["output_tokens"] for r in ok), 1)
            if ok else None,
            "ttft_ms_mean": _ms(ttft, "mean"), "ttft_ms_p50": _ms(ttft, "p50"),
            "ttft_ms_p95": _ms(ttft, "p95"),
            "tpot_ms_mean": _ms(tpot, "mean"), "tpot_ms_p50": _ms(tpot, "p50"),
            "tpot_ms_p95": _ms(tpot, "p95"),
            "latency_ms_p50": _ms(latency, "p50"),
            "attention_work_saved": round(statistics.fmean(saved), 4) if saved else None,
        })
    baseline = {row["length"]: row for row in rows if row["policy"] == BASELINE}
    for row in rows:
        base = baseline.get(row["length"], {})
        for metric in ("ttft", "tpot"):
            mine, dense = row[f"{metric}_ms_p50"], base.get(f"{metric}_ms_p50")
            row[f"{metric}_speedup"] = round(dense / mine, 3) if mine and dense else None
    order = {p.name: i for i, p in enumerate(policies)}
    rows.sort(key=lambda r: (r["length"], order.get(r["policy"], len(order))))
    return rows


def _speedup(value: float | None) -> str | None:
    return None if value is None else f"{value:.2f}x"


def render_table(rows: list[dict]) -> str:
    """The summary as text: one line per (length, policy), times in milliseconds."""
    header = ["length", "policy", "ok", "errors", "TTFT p50", "TTFT p95", "TPOT p50",
              "TPOT p95", "TTFT speedup", "TPOT speedup"]
    body = [[r["length"], r["policy"], r["requests"], r["errors"], r["ttft_ms_p50"],
             r["ttft_ms_p95"], r["tpot_ms_p50"], r["tpot_ms_p95"], _speedup(r["ttft_speedup"]),
             _speedup(r["tpot_speedup"])] for r in rows]
    return (format_table(header, body) + "\n(times in ms; speedup = dense `full` p50 / policy "
            "p50 at the same length, measured in this run)")


def _length_label(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def plots(out: Path, rows: list[dict], policies: list[str], notes: list[str]) -> list[Path]:
    """ttft_vs_length.png, tpot_vs_length.png (one line per policy) and speedup.png (bars of
    each policy's TTFT and TPOT speedup per length; only with a policy besides the baseline)."""
    paths = []
    for metric, title in (("ttft", "Time to first token"), ("tpot", "Time per output token")):
        series = {p: [(r["length"], r[f"{metric}_ms_p50"]) for r in rows
                      if r["policy"] == p and r[f"{metric}_ms_p50"] is not None]
                  for p in policies}
        series = {p: pts for p, pts in series.items() if pts}
        if series:
            paths.append(plotting.line_plot(
                out / f"{metric}_vs_length.png", series, title=f"{title} (p50) vs context length",
                xlabel="context length (tokens)", ylabel=f"{metric.upper()} p50 (ms)",
                log2_x=True))
    lengths = sorted({r["length"] for r in rows})
    others = [p for p in policies if p != BASELINE]
    cell = {(r["length"], r["policy"]): r for r in rows}
    panels = {f"{metric.upper()} speedup": {
        p: [cell.get((n, p), {}).get(f"{metric}_speedup") for n in lengths] for p in others}
        for metric in ("ttft", "tpot")}
    if others and any(v is not None for panel in panels.values() for vs in panel.values()
                      for v in vs):
        paths.append(plotting.grouped_bars(
            out / "speedup.png", [_length_label(n) for n in lengths], panels,
            title="Speedup over dense attention (full), same run", xlabel="context length",
            ylabel="speedup (x, above 1 is faster)", reference=1.0))
    else:
        notes.append("no policy besides the baseline measured: speedup.png not written")
    return paths


# ---------------------------------------------------------------------------------------------
# the run


def schedule(lengths: list[int], policies: list[str], repeats: int, warmup: int,
             concurrency: int) -> list[list[Job]]:
    """The sweep as batches of simultaneous requests, in the order they are sent.

    For each length: `warmup` rounds, then `repeats` rounds; a round is one batch of
    `concurrency` requests per policy, the policies in turn, their order rotated by one each
    round so that none always follows a length change or another policy."""
    batches: list[list[Job]] = []
    for length in lengths:
        for r in range(warmup + repeats):
            shift = r % len(policies)
            for policy in policies[shift:] + policies[:shift]:
                batches.append([Job(length, policy, r, i, warmup=r < warmup)
                                for i in range(concurrency)])
    return batches


def _resolve_policies(specs: list[str]) -> list[Policy]:
    policies = parse_policies(specs)
    baseline = parse_policy(BASELINE)[0]
    return [baseline, *(p for p in policies if p.name != BASELINE)]


async def _probe(client: AsyncClient, info: ServerInfo, prompts: PromptSource,
                 policy: Policy, fields: dict[str, Any]) -> str | None:
    """One tiny streamed request with `fields`; the error message if it fails, else None."""
    prompt = prompts.prompt(Job(PROBE_TOKENS, f"probe:{policy.name}", 0, 0, warmup=True))
    try:
        await measure(client, request_body(info, prompt, 2, fields))
    except ApiError as exc:
        return exc.message
    return None


async def _sweep(client_cfg: ClientConfig, cfg: BenchConfig, info: ServerInfo,
                 prompts: PromptSource, policies: list[Policy], lengths: list[int],
                 notes: list[str]) -> tuple[list[Policy], list[dict]]:
    client = AsyncClient(client_cfg, concurrency=cfg.concurrency)
    try:
        runnable: list[tuple[Policy, dict]] = []
        for policy in policies:
            try:
                fields = policy.request_fields(info.extension_fields)
            except PolicySpecError as exc:
                notes.append(f"skipped policy {policy.name}: {exc}")
                continue
            if (error := await _probe(client, info, prompts, policy, fields)) is not None:
                if policy.name == BASELINE:
                    raise BenchError(f"the server refused a streamed completion: {error}")
                notes.append(f"skipped policy {policy.name}: the server refused it: {error}")
                continue
            runnable.append((policy, fields))
        fields_of = {p.name: f for p, f in runnable}
        batches = schedule(lengths, list(fields_of), cfg.repeats, cfg.warmup, cfg.concurrency)
        print(f"{len(lengths)} lengths x {len(runnable)} policies "
              f"({', '.join(fields_of)}) x {cfg.repeats} rounds of {cfg.concurrency} "
              f"simultaneous streams, {cfg.warmup} warm-up rounds, {cfg.output_tokens} output "
              f"tokens", file=sys.stderr)
        records: list[dict] = []
        bar = tqdm(total=sum(map(len, batches)), desc="bench", unit="req",
                   disable=not cfg.progress, dynamic_ncols=True)

        async def one(job: Job, body: dict) -> dict:
            record: dict[str, Any] = {**asdict(job), "error": None}
            try:
                record.update(await measure(client, body))
            except ApiError as exc:
                record["error"] = str(exc)
            bar.update(1)
            return record

        try:
            for batch in batches:
                bar.set_postfix_str(f"{_length_label(batch[0].length)} {batch[0].policy}"
                                    f"{' (warm-up)' if batch[0].warmup else ''}")
                bodies = [request_body(info, prompts.prompt(job), cfg.output_tokens,
                                       fields_of[job.policy]) for job in batch]
                records += await asyncio.gather(*(one(j, b) for j, b in
                                                  zip(batch, bodies, strict=True)))
        finally:
            bar.close()
        return [p for p, _ in runnable], records
    finally:
        await client.aclose()


def run(cfg: BenchConfig) -> dict:
    """Run the sweep; returns the summary written to ``summary.json``.

    Raises `BenchError` when it cannot start and ValueError on a bad option or policy."""
    bad = [n for n in cfg.lengths if not MIN_LENGTH <= n <= MAX_LENGTH]
    if bad:
        raise ValueError(f"lengths must be in [{MIN_LENGTH}, {MAX_LENGTH}], got {bad}")
    if not 1 <= cfg.output_tokens <= MAX_OUTPUT_TOKENS:
        raise ValueError(f"--output-tokens must be in [1, {MAX_OUTPUT_TOKENS}], "
                         f"got {cfg.output_tokens}")
    if cfg.repeats < 1 or cfg.concurrency < 1 or cfg.warmup < 0:
        raise ValueError("--repeats and --concurrency must be at least 1, --warmup at least 0")
    policies = _resolve_policies(cfg.policies)
    notes: list[str] = []
    client_cfg = ClientConfig(cfg.url, cfg.api_key, cfg.timeout_s, cfg.max_retries)
    sync = SyncClient(client_cfg)
    try:
        info = discover_or_raise(sync, cfg.model, BenchError)
        tokenizer = choose_tokenizer(cfg.tokenizer, sync, info.model, chat=False,
                                     prefill=False)
        prompts = PromptSource(tokenizer, cfg.seed)
    finally:
        sync.close()
    if not prompts.exact:
        notes.append(f"prompt lengths are approximate: {tokenizer.description}")
    if not {"ignore_eos", "min_tokens"} & info.completion_options:
        notes.append("the server declares neither ignore_eos nor min_tokens: a request may stop "
                      "before --output-tokens (TPOT is per token generated)")
    lengths = sorted(set(cfg.lengths))
    if info.max_model_len:
        too_long = [n for n in lengths if n + cfg.output_tokens > info.max_model_len]
        if too_long:
            notes.append(f"skipped lengths {too_long}: with {cfg.output_tokens} output tokens "
                         f"longer than the model's max_model_len {info.max_model_len}")
        lengths = [n for n in lengths if n not in too_long]
    if not lengths:
        raise BenchError("no length fits the served model's context")
    print(f"server {client_cfg.root}, model {info.model}"
          f"{' (fluxserve)' if info.is_fluxserve else ''}; prompts from {tokenizer.description}",
          file=sys.stderr)

    ran, records = asyncio.run(_sweep(client_cfg, cfg, info, prompts, policies, lengths, notes))
    names = [p.name for p in ran]
    rows = summarize(records, ran)
    short = sum(1 for r in records if r["error"] is None and r["output_tokens"]
                != cfg.output_tokens)
    if short:
        notes.append(f"{short} requests generated other than {cfg.output_tokens} tokens")
    out = Path(cfg.out)
    requests_csv = write_csv(out / "requests.csv", records)
    summary_csv = write_csv(out / "summary.csv", rows)
    pngs = plots(out, rows, names, notes)
    summary = {
        "server": client_cfg.root, "model": info.model, "tokenizer": tokenizer.description,
        "exact_lengths": prompts.exact, "lengths": lengths, "output_tokens": cfg.output_tokens,
        "concurrency": cfg.concurrency, "repeats": cfg.repeats, "warmup": cfg.warmup,
        "seed": cfg.seed, "fixed_output_length": sorted(
            {"ignore_eos", "min_tokens"} & info.completion_options),
        "policies": {p.name: {"flux": p.flux, "kv_policy": p.kv_policy} for p in ran},
        "rows": rows, "notes": notes,
        "files": {"requests": str(requests_csv), "csv": str(summary_csv),
                  "plots": [str(p) for p in pngs]},
    }
    write_json(out / "summary.json", summary)
    print(render_table(rows))
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {summary_csv}, {requests_csv}, {out / 'summary.json'}"
          + "".join(f", {p}" for p in pngs))
    return summary


def config_from_args(args) -> BenchConfig:
    return BenchConfig(**{k: getattr(args, k) for k in asdict(BenchConfig())
                          if hasattr(args, k)})
