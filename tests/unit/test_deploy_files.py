"""The deployment files refer to what the code actually exports and serves."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _defined_fluxserve_metrics() -> set[str]:
    names = set()
    for path in ROOT.glob("*/**/*.py"):
        if ".venv" in path.parts:
            continue
        names |= set(re.findall(r'"(fluxserve:[a-z_]+)"', path.read_text()))
    return {_base(n) for n in names}


def _base(name: str) -> str:
    # counters are exported with _total, histograms with _bucket/_sum/_count
    return re.sub(r"_(total|bucket|sum|count)$", "", name)


def test_dashboard_queries_only_exported_fluxserve_metrics():
    dash = json.loads((ROOT / "deploy/grafana/fluxserve-dashboard.json").read_text())
    defined = _defined_fluxserve_metrics()
    used = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"fluxserve:[a-z_]+", target["expr"]))
    assert used, "the dashboard shows no fluxserve metric"
    base = {_base(name) for name in used}
    assert base <= defined, base - defined

