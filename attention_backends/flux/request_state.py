"""Worker-side per-request Flux state: which layers of a request run sparse attention.

One registry per worker process. A request's entry is created the first time it is seen in a
batch (from ``SamplingParams.extra_args["flux"]``), its decisions are fixed at its first prefill
step (for ``auto``, by the routers during that step's forward) and reused for every later chunk
and decode step, and the entry is dropped when vLLM reports the request finished or aborted.
Preempted requests keep their entry, so a recomputed prefill keeps its first decisions.

No vLLM import: the vLLM glue (``attention_backends.vllm_glue``) describes each step's rows as
``BatchRow`` and releases finished requests.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from attention_backends.flux.accounting import RoutingReport
from attention_backends.flux.options import EXTRA_ARGS_KEY, FluxOptions
from attention_backends.flux.router import DEFAULT_SINK, DEFAULT_WINDOW, FluxRouter, RouterSpec

logger = logging.getLogger(__name__)

TRACE_ENV = "FLUXSERVE_FLUX_TRACE"  # path: append one JSON line per routed request (debugging)


@dataclass
class FluxRequestState:
    req_id: str
    mode: str
    sink: int
    window: int
    prompt_len: int
    # [num_layers] bool, True = sparse; None until an ``auto`` request is routed.
    sparse: torch.Tensor | None
    routed_layers: set[int] = field(default_factory=set)  # auto: layers decided so far
    created: float = field(default_factory=time.monotonic)
    prefill_done_at: float | None = None
    prompt_done_pending: bool = False  # the prompt completed in the step being run


@dataclass(frozen=True, slots=True)
class BatchRow:
    """One request of the step about to run, as the model runner sees it."""

    req_id: str
    prompt_len: int
    num_computed: int  # tokens computed before this step
    extra_args: dict | None = None  # the request's ``SamplingParams.extra_args``


class FluxRegistry:
    """Per-process request registry plus the loaded routers."""

    def __init__(self) -> None:
        self.states: dict[str, FluxRequestState] = {}
        self.routers: dict[int, FluxRouter] = {}
        self.spec = RouterSpec()
        self.default_options: dict | None = None  # engine-side default for plain vLLM requests
        # Requests created since the last ``take_routing_reports`` that run some layer sparse
        # (or may: ``auto``), with the model's layer count: their routing is reported once.
        self._unreported: dict[str, int] = {}
        # Changes whenever a request's state is created, released or gets a routing decision:
        # a step's metadata built at one version holds for the same rows at that version.
        self.version = 0

    # -- routers --------------------------------------------------------------------------
    def set_routers(self, routers: dict[int, FluxRouter], spec: RouterSpec) -> None:
        self.routers = dict(routers)
        self.spec = spec

    @property
    def has_router(self) -> bool:
        return bool(self.routers)

    # -- requests -------------------------------------------------------------------------
    def resolve(self, req_id: str, extra_args: dict | None, prompt_len: int,
                num_layers: int) -> FluxRequestState:
        """Get or create the request's state from its sampling params' extra_args."""
        st = self.states.get(req_id)
        if st is not None:
            return st
        raw = (extra_args or {}).get(EXTRA_ARGS_KEY) or self.default_options
        try:
            opts = FluxOptions.model_validate(raw) if raw else FluxOptions()
        except ValueError as e:
            # The server validates; a malformed dict from a plain vLLM caller must not take the
            # worker down: run the request with full attention.
            logger.warning("request %s: invalid flux options (%s); running full", req_id, e)
            opts = FluxOptions()
        mode = opts.mode
        if mode == "auto" and not self.has_router:
            # The server rejects this with a 400; plain vLLM callers get full attention.
            logger.warning("flux.mode=auto without a router loaded: request %s runs full", req_id)
            mode = "full"
        sink = opts.sink if opts.sink is not None else (self.spec.sink if self.has_router
                                                        else DEFAULT_SINK)
        window = opts.window if opts.window is not None else (
            self.spec.window if self.has_router else DEFAULT_WINDOW)
        sparse: torch.Tensor | None
        if mode == "full":
            sparse = torch.zeros(num_layers, dtype=torch.bool)
        elif mode == "sparse":
            sparse = torch.ones(num_layers, dtype=torch.bool)
        elif mode == "layers":
            sparse = torch.zeros(num_layers, dtype=torch.bool)
            for i in opts.sparse_layers or []:
                if i < num_layers:
                    sparse[i] = True
        else:
            sparse = None
        st = FluxRequestState(req_id, mode, int(sink), int(window), prompt_len, sparse)
        self.states[req_id] = st
        self.version += 1
        if mode != "full":
            self._unreported[req_id] = num_layers
        return st

    def take_routing_reports(self) -> dict[str, dict]:
        """The routing reports (``RoutingReport.to_wire()``, by request id) of the non-``full``
        requests created since the last call, and forget them.

        Call it after the forward of the step that created them: their decisions are final then
        (``auto`` routes every layer in the first step that schedules the request; a layer
        without a router runs full attention). Returns ``{}`` at once when there is nothing to
        report, which is every step of a batch of ``full`` requests."""
        if not self._unreported:
            return {}
        out: dict[str, dict] = {}
        for req_id, num_layers in self._unreported.items():
            st = self.states.get(req_id)
            if st is None:
                continue
            sparse = (tuple(bool(x) for x in st.sparse.tolist()) if st.sparse is not None
                      else (False,) * num_layers)
            out[req_id] = RoutingReport(sparse, st.sink, st.window).to_wire()
        self._unreported.clear()
        return out

    def record_decision(self, req_id: str, layer: int, sparse: bool, num_layers: int) -> None:
        st = self.states.get(req_id)
        if st is None:
            return
        if st.sparse is None:
            st.sparse = torch.zeros(num_layers, dtype=torch.bool)
        st.sparse[layer] = sparse
        st.routed_layers.add(layer)
        self.version += 1
        if len(st.routed_layers) == num_layers:
            _trace(st)

    def release(self, req_id: str) -> FluxRequestState | None:
        self._unreported.pop(req_id, None)
        self.version += 1
        return self.states.pop(req_id, None)


def _trace(st: FluxRequestState) -> None:
    path = os.environ.get(TRACE_ENV)
    if not path or st.sparse is None:
        return
    from attention_backends.flux.parallel import tp_rank

    line = json.dumps({"req_id": st.req_id, "sparse": [bool(x) for x in st.sparse.tolist()],
                       "prompt_len": st.prompt_len, "tp_rank": tp_rank()})
    with open(path, "a") as f:
        f.write(line + "\n")


_REGISTRY = FluxRegistry()


def get_registry() -> FluxRegistry:
    return _REGISTRY
