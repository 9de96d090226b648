"""Held-out accuracy by teacher forcing: one forward pass per sample instead of a decode loop.

Greedy decoding reproduces the reference answer exactly when, at every answer position, the
argmax of the logits given the reference's earlier tokens is the reference's next token. So
``exact`` (all answer tokens and the EOS predicted) is exactly the rate at which greedy decoding
returns the reference answer, and the score of the reference prefix before the first wrong token
(RULER's ``string_match_all``) is a lower bound on the RULER score of the greedy output.

`copy_probe` measures the copying skill alone, on fresh copies of uniform random tokens:

    python -m training.heldout CKPT_DIR --lengths 64 256 1024
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from evaluation import scoring
from training.data import TASK_TYPES, Encoded, collate, induction_sample


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


@torch.no_grad()
def copy_probe(model, tokenizer, lengths: list[int], samples: int, device: str,
               max_batch_tokens: int, seed: int = 42) -> dict[int, dict]:
    """Copying on held-out samples of the auxiliary task (a sequence of uniform random token
    ids, then the same again; training.data.induction_sample), `samples` of each length (tokens,
    BOS to EOS). Per length: ``loss``, the mean over samples of the mean answer-token cross-
    entropy (nats; a model that does not copy scores about ln(vocab)), and ``acc``, the share
    of answer tokens (the copy and EOS) that are the argmax given the reference before them.
    The first copy token cannot be predicted (nothing marks where the first half ends), so
    ``acc`` tops out at about 1 - 1/(length/2) and ``loss`` at about ln(vocab)/(length/2)."""
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    eos = tokenizer.token_to_id("<|end_of_text|>")
    was_training = model.training
    model.eval()
    out = {}
    for length in lengths:
        rng = random.Random(f"copy-probe:{seed}:{length}")
        encs = [induction_sample(rng, tokenizer, length, bos, eos, random_token_share=1.0)
                for _ in range(samples)]
        pad_to = -(-length // 64) * 64
        size = max(1, max_batch_tokens // pad_to)
        losses, correct, total = [], 0, 0
        for i in range(0, len(encs), size):
            batch = {k: v.to(device) for k, v in collate(encs[i:i + size], pad_to, eos).items()}
            with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16,
                                enabled=device.startswith("cuda")):
                logits = model(input_ids=batch["input_ids"], use_cache=False).logits
            for row in range(logits.shape[0]):
                mask = batch["answer_mask"][row]
                lg, gold = logits[row][mask].float(), batch["labels"][row][mask]
                losses.append(F.cross_entropy(lg, gold).item())
                correct += int((lg.argmax(-1) == gold).sum())
                total += int(mask.sum())
        out[length] = {"loss": round(statistics.fmean(losses), 4),
                       "acc": round(correct / max(1, total), 4), "samples": samples}
    model.train(was_training)
    return out


def main(argv: list[str] | None = None) -> dict:
    from tokenizers import Tokenizer

    from training.model import load_checkpoint

    parser = argparse.ArgumentParser(description="copying on random-token copies (copy_probe)")
    parser.add_argument("model", help="a checkpoint folder")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    model = load_checkpoint(Path(args.model), args.device)
    tok = Tokenizer.from_file(str(Path(args.model) / "tokenizer.json"))
    res = copy_probe(model, tok, args.lengths, args.samples, args.device, args.batch_tokens,
                     args.seed)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
