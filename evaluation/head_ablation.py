"""`fluxserve eval heads-ablate`: what the retrieval heads of a local checkpoint are worth, by
greedy generation on the eval tasks in Hugging Face transformers (offline, no server).

Two experiments on the same samples as ``fluxserve eval`` (the same generators, prompts, answer
prefix, output tokens and RULER metric):

``force``
    Accuracy when (a) nothing is forced (``none``), (b) the top ``p`` % of query heads by
    retrieval score (``fluxserve eval heads``) are forced to sink + window attention (``top``),
    (c) a random ``p`` % of the other heads are forced (``random``: several seeded draws, each on
    every sample, averaged).
``evict``
    A simulation of KV eviction after prefill: SnapKV's selection (the served policy's own
    ``select``, on the prompt's keys and the last ``obs_window`` prompt queries) decides which
    prompt keys each KV head keeps, and the decode queries are masked to those keys. Per budget
    ``B``: ``snapkv`` (every KV head keeps ``B``, as served), ``protect`` (the KV heads of the top
    heads keep the whole prompt, or ``protected_budget`` tokens, the others ``B``) and
    ``protect-equal`` (the same, with the unprotected heads' budget lowered so that the total KV
    kept equals ``snapkv``'s; infeasible, and skipped, when that leaves them no more than the
    observation window).

The served paged layout keeps exactly ``budget`` tokens per KV head, so ``protect`` cannot run
in the engine today; this measures whether it would be worth building (per-head budgets).
"""

from __future__ import annotations

import json
import logging
import random
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from evaluation import plotting, scoring, tasks
from evaluation.cli import (
    ABLATE_BUDGETS,
    ABLATE_DRAWS,
    ABLATE_LENGTHS,
    ABLATE_SAMPLES,
    ABLATE_TASKS,
    HEADS_LENGTHS,
    HEADS_SAMPLES,
    HEADS_TASKS,
)
from evaluation.head_masks import NO_MASK, HeadMask, MaskedRunner
from evaluation.results import (
    JsonlStore,
    check_run_folder,
    format_table,
    write_csv,
    write_json,
)

logger = logging.getLogger(__name__)

EXPERIMENTS = ("force", "evict")
FORCE_CONDITIONS = ("none", "top", "random")
EVICT_VARIANTS = ("snapkv", "protect", "protect-equal")
AVERAGE = "average"
# Bounds of the options (the CLI checks them too).
MAX_TOP_PERCENT = 50.0  # the random draws come from the other heads, so at most half
MAX_DRAWS = 100
MAX_BUDGETS = 32
MAX_NEW_TOKENS = 4096
MAX_LENGTH = 1 << 20


@dataclass
class AblateConfig:
    """Options of one ``fluxserve eval heads-ablate`` run (see `evaluation.cli` for their
    meaning). ``sink``/``window`` default to Flux's served defaults, ``obs_window`` /
    ``pool_kernel`` to the served ``snapkv`` defaults (None: those)."""

    checkpoint: str
    heads: str | None = None
    tasks: list[str] = field(default_factory=lambda: list(ABLATE_TASKS))
    lengths: list[int] = field(default_factory=lambda: list(ABLATE_LENGTHS))
    samples: int = ABLATE_SAMPLES
    seed: int = 42
    experiments: list[str] = field(default_factory=lambda: list(EXPERIMENTS))
    top_percent: float = 5.0
    random_draws: int = ABLATE_DRAWS
    sink: int | None = None
    window: int | None = None
    budgets: list[int] = field(default_factory=lambda: list(ABLATE_BUDGETS))
    protected_budget: int | None = None
    obs_window: int | None = None
    pool_kernel: int | None = None
    api: str = "auto"
    max_new_tokens: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    out: str = "fluxserve-heads-ablate"
    progress: bool = True


# ---------------------------------------------------------------------------------------------
# heads


@dataclass(frozen=True)
class HeadSets:
    """The heads of one run: ``top`` (the best ``count`` by retrieval score) and ``random``
    (one list per draw, ``count`` heads each, drawn from the other heads); heads are
    ``(layer, query head)``. ``protected_kv`` are the KV heads ``(layer, kv head)`` of ``top``."""

    top: list[tuple[int, int]]
    random: list[list[tuple[int, int]]]
    protected_kv: list[tuple[int, int]]
    num_layers: int
    num_heads: int
    num_kv_heads: int

    @property
    def count(self) -> int:
        return len(self.top)

    @property
    def total(self) -> int:
        return self.num_layers * self.num_heads


def head_count(total: int, top_percent: float) -> int:
    """Heads in ``top_percent`` % of `total` heads: rounded, at least 1."""
    return max(1, round(total * top_percent / 100))


def choose_heads(ranked: list[dict], num_layers: int, num_heads: int, num_kv_heads: int,
                 top_percent: float, draws: int, seed: int) -> HeadSets:
    """The top and random head sets from a ranking (``heads.json``'s ``ranked``: dicts with
    ``layer``, ``head``, ``retrieval_score``, best first).

    Raises ValueError when `top_percent` is outside ``(0, 50]`` or the ranking does not cover
    the model's ``num_layers x num_heads`` heads."""
    if not 0 < top_percent <= MAX_TOP_PERCENT:
        raise ValueError(f"top percent must be in (0, {MAX_TOP_PERCENT:g}], got {top_percent}")
    every = {(layer, head) for layer in range(num_layers) for head in range(num_heads)}
    order = [(int(h["layer"]), int(h["head"])) for h in ranked]
    if set(order) != every or len(order) != len(every):
        raise ValueError(f"the head ranking does not match the model: it must list each of its "
                         f"{num_layers} x {num_heads} (layer, head) pairs once")
    n = head_count(len(every), top_percent)
    top = order[:n]
    others = sorted(every - set(top))
    random_sets = [sorted(random.Random(f"{seed}:random-heads:{d}").sample(others, n))
                   for d in range(draws)]
    group = num_heads // num_kv_heads
    protected = sorted({(layer, head // group) for layer, head in top})
    return HeadSets(top=top, random=random_sets, protected_kv=protected, num_layers=num_layers,
                    num_heads=num_heads, num_kv_heads=num_kv_heads)


def sparse_mask(heads: Iterable[tuple[int, int]], sink: int, window: int) -> HeadMask:
    """The `HeadMask` forcing `heads` to sink + window attention."""
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, head in heads:
        by_layer[layer].append(head)
    return HeadMask(sparse=dict(by_layer), sink=sink, window=window)


# ---------------------------------------------------------------------------------------------
# eviction simulation


def equal_total_budget(budget: int, prompt_len: int, num_kv_heads_total: int,
                       num_protected: int, protected_budget: int | None = None) -> int:
    """The budget of each unprotected KV head when the protected ones keep
    ``protected_budget`` tokens (None: the whole prompt) and the total stays
    ``num_kv_heads_total x min(budget, prompt_len)`` tokens (floor; below 1 when the protected
    heads alone exceed the total)."""
    if budget >= prompt_len:
        return prompt_len
    if num_protected >= num_kv_heads_total:
        return 0
    kept = prompt_len if protected_budget is None else min(protected_budget, prompt_len)
    total = num_kv_heads_total * budget
    return (total - num_protected * kept) // (num_kv_heads_total - num_protected)


class SnapKVSelection:
    """SnapKV's kept prompt keys for the prompt in a `MaskedRunner`, with a budget per KV head.

    Uses the served policy's ``select`` (``kv_policies.eviction.policies.snapkv``) on the
    runner's keys and values laid out as one paged block, and the last ``window`` prompt
    queries the runner captured in prefill. Selections are cached per (layer, budget)."""

    def __init__(self, runner: MaskedRunner, prompt_len: int, window: int, pool_kernel: int):
        from kv_policies.eviction.policies.snapkv import SnapKVOptions, SnapKVPolicy

        self._options_cls, self._policy = SnapKVOptions, SnapKVPolicy()
        self.runner, self.prompt_len = runner, prompt_len
        self.window, self.pool_kernel = window, pool_kernel
        self._kept: dict[tuple[int, int], torch.Tensor] = {}
        self._caches: dict[int, torch.Tensor] = {}

    def options(self, budget: int):
        """The validated ``SnapKVOptions`` of one budget (raises pydantic's ValidationError)."""
        return self._options_cls(budget=budget, window=self.window, pool_kernel=self.pool_kernel)

    def refusal(self, budget: int) -> str | None:
        """Why the served snapkv would refuse `budget` with this window and pool kernel, or
        None."""
        from pydantic import ValidationError

        try:
            self.options(budget)
        except ValidationError as exc:
            return exc.errors()[0]["msg"]
        return None

    def _select(self, layer: int, budget: int) -> torch.Tensor:
        """Kept prompt slots ``[Hkv, budget]`` of `layer` (``budget < prompt_len``)."""
        from kv_policies.eviction.base import SelectionInputs

        key = (layer, budget)
        if key not in self._kept:
            n = self.prompt_len
            if layer not in self._caches:
                k = self.runner.keys(layer)[:, :n]
                v = self.runner.values(layer)[:, :n]
                self._caches[layer] = torch.cat([k, v], dim=-1)[None]  # [1, Hkv, n, 2D]
            cache = self._caches[layer]
            inputs = SelectionInputs(
                q_obs=self.runner.captured[layer], kv_cache=cache,
                block_row=torch.zeros(1, dtype=torch.int64, device=cache.device),
                prompt_len=n, scale=self.runner.scales[layer], options=self.options(budget))
            self._kept[key] = self._policy.select(inputs)
        return self._kept[key]

    def kept(self, budgets: list[list[int]]) -> dict[int, torch.Tensor]:
        """Per layer, bool ``[Hkv, prompt_len]``: the prompt keys each KV head keeps when KV
        head ``h`` of layer ``l`` keeps ``budgets[l][h]`` tokens (all of them when the budget
        is at least the prompt length)."""
        n = self.prompt_len
        masks = {}
        for layer, row in enumerate(budgets):
            mask = torch.zeros(len(row), n, dtype=torch.bool)
            for budget in sorted(set(row)):
                heads = [h for h, b in enumerate(row) if b == budget]
                if budget >= n:
                    mask[heads] = True
                else:
                    slots = self._select(layer, budget).cpu()
                    for h in heads:
                        mask[h, slots[h]] = True
            masks[layer] = mask.to(self.runner.device)
        return masks


def variant_budgets(variant: str, budget: int, prompt_len: int, heads: HeadSets,
                    protected_budget: int | None = None) -> tuple[list[list[int]], int]:
    """Per layer and KV head, the budget under `variant` (``snapkv``, ``protect``,
    ``protect-equal``), and the unprotected heads' budget. Protected KV heads keep
    ``protected_budget`` tokens (None: the whole prompt)."""
    protected = set(heads.protected_kv)
    total = heads.num_layers * heads.num_kv_heads
    if variant in ("snapkv", "protect"):
        other = budget
    elif variant == "protect-equal":
        other = equal_total_budget(budget, prompt_len, total, len(protected), protected_budget)
    else:
        raise ValueError(f"unknown eviction variant {variant!r}")
    kept = prompt_len if protected_budget is None else protected_budget
    rows = [[kept if variant != "snapkv" and (layer, h) in protected else other
             for h in range(heads.num_kv_heads)] for layer in range(heads.num_layers)]
    return rows, other


# ---------------------------------------------------------------------------------------------
# the run


def _key(record: dict) -> tuple:
    return (record["task"], record["length"], record["index"], record["condition"],
            record.get("draw"), record.get("budget"))


def _stop_ids(model, tokenizer) -> set[int]:
    """The token ids that end generation, as vLLM takes them: the generation config's
    ``eos_token_id`` (an id or a list) and the tokenizer's EOS."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else list(eos))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _load_heads(cfg: AblateConfig, out: Path, model_layers: int, model_heads: int,
                notes: list[str]) -> dict:
    """The retrieval-head report: `cfg.heads`, else the one an earlier run of this folder
    profiled (``out/heads.json``), else a profile made now with the defaults of
    ``fluxserve eval heads`` (written to ``out/heads.json``)."""
    kept = out / "heads.json"
    if cfg.heads or kept.exists():
        source = str(cfg.heads or kept)
        report = json.loads(Path(source).read_text())
        if not cfg.heads:
            notes.append(f"retrieval heads from the profile of an earlier run ({source})")
    else:
        from evaluation import heads as heads_mod

        tasks_, lengths, samples = HEADS_TASKS, HEADS_LENGTHS, HEADS_SAMPLES
        print(f"no --heads: profiling retrieval heads first ({', '.join(tasks_)} at "
              f"{lengths} tokens, {samples} samples each)", file=sys.stderr)
        result = heads_mod.profile(cfg.checkpoint, tasks_, lengths, samples, cfg.seed,
                                   cfg.device, cfg.dtype, cfg.progress)
        report = heads_mod.report(result, cfg.checkpoint, tasks_, lengths, cfg.seed)
        write_json(kept, report)
        source = str(kept)
        notes.append(f"retrieval heads profiled in this run ({source})")
    if (report.get("num_layers"), report.get("num_heads")) != (model_layers, model_heads):
        raise ValueError(f"the head report {source} is for {report.get('num_layers')} x "
                         f"{report.get('num_heads')} heads, the model has {model_layers} x "
                         f"{model_heads}")
    report["source"] = source
    return report


def check_config(cfg: AblateConfig) -> None:
    """Raise ValueError on an option out of bounds (before anything is loaded)."""
    if not cfg.experiments or any(e not in EXPERIMENTS for e in cfg.experiments):
        raise ValueError(f"experiments must be among {list(EXPERIMENTS)}, got {cfg.experiments}")
    bad = [n for n in cfg.lengths if not tasks.MIN_LENGTH <= n <= MAX_LENGTH]
    if bad or not cfg.lengths:
        raise ValueError(f"lengths must be in [{tasks.MIN_LENGTH}, {MAX_LENGTH}], got "
                         f"{cfg.lengths}")
    if cfg.samples < 1:
        raise ValueError(f"samples must be at least 1, got {cfg.samples}")
    if not 0 < cfg.top_percent <= MAX_TOP_PERCENT:
        raise ValueError(f"top percent must be in (0, {MAX_TOP_PERCENT:g}], got "
                         f"{cfg.top_percent}")
    if not 1 <= cfg.random_draws <= MAX_DRAWS:
        raise ValueError(f"random draws must be in [1, {MAX_DRAWS}], got {cfg.random_draws}")
    if cfg.sink is not None and not 0 <= cfg.sink <= MAX_LENGTH:
        raise ValueError(f"sink must be in [0, {MAX_LENGTH}], got {cfg.sink}")
    if cfg.window is not None and not 1 <= cfg.window <= MAX_LENGTH:
        raise ValueError(f"window must be in [1, {MAX_LENGTH}], got {cfg.window}")
    if cfg.max_new_tokens is not None and not 1 <= cfg.max_new_tokens <= MAX_NEW_TOKENS:
        raise ValueError(f"max new tokens must be in [1, {MAX_NEW_TOKENS}], got "
                         f"{cfg.max_new_tokens}")
    if "evict" in cfg.experiments:
        if not 1 <= len(cfg.budgets) <= MAX_BUDGETS:
            raise ValueError(f"give 1 to {MAX_BUDGETS} budgets, got {len(cfg.budgets)}")
        _snapkv_options(cfg)  # every budget against the window and pool kernel


def _snapkv_options(cfg: AblateConfig) -> list:
    """The served ``SnapKVOptions`` of each budget; raises ValueError naming the first one the
    served policy would refuse."""
    from pydantic import ValidationError

    from kv_policies.eviction.policies.snapkv import SnapKVOptions

    extra = {k: v for k, v in (("window", cfg.obs_window), ("pool_kernel", cfg.pool_kernel))
             if v is not None}
    out = []
    named = [("budget", b) for b in cfg.budgets]
    if cfg.protected_budget is not None:
        named.append(("protected budget", cfg.protected_budget))
    for name, budget in named:
        try:
            out.append(SnapKVOptions(budget=budget, **extra))
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ValueError(f"{name} {budget}: {first['msg']}") from None
    return out


def _resolve_defaults(cfg: AblateConfig) -> None:
    """Fill the options left to the served defaults (Flux's sink/window, snapkv's window and
    pool kernel)."""
    from attention_backends.flux.router import DEFAULT_SINK, DEFAULT_WINDOW
    from kv_policies.eviction.policies.snapkv import SnapKVOptions

    fields = SnapKVOptions.model_fields
    cfg.sink = DEFAULT_SINK if cfg.sink is None else cfg.sink
    cfg.window = DEFAULT_WINDOW if cfg.window is None else cfg.window
    cfg.obs_window = fields["window"].default if cfg.obs_window is None else cfg.obs_window
    cfg.pool_kernel = (fields["pool_kernel"].default if cfg.pool_kernel is None
                       else cfg.pool_kernel)


class Experiment:
    """One loaded checkpoint, its tokenizer and head sets; `run_sample` makes every record of
    one sample."""

    def __init__(self, cfg: AblateConfig, model, tokenizer, prompt_tokenizer, heads: HeadSets):
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.prompt_tokenizer = prompt_tokenizer
        self.heads = heads
        self.runner = MaskedRunner(model)
        self.stop_ids = _stop_ids(model, tokenizer)

    def conditions(self) -> list[tuple[str, int | None, int | None]]:
        """Every ``(condition, draw, budget)`` a sample is run under."""
        cfg = self.cfg
        out: list[tuple[str, int | None, int | None]] = [("none", None, None)]
        if "force" in cfg.experiments:
            out.append(("top", None, None))
            out += [("random", d, None) for d in range(cfg.random_draws)]
        if "evict" in cfg.experiments:
            out += [(v, None, b) for b in sorted(set(cfg.budgets)) for v in EVICT_VARIANTS]
        return out

    def _record(self, sample: tasks.Sample, condition: str, tokens: list[int], prompt_len: int,
                **extra: Any) -> dict:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return {"task": sample.task, "length": sample.length, "index": sample.index,
                "condition": condition, "draw": None, "budget": None, **extra,
                "prediction": text, "references": sample.outputs,
                "score": scoring.score(sample.metric, text, sample.outputs),
                "prompt_tokens": prompt_len, "completion_tokens": len(tokens)}

    def run_sample(self, sample: tasks.Sample, wanted: set[tuple], progress=None
                   ) -> Iterable[dict]:
        """Yield the records of `sample` for the ``(condition, draw, budget)`` in `wanted`."""
        cfg, heads, runner = self.cfg, self.heads, self.runner
        ids = self.prompt_tokenizer.ids(sample.prompt, sample.answer_prefix)
        n = len(ids)
        max_tokens = min(sample.max_tokens, cfg.max_new_tokens or sample.max_tokens)
        evict = [(c, b) for c, _, b in wanted if c in EVICT_VARIANTS]
        if ("none", None, None) in wanted or evict:
            capture = min(cfg.obs_window, n) if evict else 0
            first = runner.prefill(ids, NO_MASK, capture=capture, reserve=max_tokens)
            tokens = runner.greedy(first, max_tokens, self.stop_ids)
            yield self._record(sample, "none", tokens, n, forced_heads=0,
                               kv_tokens=heads.num_layers * heads.num_kv_heads * n)
            if evict:
                selection = SnapKVSelection(runner, n, cfg.obs_window, cfg.pool_kernel)
                for condition, budget in sorted(evict, key=lambda cb: (cb[1], cb[0])):
                    if progress is not None:
                        progress.set_postfix_str(f"{condition}:{budget}", refresh=False)
                    yield self._evict(sample, ids, first, selection, condition, budget,
                                      max_tokens)
        forced = [(c, d) for c, d, _ in wanted if c in ("top", "random")]
        for condition, draw in sorted(forced, key=lambda cd: (cd[0], cd[1] or 0)):
            if progress is not None:
                progress.set_postfix_str(condition + ("" if draw is None else f"#{draw}"),
                                         refresh=False)
            chosen = heads.top if condition == "top" else heads.random[draw]
            mask = sparse_mask(chosen, cfg.sink, cfg.window)
            first = runner.prefill(ids, mask, reserve=max_tokens)
            tokens = runner.greedy(first, max_tokens, self.stop_ids, mask)
            yield self._record(sample, condition, tokens, n, draw=draw,
                               forced_heads=len(chosen),
                               kv_tokens=heads.num_layers * heads.num_kv_heads * n)

    def _evict(self, sample: tasks.Sample, ids: list[int], first: torch.Tensor,
               selection: SnapKVSelection, condition: str, budget: int,
               max_tokens: int) -> dict:
        heads, n = self.heads, len(ids)
        rows, other = variant_budgets(condition, budget, n, heads, self.cfg.protected_budget)
        base = {"budget": budget, "unprotected_budget": min(other, n),
                "protected_kv_heads": 0 if condition == "snapkv" else len(heads.protected_kv)}
        refusal = selection.refusal(other) if 0 < other < n else None
        if other < 1 or refusal:
            reason = (f"the protected heads alone exceed the total of {budget} per KV head"
                      if other < 1 else
                      f"the unprotected heads' budget {other} is refused by snapkv: {refusal}")
            return {"task": sample.task, "length": sample.length, "index": sample.index,
                    "condition": condition, "draw": None, **base, "prediction": None,
                    "references": sample.outputs, "score": None, "skipped": reason,
                    "prompt_tokens": n, "completion_tokens": 0, "kv_tokens": None}
        kept = selection.kept(rows)
        self.runner.truncate(n)
        tokens = self.runner.greedy(first, max_tokens, self.stop_ids,
                                    HeadMask(kept=kept, prompt_len=n))
        kv_tokens = sum(min(b, n) for row in rows for b in row)
        return self._record(sample, condition, tokens, n, **base, kv_tokens=kv_tokens)


def run(cfg: AblateConfig) -> dict:
    """Run the experiments; returns the summary written to ``summary.json``.

    Raises ValueError on an option out of bounds, a head report that does not fit the model or
    an output folder holding a run with other settings."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from evaluation.tokenization import HFTokenizer

    check_config(cfg)
    _resolve_defaults(cfg)
    task_names = tasks.resolve_tasks(cfg.tasks)
    notes: list[str] = []
    out = Path(cfg.out)

    model = AutoModelForCausalLM.from_pretrained(cfg.checkpoint, dtype=getattr(torch, cfg.dtype))
    model.to(cfg.device).eval()
    mcfg = model.config
    num_layers, num_heads = int(mcfg.num_hidden_layers), int(mcfg.num_attention_heads)
    num_kv_heads = int(getattr(mcfg, "num_key_value_heads", None) or num_heads)
    max_len = getattr(mcfg, "max_position_embeddings", None)
    lengths = sorted(set(cfg.lengths))
    if max_len:
        too_long = [n for n in lengths if n > max_len]
        if too_long:
            notes.append(f"skipped lengths {too_long}: longer than the model's "
                         f"max_position_embeddings {max_len}")
        lengths = [n for n in lengths if n <= max_len]
    if not lengths:
        raise ValueError(f"no length fits the model's max_position_embeddings ({max_len})")

    if cfg.api not in ("auto", "chat", "completions"):
        raise ValueError(f"api must be auto, chat or completions, got {cfg.api!r}")
    prompt_tokenizer = HFTokenizer(cfg.checkpoint, chat=cfg.api != "completions", prefill=True)
    if cfg.api == "chat" and not prompt_tokenizer.chat:
        raise ValueError(f"--api chat: the tokenizer of {cfg.checkpoint} has no chat template")
    api = "chat" if prompt_tokenizer.chat else "completions"
    tokenizer = prompt_tokenizer.tokenizer

    report = _load_heads(cfg, out, num_layers, num_heads, notes)
    heads = choose_heads(report["ranked"], num_layers, num_heads, num_kv_heads,
                         cfg.top_percent, cfg.random_draws, cfg.seed)
    fingerprint = {
        "checkpoint": str(Path(cfg.checkpoint).resolve()), "seed": cfg.seed, "api": api,
        "dtype": cfg.dtype, "top_heads": [list(h) for h in heads.top],
        "random_heads": [[list(h) for h in draw] for draw in heads.random],
        "sink": cfg.sink, "window": cfg.window, "obs_window": cfg.obs_window,
        "pool_kernel": cfg.pool_kernel, "max_new_tokens": cfg.max_new_tokens,
        "protected_budget": cfg.protected_budget}
    check_run_folder(out, fingerprint)

    print(f"{cfg.checkpoint}: {num_layers} layers x {num_heads} heads ({num_kv_heads} KV "
          f"heads); {api}; top {heads.count} of {heads.total} heads "
          f"({cfg.top_percent:g} %) on {len(heads.protected_kv)} of "
          f"{num_layers * num_kv_heads} KV heads", file=sys.stderr)
    samples = tasks.generate_samples(
        task_names, lengths, cfg.samples, cfg.seed,
        lambda built: prompt_tokenizer.count(built.prompt, built.answer_prefix), notes,
        progress=cfg.progress)
    experiment = Experiment(cfg, model, tokenizer, prompt_tokenizer, heads)
    conditions = experiment.conditions()

    store = JsonlStore(out / "results.jsonl", _key)
    done = set(store.load())
    todo = []
    for sample in samples:
        wanted = {c for c in conditions
                  if (sample.task, sample.length, sample.index, *c) not in done}
        if wanted:
            todo.append((sample, wanted))
    print(f"{len(samples) - len(todo)} of {len(samples)} samples already done in {out}; "
          f"{len(todo)} to run ({len(conditions)} conditions each)", file=sys.stderr)
    with tqdm(todo, desc="heads-ablate", unit="sample", disable=not cfg.progress,
              dynamic_ncols=True) as bar:
        for sample, wanted in bar:
            for record in experiment.run_sample(sample, wanted, bar):
                store.append(record)

    keys = {(s.task, s.length, s.index, *c) for s in samples for c in conditions}
    records = [r for k, r in store.load().items() if k in keys]
    summary = {name: rows if name in cfg.experiments else []
               for name, rows in summarize(records, heads).items()}
    files = _write_outputs(out, summary, heads, cfg)
    result = {
        "checkpoint": cfg.checkpoint, "api": api, "seed": cfg.seed, "tasks": task_names,
        "lengths": lengths, "samples_per_cell": cfg.samples, "experiments": cfg.experiments,
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("checkpoint", "out",
                                                                        "progress")},
        "heads": {"source": report["source"], "definition": report.get("definition"),
                  "num_layers": num_layers, "num_heads": num_heads,
                  "num_kv_heads": num_kv_heads, "count": heads.count, "total": heads.total,
                  "top": [{"layer": la, "head": h} for la, h in heads.top],
                  "random": [[{"layer": la, "head": h} for la, h in d] for d in heads.random],
                  "protected_kv_heads": [{"layer": la, "kv_head": h}
                                         for la, h in heads.protected_kv]},
        "simulation": ("evict is simulated by masking decode queries to the kept prompt keys "
                       "in transformers; the served paged layout keeps exactly `budget` tokens "
                       "per KV head, so `protect` and `protect-equal` need per-head budgets "
                       "there"),
        **summary, "notes": notes, "files": files}
    write_json(out / "summary.json", result)
    if summary["force"]:
        print(render_force(summary["force"], heads))
    if summary["evict"]:
        print(render_evict(summary["evict"]))
    for note in notes:
        print(f"note: {note}")
    print("wrote " + ", ".join([str(out / "summary.json"), *files.values()]))
    return result


# ---------------------------------------------------------------------------------------------
# summary


def _accuracy(records: list[dict]) -> float | None:
    scored = [r["score"] for r in records if r.get("score") is not None]
    return round(100 * statistics.fmean(scored), 2) if scored else None


def _mean(values: Iterable[float | None], digits: int = 1) -> float | None:
    kept = [v for v in values if v is not None]
    return round(statistics.fmean(kept), digits) if kept else None


def summarize(records: list[dict], heads: HeadSets) -> dict[str, list[dict]]:
    """Accuracy (RULER's percentage) per cell, plus the ``average`` over tasks.

    ``force`` rows: per (task, length, condition) with ``forced_heads`` / ``total_heads``; a
    ``random`` row averages its draws (``accuracy_std`` is the standard deviation of the draws'
    accuracies). ``evict`` rows: per (task, length, condition, budget), ``none`` being full
    attention, with the mean prompt and kept KV tokens (``kv_fraction`` of the full KV) and the
    samples skipped as infeasible."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["task"], r["length"], r["condition"], r.get("budget"))].append(r)
    force, evict = [], []
    total_kv = heads.num_layers * heads.num_kv_heads
    for (task, length, condition, budget), rs in sorted(groups.items(), key=_order):
        if condition in FORCE_CONDITIONS:
            row = {"task": task, "length": length, "condition": condition,
                   "forced_heads": 0 if condition == "none" else heads.count,
                   "total_heads": heads.total, "samples": len({r["index"] for r in rs}),
                   "accuracy": _accuracy(rs), "accuracy_std": None, "draws": None}
            if condition == "random":
                by_draw = defaultdict(list)
                for r in rs:
                    by_draw[r["draw"]].append(r)
                accs = [a for a in (_accuracy(v) for v in by_draw.values()) if a is not None]
                row["draws"] = len(by_draw)
                row["accuracy_std"] = round(statistics.pstdev(accs), 2) if accs else None
            force.append(row)
        if condition == "none" or condition in EVICT_VARIANTS:
            scored = [r for r in rs if r.get("score") is not None]
            prompt = _mean(r["prompt_tokens"] for r in rs)
            kv = _mean(r.get("kv_tokens") for r in scored)
            evict.append({
                "task": task, "length": length, "condition": condition, "budget": budget,
                "samples": len(scored), "skipped": len(rs) - len(scored),
                "accuracy": _accuracy(rs), "mean_prompt_tokens": prompt,
                "protected_kv_heads": 0 if condition in ("none", "snapkv")
                else len(heads.protected_kv),
                "unprotected_budget": _mean(r.get("unprotected_budget") for r in scored),
                "kv_tokens": kv,
                "kv_fraction": _mean((r["kv_tokens"] / (total_kv * r["prompt_tokens"])
                                      for r in scored if r.get("kv_tokens")), 4),
            })
    return {"force": _with_average(force, ("length", "condition")),
            "evict": _with_average(evict, ("length", "condition", "budget"))}


def _order(item):
    (task, length, condition, budget), _ = item
    names = [*FORCE_CONDITIONS, *EVICT_VARIANTS]
    return (task, length, budget or 0, names.index(condition))


def _with_average(rows: list[dict], by: tuple[str, ...]) -> list[dict]:
    """`rows` plus, per `by` key, the ``average`` row: the mean of the tasks' accuracies (None
    when a task has no scored sample in that cell)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in by)].append(row)
    averages = []
    for key, rs in groups.items():
        avg = {k: None for k in rows[0]}
        avg.update(dict(zip(by, key, strict=True)))
        complete = all(r["accuracy"] is not None for r in rs)
        avg.update(task=AVERAGE, samples=sum(r["samples"] for r in rs),
                   accuracy=round(statistics.fmean(r["accuracy"] for r in rs), 2)
                   if complete else None)
        for k in ("forced_heads", "total_heads", "draws", "protected_kv_heads"):
            if k in avg:
                avg[k] = rs[0][k]
        if "kv_fraction" in avg:
            avg["kv_fraction"] = _mean((r["kv_fraction"] for r in rs), 4)
            avg["skipped"] = sum(r["skipped"] for r in rs)
        averages.append(avg)
    return rows + averages


def render_force(rows: list[dict], heads: HeadSets) -> str:
    """The force table: one row per (task, length), accuracy (%) per condition."""
    names = {"none": "none", "top": f"top {heads.count}/{heads.total}",
             "random": f"random {heads.count}/{heads.total}"}
    cells: dict[tuple, dict[str, Any]] = defaultdict(dict)
    for r in rows:
        value = r["accuracy"]
        if r["condition"] == "random" and r["accuracy_std"] is not None and value is not None:
            value = f"{value} ±{r['accuracy_std']}"
        cells[(r["task"], r["length"])][r["condition"]] = value
    body = [[t, n, *(c.get(k) for k in FORCE_CONDITIONS)] for (t, n), c in cells.items()]
    return format_table(["task", "length", *(names[k] for k in FORCE_CONDITIONS)], body)


def render_evict(rows: list[dict]) -> str:
    """The evict table: one row per (task, length, budget), accuracy (%) per variant, with
    full attention (``none``) as the first column."""
    full = {(r["task"], r["length"]): r["accuracy"] for r in rows if r["condition"] == "none"}
    cells: dict[tuple, dict[str, Any]] = defaultdict(dict)
    for r in rows:
        if r["condition"] != "none":
            value = r["accuracy"] if r["samples"] else "n/a"
            cells[(r["task"], r["length"], r["budget"])][r["condition"]] = value
    body = [[t, n, b, full.get((t, n)), *(c.get(v) for v in EVICT_VARIANTS)]
            for (t, n, b), c in cells.items()]
    return format_table(["task", "length", "budget", "full", *EVICT_VARIANTS], body)


def _write_outputs(out: Path, summary: dict, heads: HeadSets, cfg: AblateConfig
                   ) -> dict[str, str]:
    files: dict[str, str] = {}
    if summary["force"]:
        files["force_csv"] = str(write_csv(out / "force.csv", summary["force"]))
        files["force_plot"] = str(_force_plot(out / "force.png", summary["force"], heads, cfg))
    if summary["evict"]:
        files["evict_csv"] = str(write_csv(out / "evict.csv", summary["evict"]))
        plot = _evict_plot(out / "evict.png", summary["evict"], heads, cfg)
        if plot is not None:
            files["evict_plot"] = str(plot)
    return files


def _force_plot(path: Path, rows: list[dict], heads: HeadSets, cfg: AblateConfig) -> Path:
    task_names = sorted({r["task"] for r in rows} - {AVERAGE}) + [AVERAGE]
    labels = {"none": "none", "top": f"top {heads.count} heads",
              "random": f"random {heads.count} heads (mean of {cfg.random_draws})"}
    panels: dict[str, dict[str, list[float | None]]] = {}
    for length in sorted({r["length"] for r in rows}):
        acc = {(r["task"], r["condition"]): r["accuracy"] for r in rows if r["length"] == length}
        panels[f"{length} tokens"] = {labels[c]: [acc.get((t, c)) for t in task_names]
                                      for c in FORCE_CONDITIONS}
    return plotting.grouped_bars(
        path, task_names, panels, xlabel="task", ylabel="accuracy (%)", ylim=(0, 102),
        title=f"Heads forced to sink {cfg.sink} + window {cfg.window} attention "
              f"({heads.count} of {heads.total} heads)")


def _evict_plot(path: Path, rows: list[dict], heads: HeadSets, cfg: AblateConfig
                ) -> Path | None:
    panels: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(
        lambda: defaultdict(list))
    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
    tasks_first = sorted({r["task"] for r in rows} - {AVERAGE}) + [AVERAGE]
    for task in tasks_first:
        for r in rows:
            if r["task"] != task or r["accuracy"] is None:
                continue
            panel = f"{task} @ {r['length']}"
            if r["condition"] == "none":
                panels[panel]["full"] += [(b, r["accuracy"]) for b in budgets]
            else:
                panels[panel][r["condition"]].append((r["budget"], r["accuracy"]))
    if not panels or not budgets:
        return None
    return plotting.small_multiples(
        path, {k: dict(v) for k, v in panels.items()}, log2_x=True, ylim=(-2, 102),
        xlabel="KV budget per head (tokens)", ylabel="accuracy (%)",
        title=f"SnapKV eviction (simulated), with the KV heads of the top {heads.count} "
              "heads protected", columns=min(4, max(1, len(panels))))


def config_from_args(args) -> AblateConfig:
    return AblateConfig(**{k: getattr(args, k) for k in AblateConfig.__dataclass_fields__
                           if hasattr(args, k)})


def ablate_from_args(args) -> dict:
    """``fluxserve eval heads-ablate``: `run` with the parsed arguments."""
    return run(config_from_args(args))
