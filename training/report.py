"""Print a trained checkpoint's summary: the model's held-out scores per task and length, and
its routers' sparsity and scores per task type (``training_info.json``,
``router/router_eval.json``).

    python -m training.report CKPT_DIR
    python -m training.report --brief CKPT_DIR [CKPT_DIR ...]   # one short column per model
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from training import heldout


def report(ckpt: Path) -> str:
    lines = []
    info = json.loads((ckpt / "training_info.json").read_text())
    lines.append(f"model: {info['preset']} preset, {info['parameters'] / 1e6:.1f} M parameters, "
                 f"{info['steps']} steps, {info['tokens'] / 1e6:.1f} M tokens in "
                 f"{info['train_seconds']:.0f} s, seed {info['seed']}")
    if info.get("heldout"):
        lines.append(heldout.format_table(
            info["heldout"]["score"], "held-out score, full attention (teacher-forced lower "
            "bound on RULER's string_match_all, %)"))
    router_eval = ckpt / "router" / "router_eval.json"
    if router_eval.exists():
        r = json.loads(router_eval.read_text())
        lines.append(f"routers: {r['steps']} steps, sink {r['sink']}, window {r['window']}")
        lines.append(f"{'type':12s}{'target':>8s}{'sparsity':>10s}{'full':>8s}{'auto':>8s}"
                     f"{'sparse':>8s}")
        for name, frac in r["sparsity_by_type"].items():
            lines.append(f"{name:12s}{r['targets'][name]:8.2f}{frac:10.3f}"
                         f"{r['full']['by_type'][name]:8.1f}{r['auto']['by_type'][name]:8.1f}"
                         f"{r['sparse']['by_type'][name]:8.1f}")
        lines.append("sparsity by task: " + ", ".join(
            f"{t} {v:.2f}" for t, v in r["sparsity_by_task"].items()))
    else:
        lines.append("routers: none trained")
    return "\n".join(lines)


def _len(n: int | str) -> str:
    n = int(n)
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def brief_rows(ckpt: Path) -> list[tuple[str, str]]:
    """(label, value) rows for `brief`: run size, the curriculum's stage switches (the stage
    entered, at which step, and why the one before ended: ``loss`` its copy-loss gate, ``cap``
    its step cap, ``time`` its share of the budget), the last
    logged copy and task answer losses and accuracies, the held-out copy probe, the held-out
    full-attention score per length and the routers' sparsity."""
    info = json.loads((ckpt / "training_info.json").read_text())
    last = info.get("last_train", {})
    rows = [("model", f"{info['preset']}, {info['parameters'] / 1e6:.1f} M"),
            ("steps / train s", f"{info['steps']} / {info['train_seconds']:.0f}")]
    switches = info.get("stage_switches", [])
    why = {"copy_loss": "loss", "max_steps": "cap", "progress": "time"}
    rows.append(("stage switches", " ".join(
        f"{sw['next_stage']}@{sw['step']}:{why.get(sw['reason'], sw['reason'])}"
        for sw in switches) or "none"))
    rows.append(("final stage", info.get("final_stage", "-")))
    for group, label in (("copy", "copy random"), ("copy_words", "copy words"),
                         ("task", "task answers")):
        rows.append((f"{label} loss/acc", f"{_fmt(last.get(f'loss_{group}'))} / "
                                           f"{_fmt(last.get(f'acc_{group}'), 3)}"))
    probe = info.get("copy_probe") or {}
    rows.append(("copy probe acc", " ".join(f"{_len(n)}:{v['acc']:.2f}"
                                            for n, v in probe.items()) or "-"))
    held = (info.get("heldout") or {}).get("score")
    rows.append(("held-out % (full)", " ".join(f"{_len(n)}:{v:.1f}"
                                               for n, v in held["average"].items())
                 if held else "-"))
    router_eval = ckpt / "router" / "router_eval.json"
    if router_eval.exists():
        r = json.loads(router_eval.read_text())
        rows.append(("router sparse frac", " ".join(
            f"{t[:3]}:{v:.2f}" for t, v in r["sparsity_by_type"].items())))
        mean = lambda d: sum(d.values()) / max(1, len(d))  # noqa: E731
        rows.append(("router auto/full %", f"{mean(r['auto']['by_type']):.1f} / "
                                           f"{mean(r['full']['by_type']):.1f}"))
    else:
        rows.append(("router sparse frac", "none trained"))
    return rows


def brief(ckpts: list[Path]) -> str:
    """A short table: one row per `brief_rows` label, one column per checkpoint."""
    cols = [dict(brief_rows(c)) for c in ckpts]
    labels = list(dict.fromkeys(k for c in cols for k in c))
    width = [max(len(c.get(k, "-")) for k in labels) for c in cols]
    head = max(len(k) for k in labels)
    return "\n".join(f"{k:{head}s}  " + "  ".join(f"{c.get(k, '-'):{w}s}"
                                                  for c, w in zip(cols, width, strict=True))
                     .rstrip() for k in labels)


if __name__ == "__main__":
    if sys.argv[1] == "--brief":
        print(brief([Path(a) for a in sys.argv[2:]]))
    else:
        print(report(Path(sys.argv[1])))
