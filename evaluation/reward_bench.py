"""`fluxserve reward-bench`: a Long-RewardBench-format file through a server's `/v1/reward`.

A pure HTTP client (it imports neither vLLM nor the server). Each JSONL record has
``prompt_template`` (the context, chat messages), ``tasktype`` (``PairWise`` or ``BestOfN``),
``chosen`` and ``rejected`` (PairWise) or ``candidates`` (BestOfN, best first),
``subtype`` and ``ctx_length_for_length`` (``4k`` ... ``128k``, or a token count). A record's
task is its ``task`` field, else the file's name (Long-RewardBench ships one file per task).

Candidates are shown in an order shuffled with a fixed seed (as LongRM does, against position
bias). Accuracy follows LongRM's evaluator: a record scores the fraction of shown positions whose
predicted rank equals the true rank (for PairWise: 1 if the chosen response wins, else 0); a judge
output without a usable verdict scores 0. Requests the server rejects (e.g. candidates too long
for its context) are counted as errors and left out of the accuracy.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import math
import os
import random
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LENGTH_BUCKETS = ("4K", "8K", "16K", "32K", "64K", "128K")
FORMATS = ("PairWise", "BestOfN")
API_KEY_ENV = "FLUXSERVE_API_KEY"


@dataclass
class Record:
    task: str
    tasktype: str
    subtype: str
    length: str
    messages: list[dict[str, str]]
    answers: list[str]  # best first: [chosen, rejected] or the candidates


@dataclass
class Outcome:
    record: Record
    score: float | None = None  # None: the request failed (see error)
    unparsed: bool = False
    error: str | None = None


def length_bucket(value: Any) -> str:
    """``"8k"`` / ``"8K"`` / ``8192`` -> ``"8K"``; a token count goes to the smallest bucket that
    holds it (over 128K: ``"128K"``). Raises ValueError for anything else."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*[kK]\s*", value)
        if m:
            label = f"{int(m.group(1))}K"
            if label in LENGTH_BUCKETS:
                return label
            raise ValueError(f"unknown length bucket {value!r}")
        value = int(value)
    tokens = int(value)
    for label in LENGTH_BUCKETS:
        if tokens <= int(label[:-1]) * 1024:
            return label
    return LENGTH_BUCKETS[-1]


def load_records(paths: Iterable[Path]) -> list[Record]:
    """Read Long-RewardBench JSONL files. Raises ValueError naming the file and line of a record
    that lacks a needed field."""
    records = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(_record(json.loads(line), path.stem))
                except (KeyError, TypeError, ValueError) as exc:
                    raise ValueError(f"{path}:{lineno}: not a Long-RewardBench record: "
                                     f"{type(exc).__name__}: {exc}") from exc
    return records


def _record(raw: dict, default_task: str) -> Record:
    tasktype = raw.get("tasktype") or "PairWise"
    if tasktype not in FORMATS:
        raise ValueError(f"tasktype {tasktype!r} is not one of {FORMATS}")
    answers = ([raw["chosen"], raw["rejected"]] if tasktype == "PairWise"
               else list(raw["candidates"]))
    messages = [{"role": m["role"], "content": m["content"]} for m in raw["prompt_template"]]
    return Record(task=str(raw.get("task") or default_task), tasktype=tasktype,
                  subtype=str(raw.get("subtype")), length=length_bucket(
                      raw["ctx_length_for_length"]), messages=messages, answers=answers)


def shuffled_orders(records: list[Record], seed: int) -> list[list[int]]:
    """Per record, the answer indices in display order (one seeded generator, file order)."""
    rng = random.Random(seed)
    orders = []
    for r in records:
        order = list(range(len(r.answers)))
        rng.shuffle(order)
        orders.append(order)
    return orders


def predicted_ranks(result: dict, mode: str) -> list[int] | None:
    """0-based rank (0 = best) of each shown candidate, from one `/v1/reward` item result;
    None when the judge gave no verdict."""
    cands = sorted(result["candidates"], key=lambda c: c["index"])
    if mode == "scalar":
        by_score = sorted(range(len(cands)), key=lambda i: -cands[i]["score"])
        ranks = [0] * len(cands)
        for rank, i in enumerate(by_score):
            ranks[i] = rank
        return ranks
    if any(c["rank"] is None for c in cands):
        return None
    return [c["rank"] - 1 for c in cands]


def record_score(order: list[int], ranks: list[int] | None) -> float:
    """LongRM's per-record score: the fraction of shown positions ranked correctly (shown
    position i holds answer ``order[i]``, whose true rank is ``order[i]``)."""
    if ranks is None:
        return 0.0
    return sum(int(r == o) for r, o in zip(ranks, order, strict=True)) / len(order)


def build_item(record: Record, order: list[int], args: argparse.Namespace) -> dict:
    item: dict[str, Any] = {
        "messages": record.messages,
        "candidates": [record.answers[i] for i in order],
        "mode": args.mode,
    }
    if args.model:
        item["model"] = args.model
    if args.mode == "judge":
        item["judge_prompt"] = "pairwise" if record.tasktype == "PairWise" else "ranking"
        item["max_tokens"] = args.max_tokens
        if args.swap:
            item["swap"] = True
        if args.flux:
            item["flux"] = args.flux
        if args.kv_policy:
            item["kv_policy"] = args.kv_policy
    return item


async def evaluate(records: list[Record], args: argparse.Namespace) -> list[Outcome]:
    """Send every record (one item per request, at most ``args.concurrency`` in flight)."""
    import httpx
    from tqdm.auto import tqdm

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the bar
    orders = shuffled_orders(records, args.seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = asyncio.Semaphore(args.concurrency)
    outcomes: list[Outcome | None] = [None] * len(records)
    url = args.url.rstrip("/") + "/v1/reward"
    async with httpx.AsyncClient(headers=headers, timeout=args.timeout) as client:
        with tqdm(total=len(records), desc=f"reward-bench ({args.mode})", unit="record",
                  disable=args.quiet or None) as bar:
            async def one(i: int) -> None:
                async with limit:
                    outcomes[i] = await _one(client, url, records[i], orders[i], args)
                bar.update()
            await asyncio.gather(*(one(i) for i in range(len(records))))
    return [o for o in outcomes if o is not None]


async def _one(client, url: str, record: Record, order: list[int], args) -> Outcome:
    import httpx

    try:
        resp = await client.post(url, json={"items": [build_item(record, order, args)]})
    except httpx.HTTPError as exc:
        return Outcome(record, error=f"{type(exc).__name__}: {exc}")
    if resp.status_code != 200:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text[:200]
        return Outcome(record, error=f"HTTP {resp.status_code}: {message}")
    result = resp.json()["data"][0]
    ranks = predicted_ranks(result, args.mode)
    return Outcome(record, score=record_score(order, ranks), unparsed=ranks is None)


@dataclass
class Row:
    group: str  # "task", "length", "format" or "overall"
    name: str
    tasktype: str  # PairWise / BestOfN / all
    scores: list[float] = field(default_factory=list)
    errors: int = 0
    unparsed: int = 0

    @property
    def accuracy(self) -> float:
        return sum(self.scores) / len(self.scores) if self.scores else math.nan


def summarize(outcomes: list[Outcome]) -> list[Row]:
    """Accuracy per task and per length bucket, for each format; per format; overall."""
    rows: dict[tuple[str, str, str], Row] = {}

    def add(group: str, name: str, tasktype: str, o: Outcome) -> None:
        row = rows.setdefault((group, name, tasktype), Row(group, name, tasktype))
        if o.score is None:
            row.errors += 1
            return
        row.scores.append(o.score)
        row.unparsed += int(o.unparsed)

    for o in outcomes:
        r = o.record
        add("task", r.task, r.tasktype, o)
        add("length", r.length, r.tasktype, o)
        add("format", r.tasktype, r.tasktype, o)
        add("overall", "all", "all", o)
    order = {"task": 0, "length": 1, "format": 2, "overall": 3}

    def key(row: Row):
        name_key = LENGTH_BUCKETS.index(row.name) if row.group == "length" else row.name
        return order[row.group], FORMATS.index(row.tasktype) if row.tasktype in FORMATS else 9, \
            str(name_key).zfill(3) if row.group == "length" else name_key

    return sorted(rows.values(), key=key)


def format_table(rows: list[Row]) -> str:
    header = ("group", "name", "format", "n", "accuracy", "unparsed", "errors")
    lines = [header] + [(r.group, r.name, r.tasktype, str(len(r.scores)),
                         "-" if not r.scores else f"{r.accuracy:.4f}", str(r.unparsed),
                         str(r.errors)) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_csv(rows: list[Row], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "name", "format", "n", "accuracy", "unparsed", "errors"])
        for r in rows:
            writer.writerow([r.group, r.name, r.tasktype, len(r.scores),
                             "" if not r.scores else f"{r.accuracy:.6f}", r.unparsed, r.errors])


def plot(rows: list[Row], path: Path, title: str) -> None:
    """Bar charts: accuracy per task and per length bucket, one bar per format."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, group in zip(axes, ("task", "length"), strict=True):
        names = list(dict.fromkeys(r.name for r in rows if r.group == group))
        if group == "length":
            names = [b for b in LENGTH_BUCKETS if b in names]
        width = 0.8 / len(FORMATS)
        for k, fmt in enumerate(FORMATS):
            acc = {r.name: r.accuracy for r in rows if r.group == group and r.tasktype == fmt}
            xs = [i + (k - (len(FORMATS) - 1) / 2) * width for i in range(len(names))]
            values = [acc.get(n, math.nan) for n in names]
            bars = ax.bar(xs, [0 if math.isnan(v) else v for v in values], width, label=fmt)
            ax.bar_label(bars, ["" if math.isnan(v) else f"{v:.2f}" for v in values], fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(f"per {group}")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _json_option(kind: str, key: str):
    def parse(text: str) -> dict:
        text = text.strip()
        if text.startswith("{"):
            value = json.loads(text)
            if not isinstance(value, dict):
                raise argparse.ArgumentTypeError(f"--{kind} must be a JSON object")
            return value
        return {key: text}
    return parse


def add_parser(commands) -> argparse.ArgumentParser:
    """Add the ``reward-bench`` subcommand to ``commands`` (an argparse subparsers object)."""
    p = commands.add_parser(
        "reward-bench", help="Evaluate a Long-RewardBench-format file through /v1/reward.",
        description=__doc__.split("\n\n")[0])
    add_cli_args(p)
    return p


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", type=Path, metavar="FILE.jsonl",
                   help="Long-RewardBench JSONL file(s); each file's name is its task by default.")
    p.add_argument("--url", required=True, help="Server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--mode", choices=["scalar", "judge"], default="judge")
    p.add_argument("--model", default=None, help="Model to request (default: the server's).")
    p.add_argument("--flux", type=_json_option("flux", "mode"), default=None,
                   help="judge: Flux routing, a mode name (full, sparse, auto) or a JSON object.")
    p.add_argument("--kv-policy", type=_json_option("kv-policy", "name"), default=None,
                   help="judge: KV policy, a name (snapkv, calidrop, ...) or a JSON object.")
    p.add_argument("--swap", action="store_true",
                   help="judge: also judge the reversed order; disagreement scores 0.")
    p.add_argument("--max-tokens", type=int, default=1024, help="judge: output token limit.")
    p.add_argument("--concurrency", type=int, default=4, help="Requests in flight at once.")
    p.add_argument("--seed", type=int, default=42, help="Seed of the candidate shuffling.")
    p.add_argument("--limit", type=int, default=None, help="Only the first N records.")
    p.add_argument("--timeout", type=float, default=600.0, help="Per-request timeout (s).")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"Bearer key (default: ${API_KEY_ENV}).")
    p.add_argument("--out-dir", type=Path, default=Path("reward-bench-results"),
                   help="Where results.csv and results.png go.")
    p.add_argument("--quiet", action="store_true", help="No progress bar.")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the evaluation; returns the exit status (1 when every request failed)."""
    if args.concurrency < 1 or args.max_tokens < 1:
        print("--concurrency and --max-tokens must be at least 1", file=sys.stderr)
        return 2
    try:
        records = load_records(args.files)
    except (OSError, ValueError) as exc:
        print(f"reward-bench: {exc}", file=sys.stderr)
        return 2
    if args.limit is not None:
        records = records[:args.limit]
    if not records:
        print("reward-bench: no records", file=sys.stderr)
        return 2
    outcomes = asyncio.run(evaluate(records, args))
    rows = summarize(outcomes)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = args.out_dir / "results.csv", args.out_dir / "results.png"
    write_csv(rows, csv_path)
    label = args.mode + (f", flux={json.dumps(args.flux)}" if args.flux else "") + \
        (f", kv_policy={json.dumps(args.kv_policy)}" if args.kv_policy else "")
    plot(rows, png_path, f"Long-RewardBench accuracy ({label})")
    print(format_table(rows))
    errors = [o.error for o in outcomes if o.error]
    if errors:
        print(f"\n{len(errors)} request(s) failed; first: {errors[0]}", file=sys.stderr)
    print(f"\nwrote {csv_path} and {png_path}")
    return 1 if len(errors) == len(outcomes) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fluxserve reward-bench",
                                     description=__doc__.split("\n\n")[0])
    add_cli_args(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
