"""Per-request accounting in the API process: each response's ``usage.fluxserve`` object and the
per-request Prometheus series (prefill and decode time, attention FLOPs and KV bytes saved).

``FluxAsyncLLM`` (``server.engine``) routes every ``generate`` call through
``RequestAccountant.observe``, which passes vLLM's ``RequestOutput``s through unchanged, counts
each sequence's generated tokens and, when the request is complete, computes its
``AttentionWork`` (``attention_backends.flux.accounting``) from the reports the engine sent for
it: the worker's per-layer routing and the scheduler's eviction. A route that wants the result in
its response opens a ``ResponseUsage`` with ``collect_usage()`` around the call into vLLM's
serving class; every engine request started inside it (one per prompt) adds its work there.

A request with ``full`` routing and no eviction gets no report from the engine and costs nothing
there; here it costs a few integer operations when it finishes, and its object says that
nothing was saved (``attention_flops == attention_flops_dense``), so that every response of a
fluxserve server carries the object. A server started with its own ``--scheduler-cls`` gets no
reports at all: it sends no ``usage.fluxserve`` and records no FLOPs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import get_args

from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams

from attention_backends.flux.accounting import (
    AttentionShape,
    AttentionWork,
    get_inbox,
    reports_for,
    sequence_work,
    total_work,
)
from attention_backends.flux.options import EXTRA_ARGS_KEY as FLUX_KEY
from attention_backends.flux.options import FluxMode
from kv_policies.eviction.options import EXTRA_ARGS_KEY as KV_POLICY_KEY
from kv_policies.eviction.options import POLICY_NAMES
from server import metrics

logger = logging.getLogger("fluxserve.accounting")

_FLUX_MODES = frozenset(get_args(FluxMode))
_POLICIES = frozenset(POLICY_NAMES)


@dataclass
class ResponseUsage:
    """The accounting of one HTTP response: the sum over its engine requests."""

    works: list[AttentionWork] = field(default_factory=list)
    enabled: bool = True  # False: the engine sends no reports (a custom scheduler)

    def to_usage(self) -> dict | None:
        """The ``usage.fluxserve`` object, or None when there is nothing to report."""
        if not self.enabled or not self.works:
            return None
        return total_work(self.works).to_usage()


_CURRENT: ContextVar[ResponseUsage | None] = ContextVar("fluxserve_response_usage",
                                                        default=None)


@contextlib.contextmanager
def collect_usage() -> Iterator[ResponseUsage]:
    """Collect the accounting of the engine requests started inside the block (they may finish
    after it, as a stream does) into the yielded ``ResponseUsage``."""
    usage = ResponseUsage()
    token = _CURRENT.set(usage)
    try:
        yield usage
    finally:
        _CURRENT.reset(token)


def labels_of(params: SamplingParams) -> tuple[str, str]:
    """``(flux_mode, kv_policy)`` of a request, for metric labels: the mode and policy names
    only (``other`` for anything else; absent: ``full`` / ``none``)."""
    extra = params.extra_args or {}
    flux, kv = extra.get(FLUX_KEY), extra.get(KV_POLICY_KEY)
    mode = flux.get("mode", "full") if isinstance(flux, dict) else "full"
    policy = kv.get("name", "none") if isinstance(kv, dict) else "none"
    return (mode if mode in _FLUX_MODES else "other",
            policy if policy in _POLICIES else "other")


def observe_times(out: RequestOutput, flux_mode: str, kv_policy: str) -> None:
    """Prefill and decode-per-token time of a finished request, from vLLM's own per-request
    timestamps (engine-core clock): prefill from first scheduled to first token, as vLLM's
    ``vllm:request_prefill_time_seconds``; decode from first to last token over the tokens after
    the first. Nothing without stats (``--disable-log-stats``)."""
    stats = out.metrics
    if stats is None or not getattr(stats, "first_token_ts", 0.0):
        return
    if stats.scheduled_ts:
        metrics.PREFILL_SECONDS.labels(flux_mode, kv_policy).observe(
            max(0.0, stats.first_token_ts - stats.scheduled_ts))
    if stats.num_generation_tokens > 1:
        metrics.DECODE_SECONDS_PER_TOKEN.labels(flux_mode, kv_policy).observe(
            max(0.0, stats.last_token_ts - stats.first_token_ts)
            / (stats.num_generation_tokens - 1))


class RequestAccountant:
    """Observes the engine requests of one ``AsyncLLM`` (see the module docstring)."""

    def __init__(self, shape: AttentionShape, reports_enabled: bool) -> None:
        self.shape = shape
        self.reports_enabled = reports_enabled

    def observe(self, outputs: AsyncGenerator[RequestOutput, None], request_id: str,
                params: object) -> AsyncGenerator[RequestOutput, None]:
        """``outputs`` (what ``AsyncLLM.generate`` returned for ``request_id``) observed. Called
        when the generator is created, which is where the caller's ``collect_usage`` is seen."""
        if not isinstance(params, SamplingParams):  # pooling: nothing to account
            return outputs
        return self._observe(outputs, request_id, params, _CURRENT.get())

    async def _observe(self, outputs: AsyncGenerator[RequestOutput, None], request_id: str,
                       params: SamplingParams, usage: ResponseUsage | None
                       ) -> AsyncGenerator[RequestOutput, None]:
        inbox = get_inbox()
        box = inbox.expect(request_id) if self.reports_enabled else {}
        delta = params.output_kind == RequestOutputKind.DELTA
        tokens: dict[int, int] = {}  # sequence index -> tokens generated
        try:
            async for out in outputs:
                for seq in out.outputs:
                    n = len(seq.token_ids)
                    tokens[seq.index] = tokens.get(seq.index, 0) + n if delta else n
                if out.finished:  # before the caller sees it: its usage chunk comes next
                    try:
                        self._finish(out, params, tokens, box, usage)
                    except Exception:  # the accounting must never fail a served request
                        logger.exception("accounting of request %s failed", request_id)
                yield out
        finally:
            inbox.forget(request_id)
            await outputs.aclose()

    def _finish(self, last: RequestOutput, params: SamplingParams, tokens: dict[int, int],
                box: dict[int, dict], usage: ResponseUsage | None) -> None:
        flux_mode, kv_policy = labels_of(params)
        observe_times(last, flux_mode, kv_policy)
        if not self.reports_enabled:
            if usage is not None:
                usage.enabled = False
            return
        prompt_tokens = len(last.prompt_token_ids or ())
        reports = reports_for(box, sorted(tokens))
        work = total_work(sequence_work(self.shape, prompt_tokens, tokens[i], reports[i])
                          for i in sorted(tokens))
        # every series of a label pair exists once one of its requests finished, zero or not,
        # so that ratios between them (the dashboard's speedup panels) are defined
        metrics.ATTENTION_FLOPS_DENSE.labels(flux_mode, kv_policy).inc(
            work.attention_flops_dense)
        metrics.ATTENTION_FLOPS_SAVED.labels(flux_mode, kv_policy).inc(work.attention_flops_saved)
        metrics.KV_BYTES_SAVED.labels(flux_mode, kv_policy).inc(work.kv_bytes_saved)
        if usage is not None:
            usage.works.append(work)


def attention_shape(model_config) -> AttentionShape:
    """The served model's ``AttentionShape`` from vLLM's ``ModelConfig`` (all heads, not one
    tensor-parallel rank's)."""
    text = model_config.hf_text_config
    return AttentionShape(num_layers=int(text.num_hidden_layers),
                          num_heads=int(text.num_attention_heads),
                          head_dim=int(model_config.get_head_size()))
