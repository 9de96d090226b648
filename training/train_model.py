"""Train the quality model from scratch on the evaluation task families.

    python -m training.train_model --preset gpu --out ckpt/model --max-minutes 4

Each step is one padded batch of about a stage's ``tokens_per_batch`` tokens at one length
bucket (a DataLoader worker per CPU core generates them). The loss is the cross-entropy on the
answer tokens (and EOS) plus ``--context-weight`` times the cross-entropy on the prompt tokens.

The recipe is a curriculum of stages (training.curriculum): first pure copying of uniform random
token sequences (a random sequence, then the same again; the copy is the answer), 64 tokens,
then 128-256, each stage left once the copy loss is low (or at its step cap); then the task
samples at short lengths, then the preset's long mix, both with a share of copying samples so
the skill is kept. Copying from context is what every retrieval task needs, and on random
tokens looking back is the only way to predict the copy, so the copying (induction) heads form
within a few hundred steps there, instead of not at all in the task mix (see docs/quality.md).
The learning rate warms up, stays at its peak, then decays to 10 % over the last 40 % of the
wall-clock budget, so a run cut by ``--max-minutes`` still ends annealed.

Logged per ``train`` record (JSON lines, and the same columns in a CSV beside them): the copy
loss and the task answer loss separately (each the mean over samples of the sample's mean
answer-token cross-entropy, nats) and the answer-token accuracy of each. The checkpoint is
saved, then evaluated on held-out samples of the evaluation's own generator (``--eval-seed``,
``fluxserve eval``'s default 42) by teacher forcing (training.heldout).
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import csv
import dataclasses
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from evaluation import tasks
from training import heldout
from training.curriculum import Curriculum, Stage, lr_at
from training.data import (
    AUX_TASK_INDEX,
    INDUCTION,
    INDUCTION_RANDOM,
    LengthMix,
    TaskBatches,
    heldout_samples,
)
from training.model import PRESETS, build_model, config_dict, num_parameters, save_checkpoint
from training.tokenizer import tokenizer_json_path


def _copy_mix(buckets: tuple[int, ...], weights: tuple[float, ...], tokens: int) -> LengthMix:
    """Copying samples only, all of uniform random tokens."""
    return LengthMix(buckets, weights, tokens, induction_fraction=1.0, random_token_share=1.0)


# Per preset: the curriculum, the tasks and their weights, and run defaults.
# Peak learning rates: 3e-3 formed copying within ~150 steps with the tiny shape (hidden 128) on
# 64-token random copies. The gpu preset is 4x wider; Adam's per-weight step does not shrink with
# width, so each matrix's effect on its output grows with fan-in and the usual stable peak falls
# with width (Kaplan et al.'s fit gives ~1e-3 for 21 M non-embedding parameters, for long runs).
# 2e-3 sits between: high enough that the copying phase change comes within a few hundred steps
# (the onset scales with the learning rate), and run 2 at 1.5e-3 trained without a loss spike
# (gradient norms below 2.2 after clipping at 1).
RECIPES: dict[str, dict] = {
    "gpu": {
        "stages": [
            Stage("copy-64", _copy_mix((64,), (1.0,), 32768),
                  copy_loss_below=1.0, min_steps=50, max_steps=1500, until_progress=0.3),
            # 64 kept in the mix: on the H200, copying formed at 64 within ~200 steps but a
            # switch to 128-256 only lost it (0.9 -> 7.7 nats); mixed lengths from the start
            # delayed its onset past 360 steps
            Stage("copy-256", _copy_mix((64, 128, 256), (0.3, 0.3, 0.4), 32768),
                  copy_loss_below=0.5, min_steps=30, max_steps=600, until_progress=0.4),
            Stage("tasks-1k", LengthMix((256, 512, 1024), (0.3, 0.4, 0.3), 65536,
                                        induction_fraction=0.3), until_progress=0.45),
            Stage("tasks-4k", LengthMix((1024, 2048, 4096), (0.3, 0.4, 0.3), 65536,
                                        induction_fraction=0.2), until_progress=0.6),
            Stage("long", LengthMix((1024, 2048, 4096, 8192, 16384), (0.1, 0.2, 0.3, 0.3, 0.1),
                                    65536, induction_fraction=0.15)),
        ],
        "tasks": {name: 1.0 for name in tasks.TASKS},
        "lr": 2e-3, "warmup": 100, "eval_lengths": [4096, 8192, 16384], "eval_samples": 8,
        "probe_lengths": [64, 256, 4096, 16384],
        "workers": 12, "eval_batch_tokens": 131072, "context_sample": 1.0,
    },
    "tiny": {
        "stages": [
            Stage("copy-64", _copy_mix((64,), (1.0,), 4096),
                  copy_loss_below=1.0, min_steps=30, max_steps=1500, until_progress=0.4),
            Stage("copy-256", _copy_mix((64, 128, 256), (0.3, 0.3, 0.4), 4096),
                  copy_loss_below=0.5, min_steps=20, max_steps=500, until_progress=0.5),
            Stage("tasks-512", LengthMix((256, 512), (0.5, 0.5), 8192, induction_fraction=0.3),
                  until_progress=0.7),
            Stage("tasks-1k", LengthMix((256, 512, 1024), (0.3, 0.4, 0.3), 4096,
                                        induction_fraction=0.2)),
        ],
        "tasks": {"niah_single_1": 1.0, "niah_single_2": 1.0, "local_copy": 1.0,
                  "local_pattern": 1.0},
        "lr": 3e-3, "warmup": 30, "eval_lengths": [512, 1024], "eval_samples": 8,
        "probe_lengths": [64, 256, 1024],
        "workers": 1, "eval_batch_tokens": 8192, "context_sample": 0.125,
    },
}

# The sample groups logged apart, by ``task_index``: copies of uniform random tokens (the gate's
# "copy loss"), copies of word texts, and the evaluation's tasks.
GROUPS = ("copy", "copy_words", "task")
# The sums and counts `loss_fn` returns per step; `window_means` turns a list of them into means.
STAT_SUMS = tuple(f"{g}_{k}" for g in GROUPS for k in ("loss_sum", "samples", "correct",
                                                         "tokens"))
# The columns of the CSV curves (the `train` records' keys).
CSV_FIELDS = ("step", "stage", "elapsed_s", "lr", "grad_norm", "seq_len", "batch",
              "steps_per_s", "tokens_per_s", "loss_answer", "loss_context", "answer_token_acc",
              *(f"{m}_{g}" for g in GROUPS for m in ("loss", "acc")), "copy_share")


def log(record: dict, fh) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if fh is not None:
        fh.write(line + "\n")
        fh.flush()


def loss_fn(model, batch: dict, context_weight: float, context_sample: float = 1.0
            ) -> tuple[torch.Tensor, dict]:
    """Answer CE + context_weight × prompt CE (token means), and the statistics to log.

    The answer CE is the mean over samples of each sample's mean over its answer tokens (and
    EOS). Logits are computed only where a loss is taken: every answer position and a random
    `context_sample` fraction of the prompt positions (an unbiased estimate of the prompt mean
    at a fraction of the vocabulary projection's cost, which dominates for tiny models).

    The statistics (Python floats, one device sync) are ``loss_answer`` and ``loss_context``
    (nats), ``answer_token_acc`` (all answer tokens), and for each of `GROUPS` (``copy``: the
    copying samples of random tokens, ``task_index`` -2; ``copy_words``: those of word texts,
    -1; ``task``: the task samples) the sum of its samples' answer CE, its number of samples,
    and its correct and total answer tokens (greedy argmax equals the label), named as in
    `STAT_SUMS`."""
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
    counts = answer.sum(1)
    has_answer = counts > 0
    per_sample = sums / counts.clamp(min=1)
    loss_answer = per_sample.sum() / has_answer.sum().clamp(min=1)
    loss_context = ce[~is_answer].mean() if (~is_answer).any() else ce.new_zeros(())
    with torch.no_grad():
        correct = (logits[is_answer].argmax(-1) == labels[sel][is_answer]).float()
        index = batch["task_index"]
        groups = []
        for member in (index == AUX_TASK_INDEX[INDUCTION_RANDOM],
                       index == AUX_TASK_INDEX[INDUCTION], index >= 0):
            token_member = member[row[is_answer]]
            member = member & has_answer
            groups += [per_sample[member].sum(), member.sum(), correct[token_member].sum(),
                       token_member.sum()]
        values = torch.stack([loss_answer.detach(), loss_context.detach(),
                              *[g.float() for g in groups]]).tolist()
    stats = {"loss_answer": values[0], "loss_context": values[1],
             **dict(zip(STAT_SUMS, values[2:], strict=True))}
    stats["answer_token_acc"] = (sum(stats[f"{g}_correct"] for g in GROUPS)
                                 / max(1, sum(stats[f"{g}_tokens"] for g in GROUPS)))
    return loss_answer + context_weight * loss_context, stats


def copy_loss(stats: dict) -> float | None:
    """The step's copy loss: the mean answer CE over its copying samples of random tokens
    (nats), None if it had none."""
    return stats["copy_loss_sum"] / stats["copy_samples"] if stats["copy_samples"] else None


def window_means(window: list[dict]) -> dict:
    """Means over a window of `loss_fn` statistics: ``loss_answer``, ``loss_context`` (means
    of the steps'), ``answer_token_acc`` (over all answer tokens), and per group of `GROUPS`
    ``loss_<group>`` (over its samples) and ``acc_<group>`` (over its answer tokens), None
    where the window had none; ``copy_share``: the share of copying samples (both kinds)."""
    total = {k: sum(w[k] for w in window) for k in STAT_SUMS}
    ratio = lambda a, b: round(a / b, 4) if b else None  # noqa: E731
    out = {"loss_answer": round(sum(w["loss_answer"] for w in window) / len(window), 4),
           "loss_context": round(sum(w["loss_context"] for w in window) / len(window), 4),
           "answer_token_acc": ratio(sum(total[f"{g}_correct"] for g in GROUPS),
                                     sum(total[f"{g}_tokens"] for g in GROUPS))}
    for g in GROUPS:
        out[f"loss_{g}"] = ratio(total[f"{g}_loss_sum"], total[f"{g}_samples"])
        out[f"acc_{g}"] = ratio(total[f"{g}_correct"], total[f"{g}_tokens"])
    out["copy_share"] = ratio(total["copy_samples"] + total["copy_words_samples"],
                              sum(total[f"{g}_samples"] for g in GROUPS))
    return out


def _gen_heldout(args: tuple) -> list:
    return heldout_samples(*args)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--max-minutes", type=float, default=4.0,
                        help="wall-clock budget of the training loop (then it saves)")
    parser.add_argument("--max-steps", type=int, default=1_000_000)
    parser.add_argument("--tokens-per-batch", type=int, default=None,
                        help="tokens per batch in every stage (default: each stage's)")
    parser.add_argument("--lr", type=float, default=None, help="peak (default: the preset's)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="warm-up steps (default: the preset's)")
    parser.add_argument("--context-weight", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--tasks", nargs="*", default=None,
                        help="train (and evaluate) on these tasks only, equally weighted "
                             "(sanity runs; default: the preset's)")
    parser.add_argument("--eval-lengths", type=int, nargs="*", default=None)
    parser.add_argument("--eval-samples", type=int, default=None,
                        help="held-out samples per task and length (0: no held-out evaluation)")
    parser.add_argument("--eval-seed", type=int, default=42)
    parser.add_argument("--probe-samples", type=int, default=8,
                        help="held-out random-token copies per probe length (0: no probe)")
    parser.add_argument("--log-every", type=int, default=50, help="steps per train record")
    parser.add_argument("--eval-every-minutes", type=float, default=1.5)
    parser.add_argument("--metrics", default=None,
                        help="JSON lines log (default OUT.log.jsonl); the train records also go "
                             "to the same path with the suffix .csv")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu",
                        help="default cuda:0, the first GPU CUDA_VISIBLE_DEVICES lets it see")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is fastest on a busy shared CPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    recipe = RECIPES[args.preset]
    peak_lr = args.lr or recipe["lr"]
    warmup = recipe["warmup"] if args.warmup is None else args.warmup
    workers = recipe["workers"] if args.workers is None else args.workers
    eval_lengths = args.eval_lengths or recipe["eval_lengths"]
    eval_samples = recipe["eval_samples"] if args.eval_samples is None else args.eval_samples
    stages: list[Stage] = recipe["stages"]
    if args.tokens_per_batch:
        stages = [dataclasses.replace(st, mix=dataclasses.replace(
            st.mix, tokens_per_batch=args.tokens_per_batch)) for st in stages]
    curriculum = Curriculum(stages)
    task_weights = ({name: 1.0 for name in tasks.resolve_tasks(args.tasks)} if args.tasks
                    else recipe["tasks"])
    out = Path(args.out)
    metrics_path = Path(args.metrics) if args.metrics else out.with_suffix(".log.jsonl")
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    fh = metrics_path.open("w")
    csv_fh = metrics_path.with_suffix(".csv").open("w", newline="")
    csv_out = csv.DictWriter(csv_fh, CSV_FIELDS, extrasaction="ignore")
    csv_out.writeheader()
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
                                       mp_context=ctx) if eval_samples else None
    pending = {(t, n): pool.submit(_gen_heldout, (tok_path, [t], [n], eval_samples,
                                                  args.eval_seed))
               for n in eval_lengths for t in task_weights} if pool else {}

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
    stage_value = ctx.Value("i", 0)
    data = TaskBatches(tok_path, args.seed, [st.mix for st in stages], task_weights, stage_value)
    loader = torch.utils.data.DataLoader(
        data, batch_size=None, num_workers=workers, pin_memory=use_amp,
        prefetch_factor=2 if workers else None, persistent_workers=workers > 0,
        multiprocessing_context=ctx if workers else None)
    log({"event": "start", "preset": args.preset, "parameters": n_params, "device": args.device,
         "device_name": torch.cuda.get_device_name(args.device) if use_amp else "cpu",
         "seed": args.seed, "budget_minutes": args.max_minutes, "workers": workers,
         "peak_lr": peak_lr, "warmup": warmup, "stages": [st.name for st in stages],
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

    def log_train(stats_window: list[dict], lr: float, gnorm: float, batch: dict,
                  stage: int) -> dict:
        """One ``train`` record (also a CSV row) over the steps since the last; `stage` is the
        stage the last batch was drawn for."""
        now = time.monotonic()
        record = {"event": "train", "step": step, "stage": stages[stage].name,
                  "elapsed_s": round(now - t_start, 1),
                  "steps_per_s": round(step / (now - t_loop), 3),
                  "tokens_per_s": round(tokens_seen / (now - t_loop)), "lr": round(lr, 6),
                  "grad_norm": round(gnorm, 3), "seq_len": batch["input_ids"].shape[1],
                  "batch": batch["input_ids"].shape[0], **window_means(stats_window)}
        log(record, fh)
        csv_out.writerow(record)
        csv_fh.flush()
        return record

    step, tokens_seen = 0, 0
    t_loop = time.monotonic()
    next_eval = args.eval_every_minutes * 60
    window: list[dict] = []
    last: dict = {}
    skipped = 0
    for batch in loader:
        elapsed = time.monotonic() - t_start
        frac = max(elapsed / budget_s, step / args.max_steps)
        if frac >= 1.0:
            break
        lr = lr_at(step, frac, peak_lr, warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        batch_stage = int(batch.pop("stage"))
        batch = {k: v.to(args.device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=use_amp):
            loss, stats = loss_fn(model, batch, args.context_weight, recipe["context_sample"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        if not math.isfinite(gnorm):  # skip the update rather than write NaN into the weights
            skipped += 1
            log({"event": "skipped_step", "step": step, "grad_norm": str(gnorm)}, fh)
            if skipped > 20:
                raise FloatingPointError(f"{skipped} non-finite gradients; lower --lr")
            continue
        opt.step()
        step += 1
        tokens_seen += batch["input_ids"].numel()
        window.append(stats)
        switches = curriculum.observe(batch_stage, copy_loss(stats), frac, step)
        if switches or step in (1, 10, 25, 50) or step % args.log_every == 0:
            last = log_train(window, lr, gnorm, batch, batch_stage)
            window = []
        for sw in switches:
            log({"event": "stage", "elapsed_s": round(elapsed, 1), **sw.to_json()}, fh)
        if switches:
            stage_value.value = curriculum.index
        if elapsed >= next_eval:
            next_eval += args.eval_every_minutes * 60
            res = evaluate(eval_lengths[:1], final=False)
            if res is not None:
                log({"event": "eval", "step": step, "elapsed_s": round(elapsed, 1),
                     "score_by_task": {t: v for t, v in res["score"]["by_task"].items()},
                     "average": res["score"]["average"]}, fh)
    if window:
        last = log_train(window, lr, gnorm, batch, batch_stage)
    csv_fh.close()

    train_s = time.monotonic() - t_start
    info = {"preset": args.preset, "seed": args.seed, "parameters": n_params, "steps": step,
            "tokens": tokens_seen, "train_seconds": round(train_s, 1),
            "tasks": list(task_weights), "context_weight": args.context_weight,
            "peak_lr": peak_lr, "warmup": warmup, "device": args.device,
            "skipped_steps": skipped,
            "stages": [st.name for st in stages], "final_stage": curriculum.stage.name,
            "stage_switches": [sw.to_json() for sw in curriculum.switches],
            "last_train": {k: last.get(k) for k in CSV_FIELDS if k in last},
            "argv": sys.argv[1:] if argv is None else argv}
    save_checkpoint(model, cfg, out, info)
    shutil.copyfile(metrics_path.with_suffix(".csv"), out / "training_curves.csv")
    log({"event": "saved", "path": str(out), **info}, fh)
    if args.probe_samples:
        info["copy_probe"] = heldout.copy_probe(
            model, tok, recipe["probe_lengths"], args.probe_samples, args.device,
            recipe["eval_batch_tokens"], args.eval_seed)
        log({"event": "copy_probe", **info["copy_probe"]}, fh)
    res = evaluate(eval_lengths, final=True)
    if pool is not None:
        pool.shutdown()
    info["heldout"] = res
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    log({"event": "heldout", "eval_seed": args.eval_seed, **(res or {})}, fh)
    if res is not None:
        print(heldout.format_table(res["score"], "held-out score (teacher-forced lower bound, %)"))
    fh.close()
    return info


if __name__ == "__main__":
    main()
