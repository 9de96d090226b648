"""Train Flux routers for a frozen quality model, as the Flux paper describes.

    python -m training.routers --model ckpt/model --out ckpt/model/router --max-minutes 2

Every layer gets a `FluxRouter` (attention_backends.flux.router, the module the server loads)
fed with the layer's pre-RoPE query states (``q_proj``'s output), pooled as the server pools
them (``ctx_q``: the first and the last ``pool_size`` tokens of the prompt, averaged, then
averaged over heads). In training, each layer draws a hard Gumbel-softmax sample from its
router's two logits (straight-through: the forward pass uses the 0/1 sample, the backward pass
the softmax's gradient) at a temperature annealed from ``--tau-start`` to ``--tau-end``, and its
attention output is ``gate * full + (1 - gate) * sparse``, sparse being the server's sink +
window attention (key ``j`` visible from query ``p`` when ``j <= p`` and ``j < sink`` or
``j > p - window``). The model's weights are frozen; only the routers learn.

The loss is the answer cross-entropy plus a Lagrangian term per task type ``k`` (Sheared-LLaMA's
form): ``lambda1_k * (s_k - t_k) + lambda2_k * (s_k - t_k)**2``, where ``s_k`` is the expected
fraction of sparse layers (the routers' sparse-class probability, averaged over the type's
samples and the layers) and ``t_k`` the type's target (``--targets``). The multipliers follow
gradient ascent on the same loss (``lambda += lr * dL/dlambda``) while the routers follow
descent, so the constraint is enforced as training goes.

Writes exactly what ``fluxserve serve --flux-router PATH`` loads: ``router.safetensors``
(``layers.{i}.<param>``) and ``router_config.json`` (``num_hidden_layers``, ``head_dim``,
``pool_size``, ``sink_size``, ``local_window_size``, ``use_softmax``), plus
``router_eval.json`` (held-out sparsity and accuracy per task, teacher-forced).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attention_backends.flux.router import (
    FULL_CLASS,
    FluxRouter,
    RouterSpec,
    save_router_file,
)
from evaluation import tasks
from training import heldout
from training.data import TASK_TYPES, TYPE_NAMES, LengthMix, TaskBatches, heldout_samples
from training.model import load_checkpoint
from training.tokenizer import tokenizer_json_path

ATTN_NAME = "flux_router_training"
DEFAULT_TARGETS = {"retrieval": 0.25, "aggregation": 0.5, "local": 0.9}
RECIPES = {
    "gpu": {"mix": LengthMix((2048, 4096, 8192), (0.3, 0.4, 0.3), 65536),
            "eval_lengths": [4096, 8192], "eval_samples": 8, "workers": 8,
            "eval_batch_tokens": 131072},
    "tiny": {"mix": LengthMix((512, 1024), (0.5, 0.5), 4096),
             "eval_lengths": [1024], "eval_samples": 4, "workers": 0,
             "eval_batch_tokens": 8192},
}


def pool_weights(prompt_len: Tensor, seq_len: int, pool_size: int) -> Tensor:
    """``[B, T]`` float32 weights that average the first and last ``min(pool_size, n)`` prompt
    tokens (a token in both counts twice, as `attention_backends.flux.router.pool_indices`)."""
    pos = torch.arange(seq_len, device=prompt_len.device)[None, :]
    n = prompt_len[:, None]
    p = torch.clamp(n, max=pool_size)
    w = (pos < p).float() + ((pos >= n - p) & (pos < n)).float()
    return w / (2 * p).float()


def sparse_mask(seq_len: int, sink: int, window: int, device) -> Tensor:
    """``[T, T]`` bool, True where query ``p`` sees key ``j`` under sink + window attention."""
    p = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return (j <= p) & ((j < sink) | (j > p - window))


class RoutingState:
    """What the attention function needs for the current batch: the mode (``full``,
    ``sparse``, ``gumbel`` (training), ``hard`` (argmax, as served)), the temperature, the
    pooling weights, and per layer the captured pre-RoPE queries and the outputs."""

    def __init__(self, routers: nn.ModuleList, sink: int, window: int, pool_size: int):
        self.routers, self.sink, self.window, self.pool_size = routers, sink, window, pool_size
        self.mode, self.tau = "full", 1.0
        self.weights: Tensor | None = None
        self.q: dict[int, Tensor] = {}
        self.p_sparse: dict[int, Tensor] = {}  # [B] probability of the sparse class
        self.sparse: dict[int, Tensor] = {}  # [B] 0/1 decisions taken
        self._masks: dict[tuple, Tensor] = {}

    def start(self, batch: dict, mode: str) -> None:
        self.mode = mode
        self.weights = pool_weights(batch["prompt_len"], batch["input_ids"].shape[1],
                                    self.pool_size)
        self.q.clear(), self.p_sparse.clear(), self.sparse.clear()

    def mask(self, seq_len: int, device) -> Tensor:
        key = (seq_len, str(device))
        if key not in self._masks:
            self._masks = {key: sparse_mask(seq_len, self.sink, self.window, device)}
        return self._masks[key]

    def gate_full(self, layer: int) -> Tensor | None:
        """``[B]`` float: 1 where the layer runs full attention (None: every row full)."""
        if self.mode == "full":
            return None
        if self.mode == "sparse":
            return torch.zeros(self.weights.shape[0], device=self.weights.device)
        router = self.routers[layer]
        q = self.q.pop(layer)  # [B, T, H*D]
        b, t, _ = q.shape
        d = router.cls_feat_extractor[0].in_features
        q = q.view(b, t, -1, d).float()
        feature = torch.einsum("bt,bthd->bd", self.weights, q) / q.shape[2]
        logits = router.cls_router_head_agnostic(router.cls_feat_extractor(feature))
        self.p_sparse[layer] = 1 - logits.softmax(-1)[:, FULL_CLASS]
        if self.mode == "gumbel":
            gate = F.gumbel_softmax(logits, tau=self.tau, hard=True)[:, FULL_CLASS]
        else:
            gate = (logits.argmax(-1) == FULL_CLASS).float()
        self.sparse[layer] = (gate < 0.5).detach().float()
        return gate


def _attention(state: RoutingState):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                  **kwargs):
        # query [B, H, T, D] (after RoPE); key, value [B, KVH, T, D]
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
        gate = state.gate_full(module.layer_idx)
        full = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
        if gate is None:
            out = full
        else:
            sparse = F.scaled_dot_product_attention(
                query, key, value, attn_mask=state.mask(query.shape[2], query.device),
                scale=scaling)
            g = gate.to(full.dtype)[:, None, None, None]
            out = g * full + (1 - g) * sparse
        return out.transpose(1, 2).contiguous(), None
    return attention


def attach(model, sink: int, window: int, pool_size: int, seed: int = 0) -> RoutingState:
    """Freeze `model`, give each layer a fresh `FluxRouter` and install the routed attention.

    Returns the `RoutingState` whose ``routers`` are the trainable parameters."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    model.requires_grad_(False)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    routers = nn.ModuleList(FluxRouter(head_dim) for _ in range(cfg.num_hidden_layers)).to(device)
    state = RoutingState(routers, sink, window, pool_size)
    AttentionInterface.register(ATTN_NAME, _attention(state))
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    model.set_attn_implementation(ATTN_NAME)
    for i, layer in enumerate(model.model.layers):
        def hook(mod, inputs, output, i=i):
            if state.mode in ("gumbel", "hard"):
                state.q[i] = output
        layer.self_attn.q_proj.register_forward_hook(hook)
    return state


def save_routers(state: RoutingState, out: Path, extra: dict | None = None) -> None:
    """Write ``router.safetensors`` and ``router_config.json`` (what ``--flux-router`` loads)."""
    save_router_file(list(state.routers), out,
                     RouterSpec(pool_size=state.pool_size, sink=state.sink, window=state.window),
                     extra)


def routing_loss(model, state: RoutingState, batch: dict, targets: dict[str, float],
                 lam1: Tensor, lam2: Tensor) -> tuple[Tensor, dict]:
    """Answer CE + the Lagrangian sparsity terms; also returns the per-type expected sparsity
    ``s`` [len(TYPE_NAMES)] (NaN for a type absent from the batch) and statistics."""
    state.start(batch, "gumbel")
    hidden = model.model(input_ids=batch["input_ids"], use_cache=False).last_hidden_state
    answer = batch["answer_mask"]
    logits = model.lm_head(hidden[answer]).float()
    ce = F.cross_entropy(logits, batch["labels"][answer])
    p = torch.stack([state.p_sparse[i] for i in sorted(state.p_sparse)], 1)  # [B, L]
    hard = torch.stack([state.sparse[i] for i in sorted(state.sparse)], 1)
    names = list(tasks.TASKS)
    types = [TYPE_NAMES.index(TASK_TYPES[names[i]]) for i in batch["task_index"].tolist()]
    types_t = torch.tensor(types, device=p.device)
    loss = ce
    s = torch.full((len(TYPE_NAMES),), float("nan"), device=p.device)
    s_hard = s.clone()
    for k, name in enumerate(TYPE_NAMES):
        rows = types_t == k
        if rows.any():
            s_k = p[rows].mean()
            gap = s_k - targets[name]
            loss = loss + lam1[k] * gap + lam2[k] * gap * gap
            s[k] = s_k.detach()
            s_hard[k] = hard[rows].mean()
    return loss, {"ce": ce.item(), "s": s, "s_hard": s_hard}


class RouterTrainer:
    """One optimisation step at a time: AdamW descent on the routers, gradient ascent on the
    Lagrange multipliers ``lam1``, ``lam2`` (one per entry of `TYPE_NAMES`)."""

    def __init__(self, model, state: RoutingState, targets: dict[str, float], lr: float = 1e-3,
                 lambda_lr: float = 0.1):
        self.model, self.state, self.targets = model, state, targets
        self.lambda_lr = lambda_lr
        device = next(state.routers.parameters()).device
        self.opt = torch.optim.AdamW(state.routers.parameters(), lr=lr, weight_decay=0.0)
        self.lam1 = torch.zeros(len(TYPE_NAMES), device=device)
        self.lam2 = torch.zeros(len(TYPE_NAMES), device=device)
        self.target = torch.tensor([targets[n] for n in TYPE_NAMES], device=device)

    def step(self, batch: dict) -> dict:
        """Returns ``loss``, ``ce`` (floats), ``s`` and ``s_hard`` (per-type tensors)."""
        loss, stats = routing_loss(self.model, self.state, batch, self.targets, self.lam1,
                                   self.lam2)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():  # dL/dlambda1 = gap, dL/dlambda2 = gap**2 (absent types: 0)
            gap = torch.nan_to_num(stats["s"] - self.target)
            self.lam1 += self.lambda_lr * gap
            self.lam2 += self.lambda_lr * gap * gap
        return {**stats, "loss": loss.item()}


def _parse_targets(items: list[str]) -> dict[str, float]:
    targets = dict(DEFAULT_TARGETS)
    for item in items:
        name, _, value = item.partition("=")
        if name not in targets:
            raise SystemExit(f"unknown task type {name!r}; expected {sorted(targets)}")
        targets[name] = float(value)
    return targets


@torch.no_grad()
def evaluate(model, state: RoutingState, samples, tok, device: str, batch_tokens: int,
             pad_id: int) -> dict:
    """Teacher-forced held-out score under ``full``, ``auto`` (the routers' argmax, as served)
    and ``sparse`` (every layer), and ``auto``'s sparse-layer fraction per task and type."""
    out: dict = {}
    for mode, label in (("full", "full"), ("hard", "auto"), ("sparse", "sparse")):
        decisions: list[tuple[str, float]] = []

        def before(batch, mode=mode, decisions=decisions):
            state.start(batch, mode)

        records = []
        for s in samples:  # one sample per pass: decisions are read back per row
            recs = heldout.teacher_forced(model, [s], tok, device, batch_tokens, before, pad_id)
            if mode == "hard":
                frac = torch.stack([state.sparse[i] for i in sorted(state.sparse)]).mean().item()
                decisions.append((s.task, frac))
                recs[0]["sparse_fraction"] = frac
            records += recs
        out[label] = heldout.summarize(records, "score")
        if mode == "hard":
            by_task: dict[str, list[float]] = {}
            by_type: dict[str, list[float]] = {}
            for task, frac in decisions:
                by_task.setdefault(task, []).append(frac)
                by_type.setdefault(TASK_TYPES[task], []).append(frac)
            mean = lambda xs: round(sum(xs) / len(xs), 4)  # noqa: E731
            out["sparsity_by_task"] = {k: mean(v) for k, v in by_task.items()}
            out["sparsity_by_type"] = {k: mean(v) for k, v in by_type.items()}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the trained checkpoint (frozen)")
    parser.add_argument("--out", default=None, help="router folder (default MODEL/router)")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                        help="default: gpu on CUDA, tiny otherwise")
    parser.add_argument("--sink", type=int, default=64)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--pool-size", type=int, default=150)
    parser.add_argument("--targets", nargs="*", default=[],
                        help="TYPE=SPARSITY, types retrieval, aggregation, local (defaults "
                             f"{DEFAULT_TARGETS})")
    parser.add_argument("--max-minutes", type=float, default=2.0)
    parser.add_argument("--max-steps", type=int, default=1_000_000)
    parser.add_argument("--tau-start", type=float, default=1.0)
    parser.add_argument("--tau-end", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lambda-lr", type=float, default=0.1)
    parser.add_argument("--tokens-per-batch", type=int, default=None)
    parser.add_argument("--eval-samples", type=int, default=None)
    parser.add_argument("--eval-seed", type=int, default=42)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader worker processes (default: the recipe's)")
    parser.add_argument("--metrics", default=None, help="JSON lines log (default OUT.log.jsonl)")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    recipe = RECIPES[args.recipe or ("gpu" if args.device.startswith("cuda") else "tiny")]
    targets = _parse_targets(args.targets)
    model_dir = Path(args.model)
    out = Path(args.out) if args.out else model_dir / "router"
    metrics_path = Path(args.metrics) if args.metrics else out.with_suffix(".log.jsonl")
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    fh = metrics_path.open("w")
    t_start = time.monotonic()
    budget_s = args.max_minutes * 60
    info = json.loads((model_dir / "training_info.json").read_text())
    task_names = info["tasks"]

    from tokenizers import Tokenizer
    tok_path = str(model_dir / "tokenizer.json")
    if not Path(tok_path).exists():
        tok_path = str(tokenizer_json_path())
    tok = Tokenizer.from_file(tok_path)
    eos = tok.token_to_id("<|end_of_text|>")

    # held-out samples are fitted in other processes while the routers train
    import concurrent.futures as futures
    pool = futures.ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("fork"))
    pending = [pool.submit(heldout_samples, tok_path, [t], [n],
                           args.eval_samples or recipe["eval_samples"], args.eval_seed)
               for t in task_names for n in recipe["eval_lengths"]]

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = load_checkpoint(model_dir, args.device, dtype)
    state = attach(model, args.sink, args.window, args.pool_size, args.seed)
    trainer = RouterTrainer(model, state, targets, args.lr, args.lambda_lr)
    mix = recipe["mix"]
    if args.tokens_per_batch:
        mix = LengthMix(mix.buckets, mix.weights, args.tokens_per_batch, mix.min_fill)
    ctx = mp.get_context("fork")
    data = TaskBatches(tok_path, args.seed, [mix], {t: 1.0 for t in task_names},
                       namespace="router")
    workers = recipe["workers"] if args.workers is None else args.workers
    loader = torch.utils.data.DataLoader(
        data, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None,
        multiprocessing_context=ctx if workers else None,
        pin_memory=args.device.startswith("cuda"))
    log = lambda rec: (print(json.dumps(rec), flush=True),  # noqa: E731
                       fh.write(json.dumps(rec) + "\n"), fh.flush())
    log({"event": "start", "model": str(model_dir), "sink": args.sink, "window": args.window,
         "pool_size": args.pool_size, "targets": targets, "device": args.device})

    step = 0
    t_loop = time.monotonic()
    for batch in loader:
        elapsed = time.monotonic() - t_start
        frac = max(elapsed / budget_s, step / args.max_steps)
        if frac >= 1.0:
            break
        state.tau = args.tau_start * (args.tau_end / args.tau_start) ** frac
        batch = {k: v.to(args.device, non_blocking=True) for k, v in batch.items()}
        stats = trainer.step(batch)
        step += 1
        if step in (1, 10, 25) or step % 25 == 0:
            now = time.monotonic()
            fmt = lambda t: {n: (None if math.isnan(v) else round(v, 3))  # noqa: E731
                             for n, v in zip(TYPE_NAMES, t.tolist(), strict=True)}
            log({"event": "train", "step": step, "elapsed_s": round(now - t_start, 1),
                 "steps_per_s": round(step / (now - t_loop), 3), "tau": round(state.tau, 4),
                 "ce": round(stats["ce"], 4), "loss": round(stats["loss"], 4),
                 "expected_sparsity": fmt(stats["s"]), "sampled_sparsity": fmt(stats["s_hard"]),
                 "lambda1": fmt(trainer.lam1), "lambda2": fmt(trainer.lam2),
                 "seq_len": batch["input_ids"].shape[1]})

    extra = {"trained": {"steps": step, "targets": targets, "tau": [args.tau_start, args.tau_end],
                         "model": info.get("preset"), "seed": args.seed}}
    save_routers(state, out, extra)
    log({"event": "saved", "path": str(out), "steps": step})
    samples = [s for fut in pending for s in fut.result()]
    pool.shutdown()
    result = evaluate(model, state, samples, tok, args.device, recipe["eval_batch_tokens"], eos)
    result.update({"steps": step, "targets": targets, "sink": args.sink, "window": args.window,
                   "eval_seed": args.eval_seed})
    (out / "router_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    log({"event": "router_eval", **result})
    print("learned sparsity (fraction of layers sparse under auto, held-out):")
    for name, v in result["sparsity_by_type"].items():
        print(f"  {name:12s} {v:.3f}  (target {targets[name]})")
    for label in ("full", "auto", "sparse"):
        print(f"  {label:6s} score by type: {result[label]['by_type']}")
    fh.close()
    return result


if __name__ == "__main__":
    main()
