"""Print a trained checkpoint's summary: the model's held-out scores per task and length, and
its routers' sparsity and scores per task type (``training_info.json``,
``router/router_eval.json``).

    python -m training.report CKPT_DIR
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


if __name__ == "__main__":
    print(report(Path(sys.argv[1])))
