"""Held-out accuracy by teacher forcing: one forward pass per sample instead of a decode loop.

Greedy decoding reproduces the reference answer exactly when, at every answer position, the
argmax of the logits given the reference's earlier tokens is the reference's next token. So
``exact`` (all answer tokens and the EOS predicted) is exactly the rate at which greedy decoding
returns the reference answer, and the score of the reference prefix before the first wrong token
(RULER's ``string_match_all``) is a lower bound on the RULER score of the greedy output.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable

import torch

from evaluation import scoring
from training.data import TASK_TYPES, Encoded, collate


@torch.no_grad()
def teacher_forced(model, samples: list[Encoded], tokenizer, device: str, max_batch_tokens: int,
                   before_forward: Callable[[dict], None] | None = None,
                   pad_id: int = 0) -> list[dict]:
    """One record per sample: ``task``, ``length``, ``exact`` (0/1), ``score`` (the lower bound,
    in [0, 1]) and ``prompt_tokens``. `before_forward(batch)` runs before each forward pass (the
    router code sets its per-batch state there)."""
    records = []
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].ids))
    i = 0
    while i < len(order):
        longest = len(samples[order[min(len(order) - 1, i)]].ids)
        size = max(1, max_batch_tokens // max(longest, 1))
        idx = order[i:i + size]
        i += len(idx)
        group = [samples[j] for j in idx]
        # a multiple of 64 keeps SDPA's fused kernels eligible for masked attention
        pad_to = -(-max(len(s.ids) for s in group) // 64) * 64
        batch = collate(group, pad_to, pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        if before_forward is not None:
            before_forward(batch)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16,
                            enabled=device.startswith("cuda")):
            logits = model(input_ids=batch["input_ids"], use_cache=False).logits
        pred = logits.argmax(-1)
        for row, s in enumerate(group):
            lo, hi = s.prompt_len - 1, len(s.ids) - 1
            gold = batch["labels"][row, lo:hi]
            ok = (pred[row, lo:hi] == gold).tolist()
            first_wrong = ok.index(False) if False in ok else len(ok)
            text = tokenizer.decode(gold[:first_wrong].tolist(), skip_special_tokens=True)
            records.append({"task": s.task, "length": s.length, "exact": float(all(ok)),
                            "score": scoring.string_match_all(text, s.outputs),
                            "prompt_tokens": s.prompt_len})
    return records


def summarize(records: list[dict], key: str = "score") -> dict:
    """``{"by_task": {task: {length: pct}}, "by_type": {type: pct}, "average": {length: pct}}``
    with percentages (mean × 100, two decimals)."""
    by_tl: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    by_type: dict[str, list[float]] = defaultdict(list)
    for r in records:
        by_tl[r["task"]][r["length"]].append(r[key])
        by_type[TASK_TYPES[r["task"]]].append(r[key])
    pct = lambda xs: round(100 * statistics.fmean(xs), 2)  # noqa: E731
    by_task = {t: {n: pct(v) for n, v in sorted(d.items())} for t, d in by_tl.items()}
    lengths = sorted({n for d in by_task.values() for n in d})
    average = {n: round(statistics.fmean(d[n] for d in by_task.values() if n in d), 2)
               for n in lengths}
    return {"by_task": by_task, "by_type": {k: pct(v) for k, v in by_type.items()},
            "average": average}


def format_table(summary: dict, title: str) -> str:
    """A plain-text table: one row per task, one column per length (keys may be strings, as
    read back from JSON)."""
    summary = {"by_task": {t: {int(n): v for n, v in row.items()}
                           for t, row in summary["by_task"].items()},
               "average": {int(n): v for n, v in summary["average"].items()}}
    lengths = sorted(summary["average"])
    lines = [title, f"{'task':18s}" + "".join(f"{n:>8d}" for n in lengths)]
    for task, row in summary["by_task"].items():
        lines.append(f"{task:18s}" + "".join(
            f"{row[n]:8.1f}" if n in row else f"{'-':>8s}" for n in lengths))
    lines.append(f"{'average':18s}" + "".join(f"{summary['average'][n]:8.1f}" for n in lengths))
    return "\n".join(lines)
