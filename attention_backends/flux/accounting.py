"""Per-request accounting of attention work: what a request's routing and KV eviction saved
against dense attention. Plain integer arithmetic, no vLLM, no torch.

**FLOP count.** A query attends to a key with ``2·D`` FLOPs for its ``q·k`` dot product (``D``
multiply-adds) and ``2·D`` for adding ``p·v`` to its output, per query head: attention over
``Q`` queries and ``K`` keys costs ``4·H·D·Q·K`` FLOPs (``H`` query heads). This is the count
of FlashAttention-2 (Dao, 2023, §4.1 "Benchmarking Attention": "The FLOPs count of attention
forward pass is 4·seqlen²·head dimension·number of heads. With causal mask, we divide this
number by 2"), with the causal halving replaced by the exact number of visible (query, key)
pairs, so that sparse attention and KV eviction are counted the same way:

    attention FLOPs = 4 · H · D · Σ_layers Σ_queries visible_keys(query, layer)

``visible_keys`` applies the attention kernel's visibility rule
(``attention_backends.kernels.reference``): key slot ``j`` is visible to the query at slot ``p``
iff ``j <= p``, ``j`` lies outside the evicted gap ``[kept_end, gap_end)``, and, on a sparse
layer, ``j < sink`` or ``j > p - window``. Dense causal prefill of ``P`` tokens thus sees
``P(P+1)/2`` pairs per layer (the paper's ``P²/2``), a sparse query at most ``sink + window``
keys.

The queries of a request are its ``P`` prompt tokens (prefill, before any eviction: the prompt
attends in full and is compressed after) and its ``C - 1`` fed-back generated tokens (decode;
the first token comes from the last prompt query, the last one is never fed back). Decode
tokens keep their slots ``>= gap_end = P``. Not counted: the softmax and masking, the compression
pass of SnapKV/CaliDrop (observation-window scores and CaliDrop's evicted-set summary, once per
layer), CaliDrop's per-token merge of that summary, and any work skipped by the prefix cache or
repeated after a preemption: the count is the attention the request's tokens need.

**KV bytes saved**: the KV-cache bytes that eviction gave back to vLLM's pool (the whole blocks
inside the evicted gap, all layers), reported by the scheduler that frees them. Sparse layers
keep their whole KV, so routing alone saves no KV bytes.

**The reports.** The numbers come from the engine, not from the request's options: the worker
reports each non-``full`` request's actual per-layer decisions and sink/window once its first
forward has routed it (``RoutingReport``), the scheduler its eviction (``EvictionReport``), both
under ``REPORT_KEY`` in the ``kv_transfer_params`` of the request's first output; the API process
takes them out there (``ReportInbox``) before vLLM's serving layer sees them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# Key under which the engine's reports ride in ``EngineCoreOutput.kv_transfer_params``.
REPORT_KEY = "fluxserve_accounting"
# Attribute of vLLM's ``ModelRunnerOutput`` that carries a step's routing reports to the scheduler.
ROUTING_REPORTS_ATTR = "fluxserve_routing_reports"


# ------------------------------------------------------------------------------- visible keys


def visible_keys(p: int, sink: int = 0, window: int = 0, kept_end: int = 0,
                 gap_end: int = 0) -> int:
    """Key slots visible to the query at slot ``p`` (``window <= 0``: dense; ``kept_end >=
    gap_end``: no gap). The count of ``kernels.reference.visible_mask``'s row for ``p``."""
    hi = p + 1
    if window > 0:
        lo_w = max(0, hi - window)
        attend: tuple[tuple[int, int], ...] = ((0, min(sink, lo_w)), (lo_w, hi))
    else:
        attend = ((0, hi),)
    valid = ((0, kept_end), (gap_end, hi)) if gap_end > kept_end else ((0, hi),)
    return sum(max(0, min(a1, v1) - max(a0, v0)) for a0, a1 in attend for v0, v1 in valid)


def sum_visible_keys(p_lo: int, p_hi: int, sink: int = 0, window: int = 0, kept_end: int = 0,
                     gap_end: int = 0) -> int:
    """``Σ visible_keys(p)`` over the query slots ``p_lo <= p < p_hi``, exactly, in time
    independent of ``p_hi - p_lo``.

    ``visible_keys`` is continuous and piecewise linear in ``p``: it is built from ``min``/``max``
    of the constants ``0, sink, kept_end, gap_end`` and of ``p + 1`` and ``p + 1 - window``, so
    its slope changes only where one of the latter meets one of the former, at the integers
    ``c - 1`` and ``c + window - 1``. Between two such points the sum is that of an arithmetic
    progression.
    """
    if p_hi <= p_lo:
        return 0
    consts = (0, sink, kept_end, gap_end)
    kinks = {c - 1 for c in consts}
    if window > 0:
        kinks |= {c + window - 1 for c in consts}
    last = p_hi - 1
    ends = sorted(k for k in kinks if p_lo <= k < last) + [last]
    total, start = 0, p_lo
    for end in ends:
        if end < start:
            continue
        n = end - start + 1
        total += n * (visible_keys(start, sink, window, kept_end, gap_end)
                      + visible_keys(end, sink, window, kept_end, gap_end)) // 2
        start = end + 1
    return total


# ------------------------------------------------------------------------------- the inputs


@dataclass(frozen=True)
class AttentionShape:
    """The served model's attention: ``num_layers`` decoder layers of ``num_heads`` query heads
    of ``head_dim`` (whole model, all tensor-parallel ranks)."""

    num_layers: int
    num_heads: int
    head_dim: int

    @property
    def flops_per_pair(self) -> int:
        """FLOPs of one visible (query, key) pair in one layer, all query heads: ``4·H·D``."""
        return 4 * self.num_heads * self.head_dim


@dataclass(frozen=True)
class RoutingReport:
    """The worker's record of a request's routing: ``sparse[l]`` True where layer ``l`` ran
    sparse (sink + window) attention."""

    sparse: tuple[bool, ...]
    sink: int
    window: int

    def to_wire(self) -> dict:
        return {"sparse": [int(s) for s in self.sparse], "sink": self.sink,
                "window": self.window}

    @classmethod
    def from_wire(cls, d: dict) -> RoutingReport:
        return cls(tuple(bool(s) for s in d["sparse"]), int(d["sink"]), int(d["window"]))


@dataclass(frozen=True)
class EvictionReport:
    """The scheduler's record of a request's eviction: prompt slots ``[kept_end, gap_end)`` were
    evicted in every layer and KV head, and ``kv_bytes_freed`` bytes of KV blocks went back to
    vLLM's pool."""

    kept_end: int
    gap_end: int
    kv_bytes_freed: int

    def to_wire(self) -> dict:
        return {"kept_end": self.kept_end, "gap_end": self.gap_end,
                "kv_bytes_freed": self.kv_bytes_freed}

    @classmethod
    def from_wire(cls, d: dict) -> EvictionReport:
        return cls(int(d["kept_end"]), int(d["gap_end"]), int(d["kv_bytes_freed"]))


@dataclass(frozen=True)
class EngineReport:
    """What the engine reported for one sequence (None: dense attention, no eviction)."""

    routing: RoutingReport | None = None
    eviction: EvictionReport | None = None

    @classmethod
    def from_wire(cls, d: dict | None) -> EngineReport:
        d = d or {}
        return cls(RoutingReport.from_wire(d["routing"]) if d.get("routing") else None,
                   EvictionReport.from_wire(d["eviction"]) if d.get("eviction") else None)


# ------------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class AttentionWork:
    """The accounting of one or more sequences (``usage.fluxserve``; summed with ``+``).

    ``sparse_layers``/``total_layers``: layers that ran sparse attention, out of all;
    ``kv_tokens_kept``/``prompt_tokens``: prompt tokens whose KV was kept per layer and KV head;
    ``attention_flops``/``attention_flops_dense``: attention FLOPs spent, and those dense
    attention without eviction would have spent (module docstring); ``kv_bytes_saved``: KV-cache
    bytes freed by eviction. All ints; sums over the sequences when several are added.
    """

    sparse_layers: int = 0
    total_layers: int = 0
    kv_tokens_kept: int = 0
    prompt_tokens: int = 0
    attention_flops: int = 0
    attention_flops_dense: int = 0
    kv_bytes_saved: int = 0

    @property
    def attention_flops_saved(self) -> int:
        return self.attention_flops_dense - self.attention_flops

    @property
    def attention_work_saved(self) -> float:
        """``attention_flops_saved / attention_flops_dense`` in [0, 1] (0 with no work)."""
        if self.attention_flops_dense <= 0:
            return 0.0
        return self.attention_flops_saved / self.attention_flops_dense

    def __add__(self, other: AttentionWork) -> AttentionWork:
        return AttentionWork(*(a + b for a, b in zip(_fields(self), _fields(other), strict=True)))

    def to_usage(self) -> dict:
        """The ``usage.fluxserve`` object of a response."""
        return {
            "sparse_layers": self.sparse_layers,
            "total_layers": self.total_layers,
            "kv_tokens_kept": self.kv_tokens_kept,
            "prompt_tokens": self.prompt_tokens,
            "attention_flops": self.attention_flops,
            "attention_flops_dense": self.attention_flops_dense,
            "attention_flops_saved": self.attention_flops_saved,
            "attention_work_saved": round(self.attention_work_saved, 6),
            "kv_bytes_saved": self.kv_bytes_saved,
        }


def _fields(w: AttentionWork) -> tuple[int, ...]:
    return (w.sparse_layers, w.total_layers, w.kv_tokens_kept, w.prompt_tokens,
            w.attention_flops, w.attention_flops_dense, w.kv_bytes_saved)


def sequence_work(shape: AttentionShape, prompt_tokens: int, completion_tokens: int,
                  report: EngineReport | None = None) -> AttentionWork:
    """The accounting of one sequence: ``prompt_tokens`` prompt queries, then
    ``max(0, completion_tokens - 1)`` decode queries, with the engine's ``report`` (None or
    empty: dense, no eviction). Raises ``ValueError`` if the report's routing does not have
    one decision per layer."""
    report = report or EngineReport()
    routing, eviction = report.routing, report.eviction
    P = prompt_tokens
    decode_lo, decode_hi = P, P + max(0, completion_tokens - 1)
    k, g = (eviction.kept_end, eviction.gap_end) if eviction is not None else (0, 0)

    dense_prefill = P * (P + 1) // 2
    dense_decode_full = sum_visible_keys(decode_lo, decode_hi)
    dense_decode = sum_visible_keys(decode_lo, decode_hi, kept_end=k, gap_end=g)
    n_sparse = 0
    sparse_keys = 0
    if routing is not None:
        if len(routing.sparse) != shape.num_layers:
            raise ValueError(f"routing report has {len(routing.sparse)} layers, the model "
                             f"{shape.num_layers}")
        n_sparse = sum(routing.sparse)
        if n_sparse:
            sparse_keys = (sum_visible_keys(0, P, routing.sink, routing.window)
                           + sum_visible_keys(decode_lo, decode_hi, routing.sink, routing.window,
                                              k, g))
    n_dense = shape.num_layers - n_sparse
    pairs = n_sparse * sparse_keys + n_dense * (dense_prefill + dense_decode)
    pairs_dense = shape.num_layers * (dense_prefill + dense_decode_full)
    return AttentionWork(
        sparse_layers=n_sparse,
        total_layers=shape.num_layers,
        kv_tokens_kept=min(P, k) if eviction is not None else P,
        prompt_tokens=P,
        attention_flops=shape.flops_per_pair * pairs,
        attention_flops_dense=shape.flops_per_pair * pairs_dense,
        kv_bytes_saved=eviction.kv_bytes_freed if eviction is not None else 0,
    )


def total_work(works: Iterable[AttentionWork]) -> AttentionWork:
    out = AttentionWork()
    for w in works:
        out = out + w
    return out


# ------------------------------------------------------------------------------- API process


@dataclass
class ReportInbox:
    """The API process's mailbox for engine reports, keyed by the request id given to
    ``AsyncLLM.generate`` and the sequence index (``n > 1``). Only requests someone ``expect``s
    are kept, so the inbox holds at most the requests in flight."""

    _boxes: dict[str, dict[int, dict]] = field(default_factory=dict)

    def expect(self, request_id: str) -> dict[int, dict]:
        """Start collecting ``request_id``'s reports; returns the dict they land in."""
        return self._boxes.setdefault(request_id, {})

    def deliver(self, request_id: str, index: int, report: dict) -> None:
        box = self._boxes.get(request_id)
        if box is not None:
            box[index] = report

    def forget(self, request_id: str) -> None:
        self._boxes.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._boxes)


_INBOX = ReportInbox()


def get_inbox() -> ReportInbox:
    return _INBOX


def reports_for(box: dict[int, dict], indices: Sequence[int]) -> dict[int, EngineReport]:
    """Each sequence's report; a sequence without one gets that of the lowest index that has one
    (the ``n`` sequences of a request share its prompt and options), else an empty report."""
    parsed = {i: EngineReport.from_wire(r) for i, r in box.items()}
    fallback = parsed[min(parsed)] if parsed else EngineReport()
    return {i: parsed.get(i, fallback) for i in indices}
