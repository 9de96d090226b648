"""`fluxserve eval`: RULER-style long-context accuracy of every policy, through the HTTP API.

One run: discover the server, pick chat or completions, keep the policies the server accepts,
generate the samples (fitted to each length with the served model's tokenizer), send every
(sample, policy) pair with greedy decoding and bounded concurrency, score it with RULER's
metric, and write the table, CSV, JSON and plots. Every finished item is appended to
``results.jsonl`` in the output folder, so the same command resumes an interrupted run.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evaluation import plotting, scoring, tasks
from evaluation.client import (
    DEFAULT_URL,
    ApiError,
    AsyncClient,
    ClientConfig,
    ServerInfo,
    SyncClient,
    discover_or_raise,
)
from evaluation.policies import Policy, PolicySpecError, parse_policies
from evaluation.results import (
    JsonlStore,
    RunFolderError,
    check_run_folder,
    format_table,
    write_csv,
    write_json,
)
from evaluation.tokenization import chat_messages, choose_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_LENGTHS = [4096, 8192, 16384, 32768, 65536, 131072]  # RULER's
MAX_LENGTH = 1 << 20
AVERAGE = "average"  # the pseudo-task: the mean over the tasks of one length and policy


@dataclass
class EvalConfig:
    """Options of one `fluxserve eval` run (see `evaluation.cli` for their meaning)."""

    url: str = DEFAULT_URL
    api_key: str | None = None
    model: str | None = None
    tasks: list[str] = field(default_factory=lambda: ["all"])
    lengths: list[int] = field(default_factory=lambda: list(DEFAULT_LENGTHS))
    policies: list[str] = field(default_factory=lambda: ["all"])
    samples: int = 20
    seed: int = 42
    concurrency: int = 4
    api: str = "auto"
    tokenizer: str | None = None
    out: str = "fluxserve-eval"
    timeout_s: float = 600.0
    max_retries: int = 4
    progress: bool = True


class EvalError(RuntimeError):
    """The run cannot start (unreachable server, nothing to run, a mismatching output folder)."""


def _key(record: dict) -> tuple:
    return (record["task"], record["length"], record["policy"], record["index"])


# ---------------------------------------------------------------------------------------------
# requests


@dataclass
class Plan:
    info: ServerInfo
    api: str  # "chat" or "completions"
    prefill: bool  # chat: the answer prefix is a pre-filled assistant turn
    seed: int

    def body(self, prompt: str, answer_prefix: str, max_tokens: int,
             fields: dict[str, Any]) -> dict[str, Any]:
        """The request body: greedy decoding, the policy's extension fields."""
        body: dict[str, Any] = {"model": self.info.model, "max_tokens": max_tokens,
                                "temperature": 0.0, "top_p": 1.0, "seed": self.seed, **fields}
        if self.api == "chat":
            body["messages"] = chat_messages(prompt, answer_prefix, self.prefill)
            if self.prefill:
                body["continue_final_message"] = True
                body["add_generation_prompt"] = False
        else:
            body["prompt"] = prompt + answer_prefix
        return body

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.api == "chat" else "/v1/completions"


def _reply_text(response: dict) -> tuple[str, str | None]:
    choice = (response.get("choices") or [{}])[0]
    if "message" in choice:
        return (choice["message"] or {}).get("content") or "", choice.get("finish_reason")
    return choice.get("text") or "", choice.get("finish_reason")


def attention_work_saved(usage: dict | None) -> float | None:
    """The fraction of attention work a policy saved, from the response's ``usage.fluxserve``
    accounting object when the server sends one (docs/openai_api.md): its
    ``attention_work_saved``, which is ``attention_flops_saved / attention_flops_dense`` (a
    fraction in [0, 1]), computed from those two when only they are present. None when
    absent."""
    acct = (usage or {}).get("fluxserve")
    if not isinstance(acct, dict):
        return None
    if isinstance(acct.get("attention_work_saved"), int | float):
        return float(acct["attention_work_saved"])
    saved, dense = acct.get("attention_flops_saved"), acct.get("attention_flops_dense")
    if isinstance(saved, int | float) and isinstance(dense, int | float) and dense > 0:
        return float(saved) / float(dense)
    return None


def _probe(client: SyncClient, plan: Plan, fields: dict[str, Any]) -> str | None:
    """Send one tiny request; the error message if the server refuses it, else None."""
    try:
        client.request("POST", plan.path, json=plan.body("Say hello.", " Hello", 1, fields),
                       retries=1)
    except ApiError as exc:
        return exc.message
    return None


def _resolve_api(client: SyncClient, info: ServerInfo, api: str, seed: int
                 ) -> tuple[Plan, list[str]]:
    notes: list[str] = []
    if api in ("auto", "chat"):
        for prefill in ([True, False] if info.continue_final_message else [False]):
            plan = Plan(info, "chat", prefill, seed)
            error = _probe(client, plan, {})
            if error is None:
                if not prefill:
                    notes.append("chat without a pre-filled answer prefix (the server does not "
                                 "continue a final assistant message); RULER pre-fills it")
                return plan, notes
        if api == "chat":
            raise EvalError(f"the server refused a chat request: {error}")
        notes.append(f"chat refused ({error}); using completions with RULER's plain template")
    plan = Plan(info, "completions", False, seed)
    error = _probe(client, plan, {})
    if error is not None:
        raise EvalError(f"the server refused a completions request: {error}")
    return plan, notes


# ---------------------------------------------------------------------------------------------
# summary


def summarize(records: list[dict], policies: list[str]) -> list[dict]:
    """Accuracy (RULER's percentage) per (task, length, policy), plus the ``average`` over the
    tasks of each (length, policy). Failed requests are counted apart, not scored."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["task"], r["length"], r["policy"])].append(r)
    rows = []
    for (task, length, policy), rs in groups.items():
        ok = [r for r in rs if r.get("error") is None]
        saved = [r["attention_work_saved"] for r in ok if r.get("attention_work_saved") is not None]
        rows.append({
            "task": task, "length": length, "policy": policy, "samples": len(ok),
            "errors": len(rs) - len(ok),
            "accuracy": round(100 * statistics.fmean(r["score"] for r in ok), 2) if ok else None,
            "mean_prompt_tokens": round(statistics.fmean(r["prompt_tokens"] for r in ok), 1)
            if ok and all(r.get("prompt_tokens") is not None for r in ok) else None,
            "attention_work_saved": round(statistics.fmean(saved), 4) if saved else None,
        })
    by_lp: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if row["accuracy"] is not None:
            by_lp[(row["length"], row["policy"])].append(row)
    for (length, policy), rs in by_lp.items():
        saved = [r["attention_work_saved"] for r in rs if r["attention_work_saved"] is not None]
        rows.append({
            "task": AVERAGE, "length": length, "policy": policy,
            "samples": sum(r["samples"] for r in rs), "errors": sum(r["errors"] for r in rs),
            "accuracy": round(statistics.fmean(r["accuracy"] for r in rs), 2),
            "mean_prompt_tokens": None,
            "attention_work_saved": round(statistics.fmean(saved), 4) if saved else None,
        })
    order = {p: i for i, p in enumerate(policies)}
    rows.sort(key=lambda r: (r["task"] == AVERAGE, r["task"], r["length"],
                             order.get(r["policy"], len(order))))
    return rows


def render_table(rows: list[dict], policies: list[str]) -> str:
    """Accuracy (%) with one row per (task, length) and one column per policy."""
    cells: dict[tuple, dict[str, Any]] = defaultdict(dict)
    for r in rows:
        cells[(r["task"], r["length"])][r["policy"]] = r["accuracy"]
    body = [[task, length, *(cells[(task, length)].get(p) for p in policies)]
            for (task, length) in cells]
    return format_table(["task", "length", *policies], body)


def write_plots(out: Path, rows: list[dict], policies: list[str],
                notes: list[str]) -> list[Path]:
    """Write the accuracy plots of `summarize`'s rows to `out` (PNG); returns their paths.
    Appends to `notes` why the work-saved plot is missing when it is."""
    avg = [r for r in rows if r["task"] == AVERAGE]
    paths = []
    series = {p: [(r["length"], r["accuracy"]) for r in avg if r["policy"] == p]
              for p in policies}
    series = {p: pts for p, pts in series.items() if pts}
    if series:
        paths.append(plotting.line_plot(
            out / "accuracy_vs_length.png", series, title="Accuracy vs context length "
            "(mean over tasks)", xlabel="context length (tokens)", ylabel="accuracy (%)",
            log2_x=True, ylim=(-2, 102)))
    panels: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(
        lambda: defaultdict(list))
    for r in rows:
        if r["task"] != AVERAGE and r["accuracy"] is not None:
            panels[r["task"]][r["policy"]].append((r["length"], r["accuracy"]))
    if panels:
        paths.append(plotting.small_multiples(
            out / "accuracy_vs_length_by_task.png", panels, title="Accuracy vs context length "
            "per task", xlabel="context length (tokens)", ylabel="accuracy (%)", log2_x=True,
            ylim=(-2, 102)))
    points: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in avg:
        if r["attention_work_saved"] is not None:
            points[r["policy"]].append((100 * r["attention_work_saved"], r["accuracy"]))
    if points:
        paths.append(plotting.scatter_plot(
            out / "accuracy_vs_work_saved.png", points, title="Accuracy vs attention work "
            "saved (one point per length)", xlabel="attention work saved (%)",
            ylabel="accuracy (%)", ylim=(-2, 102)))
    else:
        notes.append("no attention-work accounting in the responses (usage.fluxserve): "
                     "accuracy_vs_work_saved.png not written")
    return paths


# ---------------------------------------------------------------------------------------------
# the run


def _check_run_folder(out: Path, fingerprint: dict) -> None:
    try:
        check_run_folder(out, fingerprint)
    except RunFolderError as exc:
        raise EvalError(str(exc)) from None


def run(cfg: EvalConfig) -> dict:
    """Run the evaluation; returns the summary written to ``summary.json``.

    Raises `EvalError` when it cannot start, ValueError on a bad task or policy, and lets
    KeyboardInterrupt through after the finished items are safely on disk."""
    notes: list[str] = []
    task_names = tasks.resolve_tasks(cfg.tasks)
    policies = parse_policies(cfg.policies)
    bad = [n for n in cfg.lengths if not tasks.MIN_LENGTH <= n <= MAX_LENGTH]
    if bad:
        raise ValueError(f"lengths must be in [{tasks.MIN_LENGTH}, {MAX_LENGTH}], got {bad}")
    if cfg.samples < 1:
        raise ValueError(f"--samples must be at least 1, got {cfg.samples}")

    client_cfg = ClientConfig(cfg.url, cfg.api_key, cfg.timeout_s, cfg.max_retries)
    sync = SyncClient(client_cfg)
    try:
        info = discover_or_raise(sync, cfg.model, EvalError)
        plan, api_notes = _resolve_api(sync, info, cfg.api, cfg.seed)
        notes += api_notes
        if not info.extension_fields:
            notes.append("the server does not declare the flux/kv_policy request fields: only "
                         "the `full` policy can run there")

        runnable: list[tuple[Policy, dict]] = []
        unsupported: list[str] = []
        for policy in policies:
            try:
                fields = policy.request_fields(info.extension_fields)
            except PolicySpecError:
                unsupported.append(policy.name)
                continue
            if fields and (error := _probe(sync, plan, fields)) is not None:
                notes.append(f"skipped policy {policy.name}: the server refused it: {error}")
                continue
            runnable.append((policy, fields))
        if unsupported:
            notes.append(f"skipped {len(unsupported)} policies that need fluxserve's request "
                         f"fields: {', '.join(unsupported)}")
        if not runnable:
            raise EvalError("no policy can run on this server:\n  " + "\n  ".join(notes))

        lengths = sorted(set(cfg.lengths))
        if info.max_model_len:
            too_long = [n for n in lengths if n > info.max_model_len]
            if too_long:
                notes.append(f"skipped lengths {too_long}: longer than the model's "
                             f"max_model_len {info.max_model_len}")
            lengths = [n for n in lengths if n <= info.max_model_len]
        if not lengths:
            raise EvalError("no length fits the served model's context")

        tokenizer = choose_tokenizer(cfg.tokenizer, sync, info.model, plan.api == "chat",
                                     plan.prefill)
        if not tokenizer.exact:
            notes.append(f"lengths counted with {tokenizer.description}")

        out = Path(cfg.out)
        fingerprint = {"model": info.model, "seed": cfg.seed, "api": plan.api,
                       "prefill": plan.prefill, "tokenizer": tokenizer.description}
        _check_run_folder(out, fingerprint)
        _print_header(cfg, info, plan, tokenizer, runnable, lengths, task_names)
        samples = tasks.generate_samples(
            task_names, lengths, cfg.samples, cfg.seed,
            lambda built: tokenizer.count(built.prompt, built.answer_prefix), notes,
            progress=cfg.progress, cache=JsonlStore(out / "samples.jsonl", lambda r: (
                r["task"], r["length"], r["index"])))
    finally:
        sync.close()

    store = JsonlStore(out / "results.jsonl", _key)
    finished = {k for k, r in store.load().items() if r.get("error") is None}
    todo = [(s, p, f) for s in samples for p, f in runnable
            if (s.task, s.length, p.name, s.index) not in finished]
    total = len(samples) * len(runnable)
    print(f"{total - len(todo)} of {total} items already done in {out}; {len(todo)} to run",
          file=sys.stderr)
    if todo:
        asyncio.run(_run_items(client_cfg, cfg, plan, todo, store))

    wanted_policies = [p.name for p, _ in runnable]
    keys = {(s.task, s.length, p, s.index) for s in samples for p in wanted_policies}
    records = [r for k, r in store.load().items() if k in keys]
    rows = summarize(records, wanted_policies)
    csv_path = write_csv(out / "summary.csv", rows)
    plots = write_plots(out, rows, wanted_policies, notes)
    summary = {
        "server": client_cfg.root, "model": info.model, "api": plan.api,
        "answer_prefix_prefilled": plan.prefill, "tokenizer": tokenizer.description,
        "seed": cfg.seed, "samples_per_cell": cfg.samples, "tasks": task_names,
        "lengths": lengths,
        "policies": {p.name: {"flux": p.flux, "kv_policy": p.kv_policy} for p, _ in runnable},
        "rows": rows, "notes": notes,
        "files": {"results": str(store.path), "csv": str(csv_path),
                  "plots": [str(p) for p in plots]},
    }
    write_json(out / "summary.json", summary)
    print(render_table(rows, wanted_policies))
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {csv_path}, {out / 'summary.json'}" + "".join(f", {p}" for p in plots))
    return summary


def _print_header(cfg, info, plan, tokenizer, runnable, lengths, task_names) -> None:
    print(f"server {ClientConfig(cfg.url).root}, model {info.model}"
          f"{' (fluxserve)' if info.is_fluxserve else ''}; {plan.api}"
          f"{' with the answer prefix pre-filled' if plan.prefill else ''}; "
          f"lengths counted with {tokenizer.description}", file=sys.stderr)
    print(f"{len(task_names)} tasks x {len(lengths)} lengths x {cfg.samples} samples x "
          f"{len(runnable)} policies ({', '.join(p.name for p, _ in runnable)})",
          file=sys.stderr)


async def _run_items(client_cfg: ClientConfig, cfg: EvalConfig, plan: Plan,
                     todo: list[tuple[tasks.Sample, Policy, dict]], store: JsonlStore) -> None:
    client = AsyncClient(client_cfg, concurrency=cfg.concurrency)

    async def one(item: tuple[tasks.Sample, Policy, dict]) -> dict:
        sample, policy, fields = item
        record: dict[str, Any] = {"task": sample.task, "length": sample.length,
                                  "index": sample.index, "policy": policy.name,
                                  "references": sample.outputs}
        start = time.monotonic()
        try:
            response = await client.request("POST", plan.path, json=plan.body(
                sample.prompt, sample.answer_prefix, sample.max_tokens, fields))
        except ApiError as exc:
            return {**record, "error": str(exc), "score": None}
        text, finish = _reply_text(response)
        usage = response.get("usage") or {}
        return {**record, "error": None, "prediction": text,
                "score": scoring.score(sample.metric, text, sample.outputs),
                "finish_reason": finish, "prompt_tokens": usage.get("prompt_tokens"),
                "completion_tokens": usage.get("completion_tokens"),
                "attention_work_saved": attention_work_saved(usage),
                "latency_s": round(time.monotonic() - start, 3)}

    try:
        await client.map(one, todo, desc="requests", progress=cfg.progress,
                         on_result=lambda _item, record: store.append(record))
    finally:
        await client.aclose()


def config_from_args(args) -> EvalConfig:
    return EvalConfig(**{k: getattr(args, k) for k in asdict(EvalConfig()) if hasattr(args, k)})
