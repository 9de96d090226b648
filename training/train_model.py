"""Train the quality model from scratch on the evaluation task families.

    python -m training.train_model --preset gpu --out ckpt/model --max-minutes 6

Each step is one padded batch of about ``--tokens-per-batch`` tokens at one length bucket (a
DataLoader worker per CPU core generates them). The loss is the cross-entropy on the answer
tokens (and EOS) plus ``--context-weight`` times the cross-entropy on the prompt tokens (which
teaches the repeated noise and lists, and with them the copying heads retrieval needs).
Lengths follow a curriculum on wall-clock progress: short buckets first, then the mix of the
preset (most tokens at 2K-8K for ``gpu``). The learning rate warms up, then follows a cosine to
10 % over the same progress, so a run cut by ``--max-minutes`` still ends annealed. The
checkpoint is saved, then evaluated on held-out samples of the evaluation's own generator
(``--eval-seed``, ``fluxserve eval``'s default 42) by teacher forcing (training.heldout).
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import json
import math
import multiprocessing as mp
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from evaluation import tasks
from training import heldout
from training.data import LengthMix, TaskBatches, heldout_samples
from training.model import PRESETS, build_model, config_dict, num_parameters, save_checkpoint
from training.tokenizer import tokenizer_json_path

# Per preset: the length curriculum [(progress_from, LengthMix)], tasks and their weights,
# and run defaults.
RECIPES: dict[str, dict] = {
    "gpu": {
        "mixes": [
            # copy-heavy warm-up on short samples: the copying (induction) heads every task
            # needs form here; without it the run plateaued at format-only answers
            (0.0, LengthMix((256, 512, 1024), (0.3, 0.4, 0.3), 65536, induction_fraction=0.5)),
            (0.25, LengthMix((1024, 2048, 4096), (0.3, 0.4, 0.3), 65536)),
            (0.45, LengthMix((1024, 2048, 4096, 8192, 16384), (0.1, 0.2, 0.3, 0.3, 0.1), 65536)),
        ],
        "tasks": {name: 1.0 for name in tasks.TASKS},
        "lr": 1.5e-3, "warmup": 100, "eval_lengths": [4096, 8192, 16384], "eval_samples": 8,
        "workers": 12, "eval_batch_tokens": 131072, "context_sample": 1.0,
        "induction_fraction": 0.15,
    },
    "tiny": {
        "mixes": [(0.0, LengthMix((256, 512), (0.5, 0.5), 8192, induction_fraction=0.5)),
                  (0.5, LengthMix((256, 512, 1024), (0.3, 0.4, 0.3), 4096))],
        "tasks": {"niah_single_1": 1.0, "niah_single_2": 1.0, "local_copy": 1.0,
                  "local_pattern": 1.0},
        "lr": 3e-3, "warmup": 50, "eval_lengths": [512, 1024], "eval_samples": 8,
        "workers": 1, "eval_batch_tokens": 8192, "context_sample": 0.125,
        "induction_fraction": 0.2,
    },
}


def log(record: dict, fh) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if fh is not None:
        fh.write(line + "\n")
        fh.flush()


def lr_at(step: int, progress: float, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def loss_fn(model, batch: dict, context_weight: float, context_sample: float = 1.0
            ) -> tuple[torch.Tensor, dict]:
    """Answer CE + context_weight × prompt CE (token means), and the answer token accuracy.

    Logits are computed only where a loss is taken: every answer position and a random
    `context_sample` fraction of the prompt positions (an unbiased estimate of the prompt mean
    at a fraction of the vocabulary projection's cost, which dominates for tiny models)."""
    hidden = model.model(input_ids=batch["input_ids"], use_cache=False).last_hidden_state
    labels = batch["labels"]
    answer = batch["answer_mask"]
    context = (labels != -100) & ~answer
    if context_sample < 1.0:
        context &= torch.rand(context.shape, device=context.device) < context_sample
    if context_weight == 0:
        context = torch.zeros_like(context)
    sel = answer | context
    logits = model.lm_head(hidden[sel]).float()
    ce = F.cross_entropy(logits, labels[sel], reduction="none")
    is_answer = answer[sel]
    # per-sample mean over its answer tokens, then the mean over samples: a 50-token answer
    # (or an induction sample's long copy) weighs as much as a 10-token one
    row = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[sel]
    n_rows = labels.shape[0]
    sums = torch.zeros(n_rows, device=ce.device).index_add_(0, row[is_answer], ce[is_answer])
    counts = answer.sum(1).clamp(min=1)
    loss_answer = (sums / counts).sum() / answer.any(1).sum().clamp(min=1)
    loss_context = ce[~is_answer].mean() if (~is_answer).any() else ce.new_zeros(())
    with torch.no_grad():
        acc = (logits[is_answer].argmax(-1) == labels[sel][is_answer]).float().mean()
    return loss_answer + context_weight * loss_context, {
        "loss_answer": loss_answer.item(), "loss_context": loss_context.item(),
        "answer_token_acc": acc.item()}


def _gen_heldout(args: tuple) -> list:
    return heldout_samples(*args)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--max-minutes", type=float, default=6.0,
                        help="wall-clock budget of the training loop (then it saves)")
    parser.add_argument("--max-steps", type=int, default=1_000_000)
    parser.add_argument("--tokens-per-batch", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--context-weight", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--tasks", nargs="*", default=None,
                        help="train (and evaluate) on these tasks only, equally weighted "
                             "(sanity runs; default: the preset's)")
    parser.add_argument("--eval-lengths", type=int, nargs="*", default=None)
    parser.add_argument("--eval-samples", type=int, default=None)
    parser.add_argument("--eval-seed", type=int, default=42)
    parser.add_argument("--eval-every-minutes", type=float, default=1.5)
    parser.add_argument("--metrics", default=None, help="JSON lines log (default OUT.log.jsonl)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is fastest on a busy shared CPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    recipe = RECIPES[args.preset]
    peak_lr = args.lr or recipe["lr"]
    workers = recipe["workers"] if args.workers is None else args.workers
    eval_lengths = args.eval_lengths or recipe["eval_lengths"]
    eval_samples = args.eval_samples or recipe["eval_samples"]
    mixes = recipe["mixes"]
    if args.tokens_per_batch:
        mixes = [(p, dataclasses.replace(m, tokens_per_batch=args.tokens_per_batch))
                 for p, m in mixes]
    task_weights = ({name: 1.0 for name in tasks.resolve_tasks(args.tasks)} if args.tasks
                    else recipe["tasks"])
    out = Path(args.out)
    metrics_path = Path(args.metrics) if args.metrics else out.with_suffix(".log.jsonl")
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    fh = metrics_path.open("w")
    t_start = time.monotonic()
    budget_s = args.max_minutes * 60

    random.seed(args.seed)
    tok_path = str(tokenizer_json_path())
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(tok_path)
    bos, eos = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|end_of_text|>")

    # held-out samples are fitted in other processes while the model trains
    ctx = mp.get_context("fork")
    pool = futures.ProcessPoolExecutor(max_workers=max(1, min(3, (os.cpu_count() or 2) // 4)),
                                       mp_context=ctx)
    pending = {(t, n): pool.submit(_gen_heldout, (tok_path, [t], [n], eval_samples,
                                                  args.eval_seed))
               for n in eval_lengths for t in task_weights}

    cfg = config_dict(args.preset, tok.get_vocab_size(), bos, eos)
    model = build_model(cfg, args.seed).to(args.device)
    model.train()
    n_params = num_parameters(model)
    device_type = args.device.split(":")[0]
    use_amp = device_type == "cuda"
    if use_amp:
        torch.backends.cuda.matmul.allow_tf32 = True
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=use_amp)
    progress = ctx.Value("d", 0.0)
    data = TaskBatches(tok_path, args.seed, mixes, task_weights, progress,
                       induction_fraction=recipe["induction_fraction"])
    loader = torch.utils.data.DataLoader(
        data, batch_size=None, num_workers=workers, pin_memory=use_amp,
        prefetch_factor=4 if workers else None, persistent_workers=workers > 0,
        multiprocessing_context=ctx if workers else None)
    log({"event": "start", "preset": args.preset, "parameters": n_params, "device": args.device,
         "seed": args.seed, "budget_minutes": args.max_minutes, "workers": workers,
         "config": cfg}, fh)

    def evaluate(lengths: list[int], final: bool) -> dict | None:
        samples = []
        for (_, n), fut in pending.items():
            if n in lengths and (final or fut.done()):
                samples += fut.result()
        if not samples:
            return None
        model.eval()
        records = heldout.teacher_forced(model, samples, tok, args.device,
                                         recipe["eval_batch_tokens"], pad_id=eos)
        model.train()
        return {"score": heldout.summarize(records, "score"),
                "exact": heldout.summarize(records, "exact"), "samples": len(records)}

    step, tokens_seen = 0, 0
    t_loop = time.monotonic()
    next_eval = args.eval_every_minutes * 60
    window: list[dict] = []
    for batch in loader:
        elapsed = time.monotonic() - t_start
        frac = max(elapsed / budget_s, step / args.max_steps)
        if frac >= 1.0:
            break
        progress.value = frac
        lr = lr_at(step, frac, peak_lr, recipe["warmup"])
        for group in opt.param_groups:
            group["lr"] = lr
        batch = {k: v.to(args.device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=use_amp):
            loss, stats = loss_fn(model, batch, args.context_weight, recipe["context_sample"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        step += 1
        tokens_seen += batch["input_ids"].numel()
        window.append(stats)
        if step in (1, 10, 25, 50) or step % 50 == 0:
            now = time.monotonic()
            mean = {k: round(sum(w[k] for w in window) / len(window), 4) for k in window[0]}
            window = []
            log({"event": "train", "step": step, "elapsed_s": round(now - t_start, 1),
                 "steps_per_s": round(step / (now - t_loop), 3),
                 "tokens_per_s": round(tokens_seen / (now - t_loop)), "lr": round(lr, 6),
                 "grad_norm": round(gnorm, 3), "seq_len": batch["input_ids"].shape[1],
                 "batch": batch["input_ids"].shape[0], **mean}, fh)
        if elapsed >= next_eval:
            next_eval += args.eval_every_minutes * 60
            res = evaluate(eval_lengths[:1], final=False)
            if res is not None:
                log({"event": "eval", "step": step, "elapsed_s": round(elapsed, 1),
                     "score_by_task": {t: v for t, v in res["score"]["by_task"].items()},
                     "average": res["score"]["average"]}, fh)

    train_s = time.monotonic() - t_start
    info = {"preset": args.preset, "seed": args.seed, "parameters": n_params, "steps": step,
            "tokens": tokens_seen, "train_seconds": round(train_s, 1),
            "tasks": list(task_weights), "context_weight": args.context_weight,
            "peak_lr": peak_lr, "argv": sys.argv[1:] if argv is None else argv}
    save_checkpoint(model, cfg, out, info)
    log({"event": "saved", "path": str(out), **info}, fh)
    res = evaluate(eval_lengths, final=True)
    pool.shutdown()
    info["heldout"] = res
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    log({"event": "heldout", "eval_seed": args.eval_seed, **res}, fh)
    print(heldout.format_table(res["score"], "held-out score (teacher-forced lower bound, %)"))
    fh.close()
    return info


if __name__ == "__main__":
    main()
