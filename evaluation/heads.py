"""`fluxserve eval heads`: which attention heads retrieve, measured on a local checkpoint.

For each generated needle sample the prompt, the answer prefix and the reference answer are run
through the model in one teacher-forced forward pass (Hugging Face transformers, eager
attention). For every layer and head, the **retrieval attention mass** is the attention weight
that the queries producing the answer tokens (the position before each answer token) put on the
tokens of the needle span (the needle sentences that hold the answer), summed over the span and
averaged over those queries; then averaged over the samples. A head near 1 reads the answer from
the needle; heads of a random model score about ``needle tokens / context tokens``.

The attention weights are taken from each attention module's output by a forward hook and
reduced at once, so only one layer's weights are alive at a time.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from evaluation import plotting, tasks
from evaluation.head_masks import attention_modules
from evaluation.results import format_table, write_json

logger = logging.getLogger(__name__)

DEFINITION = ("mean over answer tokens of the attention weight that the query producing the "
              "token puts on the needle span, summed over the span's tokens; averaged over "
              "samples")


@dataclass
class HeadsResult:
    """`scores[layer][head]`: the mean retrieval attention mass, in [0, 1]."""

    scores: list[list[float]]
    samples: int

    def ranked(self) -> list[dict]:
        flat = [{"layer": layer, "head": head, "retrieval_score": score}
                for layer, row in enumerate(self.scores) for head, score in enumerate(row)]
        return sorted(flat, key=lambda h: -h["retrieval_score"])


def _spans(offsets: list[tuple[int, int]], char_spans: list[tuple[int, int]]) -> list[int]:
    """Token positions whose characters overlap any of `char_spans`."""
    return [i for i, (s, e) in enumerate(offsets) if e > s and
            any(s < ce and e > cs for cs, ce in char_spans)]


def profile(checkpoint: str | Path, task_names: list[str], lengths: list[int], samples: int,
            seed: int = 42, device: str = "cpu", dtype: str = "float32",
            progress: bool = True) -> HeadsResult:
    """Retrieval attention mass per (layer, head) of a local checkpoint.

    `task_names` must be needle tasks (``niah_*``). Raises ValueError on another task or when
    the tokenizer is not a fast one (offsets are needed to find the needle's tokens)."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bad = [t for t in task_names if t not in tasks.NEEDLE_TASKS]
    if bad:
        raise ValueError(f"heads needs needle tasks ({', '.join(tasks.NEEDLE_TASKS)}), got {bad}")
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("heads needs a fast tokenizer (character offsets)")
    model = AutoModelForCausalLM.from_pretrained(
        str(checkpoint), attn_implementation="eager", dtype=getattr(torch, dtype))
    model.to(device).eval()
    modules = attention_modules(model)
    num_layers = len(modules)
    num_heads = model.config.num_attention_heads
    total = torch.zeros(num_layers, num_heads, dtype=torch.float64)
    seen = 0
    state: dict = {}

    def hook(module, _inputs, output):
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError("the attention module returned no weights: eager attention "
                               "is needed")
        # weights: [batch=1, heads, queries, keys]
        rows = weights[0, :, state["queries"], :][:, :, state["needle"]]
        state["mass"][module.layer_idx] = rows.sum(-1).mean(-1).double().cpu()

    handles = [m.register_forward_hook(hook) for m in modules]

    def count(built: tasks.Built) -> int:
        return len(tokenizer(built.prompt + built.answer_prefix)["input_ids"])

    wanted = [(t, n, i) for t in task_names for n in lengths for i in range(samples)]
    try:
        for task_name, length, index in tqdm(wanted, desc="heads", disable=not progress):
            sample, _ = tasks.generate(task_name, length, index, seed, count)
            head = sample.prompt + sample.answer_prefix
            text = head + " " + ", ".join(sample.outputs) + "."
            enc = tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
            offsets = [tuple(o) for o in enc["offset_mapping"][0].tolist()]
            answer = [i for i, (s, e) in enumerate(offsets) if s >= len(head) and e > s]
            spans = [(n.char_start, n.char_start + len(n.text)) for n in sample.needles
                     if any(o in n.text for o in sample.outputs)]
            needle = _spans(offsets, spans)
            if not answer or not needle:
                raise ValueError(f"{task_name} sample {index}: no answer or needle tokens")
            state.update(queries=[i - 1 for i in answer], needle=needle, mass={})
            with torch.no_grad():
                model(input_ids=enc["input_ids"].to(device),
                      attention_mask=enc["attention_mask"].to(device), use_cache=False)
            total += torch.stack([state["mass"][i] for i in range(num_layers)])
            seen += 1
    finally:
        for h in handles:
            h.remove()
    return HeadsResult(scores=(total / max(seen, 1)).tolist(), samples=seen)


def report(result: HeadsResult, checkpoint: str | Path, task_names: list[str],
           lengths: list[int], seed: int) -> dict:
    """The content of ``heads.json``: settings, definition, every head ranked (dicts with
    ``layer``, ``head``, ``retrieval_score``, best first) and the layers x heads matrix."""
    return {"checkpoint": str(checkpoint), "tasks": task_names, "lengths": lengths,
            "samples": result.samples, "seed": seed, "num_layers": len(result.scores),
            "num_heads": len(result.scores[0]), "definition": DEFINITION,
            "ranked": result.ranked(), "matrix": result.scores}


def profile_from_args(args) -> dict:
    """Run `profile` for ``fluxserve eval heads`` and write heads.json and heads.png."""
    task_names = tasks.resolve_tasks(args.tasks)
    result = profile(args.checkpoint, task_names, args.lengths, args.samples, args.seed,
                     args.device, args.dtype)
    out = Path(args.out)
    data = report(result, args.checkpoint, task_names, args.lengths, args.seed)
    ranked = data["ranked"]
    json_path = write_json(out / "heads.json", data)
    png_path = plotting.heatmap(out / "heads.png", result.scores,
                                title="Retrieval attention mass per head",
                                xlabel="head", ylabel="layer",
                                colorbar_label="attention mass on the needle")
    print(format_table(["rank", "layer", "head", "retrieval_score"],
                       [[i + 1, h["layer"], h["head"], f"{h['retrieval_score']:.4f}"]
                        for i, h in enumerate(ranked[:args.top])]))
    print(f"wrote {json_path}, {png_path}", file=sys.stderr)
    return data
