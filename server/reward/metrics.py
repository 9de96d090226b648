"""Prometheus metrics of `/v1/reward` (in the registry that /metrics serves, see server.metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REWARD_REQUESTS = Counter(
    "fluxserve:reward_requests_total",
    "Reward items scored (one request may carry several), by mode.",
    ["mode"],
)
JUDGE_PARSE_FAILURES = Counter(
    "fluxserve:reward_judge_parse_failures_total",
    "Judge outputs from which no verdict could be read, by judge prompt (pairwise / ranking).",
    ["judge_prompt"],
)
SWAP_DISAGREEMENTS = Counter(
    "fluxserve:reward_swap_disagreements_total",
    "Judge items with swap whose two candidate orders gave different rankings.",
)
REWARD_LATENCY = Histogram(
    "fluxserve:reward_scoring_seconds",
    "Time to score one reward item (all its prompts, concurrently), by mode.",
    ["mode"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
