"""Settings and combined outputs of one bounded serve-and-eval run (`scripts/gpu_quality_eval.sh`).

The script runs `fluxserve eval` once per length, shortest first, each under what is left of its
time budget, in one working folder; this module derives the server's context length and the
default policy list, and writes one summary of everything finished, complete or not.

    python -m evaluation.quality_run max-model-len MODEL_DIR 4K 8K 16K
    python -m evaluation.quality_run policies [--auto]
    python -m evaluation.quality_run summarize --work W --out O --tasks ... --lengths ... \
        --samples N --policies ... [--note TEXT ...]

It is an HTTP-side helper like the rest of `evaluation`: it imports neither vLLM nor the server.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from evaluation import tasks
from evaluation.cli import _length
from evaluation.long_context import AVERAGE, _key, render_table, summarize, write_plots
from evaluation.policies import parse_policies
from evaluation.results import JsonlStore, write_csv, write_json

KV_POLICIES = ("streaming", "snapkv", "calidrop")
DEFAULT_BUDGETS = (256, 512, 1024, 2048)


def serve_max_model_len(lengths: Sequence[int], max_position_embeddings: int | None) -> int:
    """The ``--max-model-len`` (tokens) that fits the longest eval length.

    An eval length counts the prompt *and* the task's output tokens (RULER's rule) and a prompt
    never exceeds its target, so the longest length is enough; it is capped at the model's
    ``max_position_embeddings`` (vLLM refuses more), and `fluxserve eval` then skips the lengths
    above it. Raises ValueError on an empty `lengths` or a non-positive value."""
    if not lengths or min(lengths) < 1:
        raise ValueError(f"lengths must be positive token counts, got {list(lengths)}")
    if max_position_embeddings is not None and max_position_embeddings < 1:
        raise ValueError(f"max_position_embeddings must be positive, got "
                         f"{max_position_embeddings}")
    longest = max(lengths)
    return min(longest, max_position_embeddings) if max_position_embeddings else longest


def model_max_position_embeddings(model_dir: str | Path) -> int | None:
    """``max_position_embeddings`` of a Hugging Face checkpoint's ``config.json`` (None when
    absent; the text config of a multimodal one is read too). Raises OSError, ValueError."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    for c in (config, config.get("text_config") or {}):
        if isinstance(c.get("max_position_embeddings"), int):
            return c["max_position_embeddings"]
    return None


def default_policies(auto: bool, budgets: Sequence[int] = DEFAULT_BUDGETS) -> list[str]:
    """The policy specs measured by default: ``full``, ``auto`` (only with a router), ``sparse``
    at the server's default sink + window (the router's when it has one), and each KV eviction
    policy at each budget (tokens per head)."""
    joined = ",".join(str(b) for b in budgets)
    return ["full", *(["auto"] if auto else []), "sparse",
            *(f"{name}:{joined}" for name in KV_POLICIES)]


def summarize_folder(work: str | Path, out: str | Path, task_names: list[str],
                     lengths: list[int], samples: int, policy_specs: list[str],
                     notes: list[str]) -> tuple[list[dict], str]:
    """Summarize the finished items of `work`'s ``results.jsonl`` that belong to this run's
    tasks x lengths x samples x policies, into `out`: ``summary.csv``, ``summary.json``, the
    accuracy plots and a copy of ``results.jsonl``. Items never run (a timeout, a policy the
    server refused) are simply absent: ``summary.json`` lists the cells with fewer than `samples`
    scored items. Returns the rows and the accuracy table as text."""
    work, out = Path(work), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    policies = [p.name for p in parse_policies(policy_specs)]
    wanted_tasks, wanted_lengths = set(task_names), set(lengths)
    records = [r for r in JsonlStore(work / "results.jsonl", _key).load().values()
               if r["task"] in wanted_tasks and r["length"] in wanted_lengths
               and r["policy"] in policies and r["index"] < samples]
    present = {r["policy"] for r in records}
    policies = [p for p in policies if p in present]
    rows = summarize(records, policies)
    notes = list(notes)
    csv_path = write_csv(out / "summary.csv", rows)
    plots = write_plots(out, rows, policies, notes)
    incomplete = [f"{r['task']} {r['length']} {r['policy']}: {r['samples']} of {samples}"
                  for r in rows if r["task"] != AVERAGE and r["samples"] < samples]
    write_json(out / "summary.json", {
        "tasks": task_names, "lengths": sorted(lengths), "samples_per_cell": samples,
        "policies_asked": policy_specs, "policies_measured": policies, "rows": rows,
        "incomplete_cells": incomplete, "notes": notes,
        "files": {"csv": csv_path.name, "plots": [p.name for p in plots]}})
    if (work / "results.jsonl").exists() and work.resolve() != out.resolve():
        shutil.copyfile(work / "results.jsonl", out / "results.jsonl")
    return rows, render_table(rows, policies)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluation.quality_run",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    mml = sub.add_parser("max-model-len", help="print the --max-model-len to serve with")
    mml.add_argument("model_dir")
    mml.add_argument("lengths", nargs="+", type=_length)
    pol = sub.add_parser("policies", help="print the default policy specs, one per line")
    pol.add_argument("--auto", action="store_true", help="the server has a Flux router")
    summ = sub.add_parser("summarize", help="combined summary of a working folder")
    summ.add_argument("--work", required=True)
    summ.add_argument("--out", required=True)
    summ.add_argument("--tasks", nargs="+", required=True)
    summ.add_argument("--lengths", nargs="+", type=_length, required=True)
    summ.add_argument("--samples", type=int, required=True)
    summ.add_argument("--policies", nargs="+", required=True)
    summ.add_argument("--note", action="append", default=[])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "max-model-len":
        print(serve_max_model_len(args.lengths, model_max_position_embeddings(args.model_dir)))
    elif args.command == "policies":
        print("\n".join(default_policies(args.auto)))
    else:
        rows, table = summarize_folder(args.work, args.out, tasks.resolve_tasks(args.tasks),
                                       args.lengths, args.samples, args.policies, args.note)
        print(table if rows else "no finished items")
    return 0


if __name__ == "__main__":
    sys.exit(main())
