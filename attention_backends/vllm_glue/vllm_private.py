"""Every private vLLM name fluxserve depends on, checked against the installed vLLM, and the hooks
installed on them.

vLLM has no public extension point for what these do, so they are the part of fluxserve that a
vLLM upgrade can break. ``PRIVATE_HOOKS`` lists each one; when the vLLM module that defines it is
imported (in whichever process imports it), ``check_hook`` verifies that the name still exists
with the parameters we rely on (``inspect.signature``) and raises ``PrivateAPIError`` naming the
installed vLLM version if not, before anything is patched. The hooks, each calling the original
unchanged:

- ``GPUModelRunner._update_states`` (wrapped; the CPU runner inherits it): release the Flux and
  eviction state of finished/aborted requests (and the eviction state of preempted ones), close
  the prefill timers of requests whose prompt completed last step.
- ``GPUModelRunner._build_attention_metadata`` (wrapped): publish the step's rows (request ids in
  batch order, prompt lengths, computed tokens, ``extra_args``) for the backends' metadata
  builders (``metadata.publish_batch``).
- ``GPUModelRunner._determine_batch_execution_and_padding`` (wrapped) and
  ``CudagraphDispatcher.dispatch`` (wrapped): the step's CUDA graph mode. A step with Flux or
  KV-policy rows never replays one of vLLM's FULL graphs (captured with dense kernels): a
  uniform decode batch replays our FULL graph of its size (``graph_inputs``), any other such
  step piecewise graphs at most; one that routes ``auto`` requests runs without graphs
  (``metadata.graph_constraint``). The rows it reads are kept for the
  ``_build_attention_metadata`` hook of the same step.
- ``CudagraphDispatcher.initialize_cudagraph_keys`` (wrapped) and
  ``GPUModelRunner._warmup_and_capture`` (wrapped): our FULL graphs, one per uniform decode
  size of vLLM's up to ``backend_gpu.our_graph_rows`` (our backend only), keyed by
  ``OurBatchDescriptor`` (``our_descriptor_cls``) and captured by vLLM next to its own, with
  our metadata builder in graph mode during their warm-up and capture.
- ``GPUModelRunner.load_model`` / ``CPUModelRunner.load_model`` (wrapped): for a stock model
  started with a standalone router (``additional_config={"flux_router": PATH}``), load the
  router and install routing.
- ``GPUModelRunner._sample`` / ``_bookkeeping_sync`` (wrapped; the CPU runner inherits them):
  seeded sampling with chunked prefill on CPU (see the sampling section below).
- ``GPUModelRunner.sample_tokens`` (wrapped; the CPU runner inherits it): attach the routing
  reports of the requests first run in this step (``flux.accounting``) to the step's
  ``ModelRunnerOutput``, which carries them to the scheduler (``kv_policies.vllm_glue``).
- ``InputProcessor.process_inputs`` (wrapped, API process): salt the prefix cache by the
  request's Flux options (``flux.prefix_cache``).
- ``OutputProcessor.process_outputs`` (wrapped, API process): take the engine's accounting
  reports out of each ``EngineCoreOutput.kv_transfer_params`` (where the scheduler put them)
  into the ``flux.accounting`` inbox, before vLLM builds its ``RequestOutput``.
- ``Scheduler._free_blocks`` (overridden by ``kv_policies.vllm_glue.scheduler``): observe the
  blocks a request holds when it finishes, drop its eviction plan, keep an unsent accounting
  report for the output the step may still build for it.
- ``SingleTypeKVCacheManager._remove_blocks_in_range`` (called by
  ``kv_policies.vllm_glue.manager``): free an evicted request's gap blocks.
- The CPU attention backend's internals that ``vllm_glue.backend_cpu`` relies on beyond
  subclassing it: ``CPUAttentionBackendImpl.do_kv_cache_update`` (called on a one-block scratch
  cache to find vLLM's CPU KV layout), ``CPUAttentionMetadataBuilder.build`` (called on a
  sub-batch's ``CommonAttentionMetadata.replace``), ``CPUAttentionMetadataBuilder.
  _set_isa_to_layers`` (sets ``layer.isa``, the ISA whose layout the cache holds), and vLLM's
  CPU attention ops ``vllm._custom_ops.cpu_attn_get_scheduler_metadata`` /
  ``cpu_attention_with_kv_cache`` (called for sparse rows with a sliding window over virtual
  block tables, ``kernels.sink_window``, and for compressed decode rows with their heads doubled
  and ``s_aux`` as a zero-valued extra logit, ``kernels.compressed_decode``, whose meaning the
  backend checks on a small case before first use).

The model runner is only imported by worker processes (it costs seconds), so hooks are installed
right after the module that defines them is imported (``_AfterImport``), never by importing it.
``install()`` is called by the plugin in every process; it is idempotent.

Adding a hook: one ``PrivateHook`` entry, and for a wrap one ``(owner, name, make)`` entry in
``_WRAPS`` with its ``make(orig) -> wrapper`` function (see the sampling section below).
"""

from __future__ import annotations

import copy
import functools
import importlib.abc
import importlib.util
import inspect
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from attention_backends.flux import metrics
from attention_backends.flux.accounting import REPORT_KEY, ROUTING_REPORTS_ATTR, get_inbox
from attention_backends.flux.prefix_cache import request_cache_salt
from attention_backends.flux.request_state import BatchRow, get_registry
from attention_backends.flux.router import load_router_file
from attention_backends.vllm_glue import metadata
from attention_backends.vllm_glue.routing_hooks import attach_routers, install_routing
from kv_policies.eviction.runtime import get_runtime as get_kv_runtime

logger = logging.getLogger(__name__)

TESTED_VLLM = "0.32.0"

_GPU_RUNNER = "vllm.v1.worker.gpu_model_runner"
_CPU_RUNNER = "vllm.v1.worker.cpu_model_runner"
_INPUT = "vllm.v1.engine.input_processor"
_OUTPUT = "vllm.v1.engine.output_processor"
_SCHEDULER = "vllm.v1.core.sched.scheduler"
_KV_MANAGER = "vllm.v1.core.single_type_kv_cache_manager"
_CPU_ATTN = "vllm.v1.attention.backends.cpu_attn"
_DISPATCHER = "vllm.v1.cudagraph_dispatcher"
_ATTN = "vllm.v1.attention.backend"
_OPS = "vllm._custom_ops"


@dataclass(frozen=True)
class PrivateHook:
    """A private vLLM attribute ``module.owner.name`` (``owner`` empty: ``module.name``) that
    fluxserve wraps, overrides or calls.

    ``params``: the parameter names it must start with, in order (ours pass the rest through).
    ``own_only``: checked only when ``owner`` defines it itself (a subclass override we wrap).
    """

    module: str
    owner: str
    name: str
    params: tuple[str, ...]
    use: str
    own_only: bool = False

    @property
    def qualname(self) -> str:
        return ".".join(p for p in (self.module, self.owner, self.name) if p)

    def owner_in(self, module) -> object | None:
        """The object that holds the name: ``module`` itself, or its attribute ``owner``."""
        return module if not self.owner else getattr(module, self.owner, None)


PRIVATE_HOOKS: tuple[PrivateHook, ...] = (
    PrivateHook(_GPU_RUNNER, "GPUModelRunner", "_update_states", ("self", "scheduler_output"),
                "wrapped: release finished/preempted requests' Flux and eviction state"),
    PrivateHook(_GPU_RUNNER, "GPUModelRunner", "_build_attention_metadata",
                ("self", "num_tokens", "num_reqs", "max_query_len"),
                "wrapped: publish the step's rows for the attention metadata builders"),
    PrivateHook(_GPU_RUNNER, "GPUModelRunner", "_determine_batch_execution_and_padding",
                ("self", "num_tokens", "num_reqs", "num_scheduled_tokens_np",
                 "max_num_scheduled_tokens", "use_cascade_attn", "allow_microbatching",
                 "force_eager"),
                "wrapped: no FULL graph for steps with Flux/KV-policy rows, none for routing"),
    PrivateHook(_DISPATCHER, "CudagraphDispatcher", "dispatch",
                ("self", "num_tokens", "uniform_decode", "has_lora", "num_active_loras",
                 "valid_modes", "invalid_modes"),
                "wrapped: a step with our rows replays our FULL graph of its size (uniform "
                "decode) or none (FULL added to invalid_modes)"),
    PrivateHook(_DISPATCHER, "CudagraphDispatcher", "initialize_cudagraph_keys",
                ("self", "cudagraph_mode", "uniform_decode_query_len"),
                "wrapped: add our FULL graphs' keys (uniform decode sizes up to "
                "graph_inputs.MAX_GRAPH_ROWS)"),
    PrivateHook(_GPU_RUNNER, "GPUModelRunner", "_warmup_and_capture",
                ("self", "desc", "cudagraph_runtime_mode"),
                "wrapped: mark the warm-up and capture of our FULL graphs"),
    PrivateHook(_GPU_RUNNER, "GPUModelRunner", "load_model", ("self", "load_dummy_weights"),
                "wrapped: load a standalone Flux router"),
    PrivateHook(_CPU_RUNNER, "CPUModelRunner", "load_model", ("self", "load_dummy_weights"),
                "wrapped: load a standalone Flux router (the CPU runner overrides it)",
                own_only=True),
    PrivateHook(_INPUT, "InputProcessor", "process_inputs",
                ("self", "request_id", "prompt", "params"),
                "wrapped: salt the prefix cache by the request's Flux options"),
    PrivateHook(_SCHEDULER, "Scheduler", "_free_blocks", ("self", "request"),
                "overridden by kv_policies.vllm_glue.scheduler: KV bytes held, drop the plan, "
                "keep the accounting report for the step's last output"),
    PrivateHook(_KV_MANAGER, "SingleTypeKVCacheManager", "_remove_blocks_in_range",
                ("self", "request_id", "first_block", "last_block"),
                "called by kv_policies.vllm_glue.manager: free an evicted request's gap"),
    PrivateHook(_GPU_RUNNER, "GPUModelRunner", "_sample",
                ("self", "logits", "spec_decode_metadata"),
                "wrapped: keep a CPU generator's state across a discarded partial-prefill sample"),
    PrivateHook(_GPU_RUNNER, "GPUModelRunner", "_bookkeeping_sync",
                ("self", "scheduler_output", "sampler_output"),
                "wrapped: hide CPU generators from vLLM's CUDA-only offset rewind"),
    PrivateHook(_GPU_RUNNER, "GPUModelRunner", "sample_tokens", ("self", "grammar_output"),
                "wrapped: attach the step's routing reports to its ModelRunnerOutput"),
    PrivateHook(_OUTPUT, "OutputProcessor", "process_outputs",
                ("self", "engine_core_outputs"),
                "wrapped: take the engine's accounting reports out of kv_transfer_params"),
    PrivateHook(_CPU_ATTN, "CPUAttentionBackendImpl", "do_kv_cache_update",
                ("self", "layer", "key", "value", "kv_cache", "slot_mapping"),
                "called by the CPU backend on a scratch block: probes vLLM's CPU KV layout"),
    PrivateHook(_CPU_ATTN, "CPUAttentionMetadataBuilder", "build",
                ("self", "common_prefix_len", "common_attn_metadata"),
                "called by the CPU backend for the rows that need no mask (a sub-batch)"),
    PrivateHook(_CPU_ATTN, "CPUAttentionMetadataBuilder", "_set_isa_to_layers",
                ("self", "layer_names"),
                "sets layer.isa, which the CPU backend reads as its KV layout's key"),
    PrivateHook(_ATTN, "CommonAttentionMetadata", "replace", ("self",),
                "called by the CPU backend: a sub-batch's metadata"),
    PrivateHook(_OPS, "", "cpu_attn_get_scheduler_metadata",
                ("num_reqs", "num_heads", "num_kv_heads", "head_dim", "seq_lens", "dtype",
                 "query_start_loc", "causal", "sliding_window_size", "isa", "enable_kv_split"),
                "called by the CPU backend: scheduler metadata of sparse rows' virtual tables"),
    PrivateHook(_OPS, "", "cpu_attention_with_kv_cache",
                ("query", "key_cache", "value_cache", "output", "query_start_loc", "seq_lens",
                 "scale", "causal", "alibi_slopes", "sliding_window", "block_table", "softcap",
                 "scheduler_metadata", "s_aux"),
                "called by the CPU backend: sparse rows as sliding-window attention, compressed "
                "decode rows with a sink logit"),
)


class PrivateAPIError(RuntimeError):
    """The installed vLLM lacks a private name fluxserve hooks, or its signature changed."""


def _vllm_version() -> str:
    try:
        from vllm import __version__
    except ImportError:
        return "unknown"
    return __version__


def check_hook(hook: PrivateHook, owner: type | None) -> None:
    """Raise ``PrivateAPIError`` unless ``owner`` (None: missing) has ``hook.name`` whose
    parameters start with ``hook.params``."""
    where = (f"fluxserve hooks vLLM's private {hook.qualname} ({hook.use}); the installed vLLM "
             f"{_vllm_version()} (fluxserve is tested with {TESTED_VLLM})")
    attr = getattr(owner, hook.name, None) if owner is not None else None
    if attr is None:
        raise PrivateAPIError(f"{where} has no such attribute. Install vLLM {TESTED_VLLM} or "
                              f"port {__name__} to this version.")
    if hook.own_only and hook.name not in owner.__dict__:
        return
    try:
        names = tuple(inspect.signature(attr).parameters)
    except (TypeError, ValueError) as e:
        raise PrivateAPIError(f"{where}: its signature cannot be read ({e}).") from e
    if names[:len(hook.params)] != hook.params:
        raise PrivateAPIError(
            f"{where} has parameters {names}, expected them to start with {hook.params}. "
            f"Install vLLM {TESTED_VLLM} or port {__name__} to this version.")


def check_module(module_name: str) -> None:
    """Check every hook defined in ``module_name`` (which must be imported)."""
    module = sys.modules[module_name]
    for hook in PRIVATE_HOOKS:
        if hook.module == module_name:
            check_hook(hook, hook.owner_in(module))


# ------------------------------------------------------------------ the hooks' bodies


def _release_finished(runner, scheduler_output) -> None:
    reg = get_registry()
    now = time.monotonic()
    # Requests whose prompt completed in the previous step: their prefill ends here.
    for st in reg.states.values():
        if st.prefill_done_at is None and st.prompt_done_pending:
            st.prefill_done_at = now
            metrics.observe_prefill(st, now - st.created)
    kv = get_kv_runtime()
    for req_id in getattr(scheduler_output, "finished_req_ids", ()) or ():
        st = reg.release(req_id)
        if st is not None:
            metrics.observe_finished(st, now)
        kv.release(req_id)
    # A preempted request recomputes its prompt with full attention and is compressed again
    # when the recompute passes the prompt's end: calibration state kept across the preemption
    # would be merged into the recompute's attention. Its routing decision stays.
    for req_id in getattr(scheduler_output, "preempted_req_ids", ()) or ():
        kv.release(req_id)


def _batch_rows(runner) -> list[BatchRow | None]:
    ib = runner.input_batch
    rows: list[BatchRow | None] = []
    for i, req_id in enumerate(ib.req_ids):
        st = runner.requests.get(req_id) if req_id is not None else None
        if st is None:
            rows.append(None)
            continue
        sp = getattr(st, "sampling_params", None)
        rows.append(BatchRow(req_id, st.num_prompt_tokens, int(ib.num_computed_tokens_cpu[i]),
                             getattr(sp, "extra_args", None) if sp is not None else None))
    return rows


def _load_standalone_router(runner) -> None:
    cfg = getattr(runner.vllm_config, "additional_config", None) or {}
    reg = get_registry()
    default = cfg.get("flux_default") if isinstance(cfg, dict) else None
    if default:
        reg.default_options = dict(default)
    path = cfg.get("flux_router") if isinstance(cfg, dict) else None
    if not path:
        return
    if reg.has_router:
        logger.warning("flux_router %s ignored: the checkpoint ships its own routers", path)
        return
    routers, spec = load_router_file(path)
    dev = next(runner.model.parameters()).device
    routers = {i: r.to(dev) for i, r in routers.items()}
    attach_routers(runner.model, routers)
    n = install_routing(runner.model)
    if n != len(routers):
        raise ValueError(f"flux_router {path}: {len(routers)} routers for a {n}-layer model")
    reg.set_routers(routers, spec)
    logger.info("Loaded Flux router %s (%d layers, pool %d)", path, n, spec.pool_size)


def _make_update_states(orig):
    def _update_states(self, scheduler_output, *a, **kw):
        _release_finished(self, scheduler_output)
        return orig(self, scheduler_output, *a, **kw)
    return _update_states


# rows read by the graph-mode hook, for the metadata hook of the same step: (runner id, rows)
_STEP_ROWS: tuple[int, list[BatchRow | None]] | None = None
# graph_constraint of the step dispatching its graph mode (NO_FULL / OUR_FULL: our rows)
_NEED: str | None = None
# set while vLLM warms up and captures one of our FULL graphs (``_warmup_and_capture``)
_CAPTURING_OURS = False


@functools.cache
def our_descriptor_cls() -> type:
    """``OurBatchDescriptor``: vLLM's ``BatchDescriptor`` of a uniform decode batch, as the key
    of our FULL graph of that batch size (``graph_inputs``). A subclass with the same fields: it
    equals no ``BatchDescriptor``, so both graphs of a size live side by side in vLLM's
    dispatcher keys and graph wrappers."""
    from vllm.forward_context import BatchDescriptor

    @dataclass(frozen=True)
    class OurBatchDescriptor(BatchDescriptor):
        pass

    return OurBatchDescriptor


def _ours(desc):
    fields = {f: getattr(desc, f) for f in desc.__dataclass_fields__}
    return our_descriptor_cls()(**fields)


def _step_rows(runner) -> list[BatchRow | None]:
    global _STEP_ROWS
    stash, _STEP_ROWS = _STEP_ROWS, None
    if stash is not None and stash[0] == id(runner):
        return stash[1]
    return _batch_rows(runner)


def _make_build_attention_metadata(orig):
    def _build_attention_metadata(self, *a, **kw):
        metadata.publish_batch(_step_rows(self))
        try:
            return orig(self, *a, **kw)
        finally:
            metadata.publish_batch(None)
    return _build_attention_metadata


def _graphs_on(runner) -> bool:
    mode = getattr(getattr(runner, "compilation_config", None), "cudagraph_mode", None)
    return mode is not None and getattr(mode, "name", "NONE") != "NONE"


def _make_determine_batch_execution(orig):
    def _determine_batch_execution_and_padding(self, *a, **kw):
        global _NEED, _STEP_ROWS
        if not _graphs_on(self):  # eager engines (and the CPU): nothing to decide
            metadata.note_graph(None)
            return orig(self, *a, **kw)
        if _CAPTURING_OURS:  # the dummy runs of our graph's warm-up and capture: no rows
            _NEED = metadata.OUR_FULL
            try:
                out = orig(self, *a, **kw)
            finally:
                _NEED = None
            metadata.note_graph(metadata.OUR_FULL)
            return out
        rows = _batch_rows(self)
        _STEP_ROWS = (id(self), rows)
        q_lens = a[2] if len(a) > 2 else kw.get("num_scheduled_tokens_np")
        layers = getattr(self, "_fluxserve_num_layers", None)
        if layers is None:  # read from the config once per runner: microseconds a step
            layers = self._fluxserve_num_layers = metadata.num_layers(self.vllm_config)
        need = metadata.graph_constraint(rows, layers, self.cache_config.block_size,
                                         q_lens=q_lens)
        if need == metadata.EAGER:
            kw["force_eager"] = True
        _NEED = need
        try:
            out = orig(self, *a, **kw)
        finally:
            _NEED = None
        mode = getattr(out[0], "name", "")
        if isinstance(out[1], our_descriptor_cls()):
            metadata.note_graph(metadata.OUR_FULL)
        else:
            metadata.note_graph(metadata.VLLM_FULL if mode == "FULL" else None)
        if need is not None:
            metrics.observe_option_step("full" if mode == "FULL" else
                                        "piecewise" if mode == "PIECEWISE" else "none")
        return out
    return _determine_batch_execution_and_padding


def _make_dispatch(orig):
    def dispatch(self, num_tokens, *a, **kw):
        if _NEED not in (metadata.NO_FULL, metadata.OUR_FULL):
            return orig(self, num_tokens, *a, **kw)
        from vllm.config import CUDAGraphMode

        if _NEED == metadata.OUR_FULL:
            # a uniform decode batch with a FULL graph of its size: ours of that size, if any
            mode, desc = orig(self, num_tokens, *a, **kw)
            if mode == CUDAGraphMode.FULL and desc is not None and desc.uniform:
                ours = _ours(desc)
                if ours in self.cudagraph_keys[CUDAGraphMode.FULL]:
                    return mode, ours
        kw["invalid_modes"] = set(kw.get("invalid_modes") or ()) | {CUDAGraphMode.FULL}
        return orig(self, num_tokens, *a, **kw)
    return dispatch


def _make_initialize_cudagraph_keys(orig):
    def initialize_cudagraph_keys(self, cudagraph_mode, uniform_decode_query_len=1, *a, **kw):
        out = orig(self, cudagraph_mode, uniform_decode_query_len, *a, **kw)
        if uniform_decode_query_len != 1 or cudagraph_mode.decode_mode() != type(
                cudagraph_mode).FULL:
            return out
        from attention_backends.vllm_glue.backend_gpu import our_graph_rows

        rows = our_graph_rows(self.vllm_config)  # what our metadata builder allocates
        if rows:
            from vllm.config import CUDAGraphMode

            full = self.cudagraph_keys[CUDAGraphMode.FULL]
            for desc in list(full):
                if (desc.uniform and not desc.has_lora and desc.num_reqs is not None
                        and desc.num_reqs <= rows):
                    full.add(_ours(desc))
        return out
    return initialize_cudagraph_keys


def _make_warmup_and_capture(orig):
    def _warmup_and_capture(self, desc, *a, **kw):
        global _CAPTURING_OURS
        if not isinstance(desc, our_descriptor_cls()):
            return orig(self, desc, *a, **kw)
        _CAPTURING_OURS = True
        try:
            return orig(self, desc, *a, **kw)
        finally:
            _CAPTURING_OURS = False
    return _warmup_and_capture


def _make_load_model(orig):
    def load_model(self, *a, **kw):
        out = orig(self, *a, **kw)
        _load_standalone_router(self)
        return out
    return load_model


def _make_process_inputs(orig):
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        req = orig(self, request_id, prompt, params, *args, **kwargs)
        req.cache_salt = request_cache_salt(req.cache_salt, getattr(params, "extra_args", None),
                                            request_id)
        return req
    return process_inputs


# -- accounting: the engine's per-request reports (``flux.accounting``) travel worker -> scheduler
# as an attribute of the step's ``ModelRunnerOutput`` (pickled with it between processes; a
# dataclass, so the attribute survives), then scheduler -> API process in the request's
# ``EngineCoreOutput.kv_transfer_params``, vLLM's free-form per-request dict returned to the
# API process. Nothing is added to a step without reports.


def _with_routing_reports(out, reports: dict[str, dict]):
    """``out`` (what ``sample_tokens`` returned) carrying ``reports``."""
    from vllm.v1.outputs import (
        EMPTY_MODEL_RUNNER_OUTPUT,
        AsyncModelRunnerOutput,
        ModelRunnerOutput,
    )

    if isinstance(out, AsyncModelRunnerOutput):  # async scheduling: the output comes later
        get_output = out.get_output

        def get_output_with_reports():
            return _with_routing_reports(get_output(), reports)

        out.get_output = get_output_with_reports
        return out
    if not isinstance(out, ModelRunnerOutput):  # a pipeline stage's intermediate tensors
        return out
    if out is EMPTY_MODEL_RUNNER_OUTPUT:  # a shared constant
        out = copy.copy(out)
    setattr(out, ROUTING_REPORTS_ATTR, reports)
    return out


def _make_sample_tokens(orig):
    def sample_tokens(self, *a, **kw):
        out = orig(self, *a, **kw)
        reports = get_registry().take_routing_reports()
        return _with_routing_reports(out, reports) if reports else out
    return sample_tokens


def _take_engine_reports(processor, engine_core_outputs) -> None:
    inbox = get_inbox()
    for eco in engine_core_outputs:
        params = eco.kv_transfer_params
        if not params or REPORT_KEY not in params:
            continue
        params = dict(params)
        report = params.pop(REPORT_KEY)
        eco.kv_transfer_params = params or None
        state = processor.request_states.get(eco.request_id)
        if state is not None:
            inbox.deliver(state.external_req_id, state.request_index, report)


def _make_process_outputs(orig):
    def process_outputs(self, engine_core_outputs, *a, **kw):
        _take_engine_reports(self, engine_core_outputs)
        return orig(self, engine_core_outputs, *a, **kw)
    return process_outputs


# -- sampling: seeded sampling (``SamplingParams.seed``) with chunked prefill on CPU.
#
# vLLM samples every row of a step, then discards the token of a request whose prompt is only
# partially prefilled and rewinds that request's generator in ``_bookkeeping_sync`` with
# ``gen.set_offset(gen.get_offset() - 4)``: Philox offsets, which only CUDA generators have. A CPU
# generator (Mersenne Twister) raises ``RuntimeError: CPU Generator does not use offset`` and the
# engine dies (stock vLLM 0.32 on CPU too). For CPU generators we instead save the full generator
# state before ``_sample`` and restore it after, and hide them from the offset rewind; CUDA
# generators keep vLLM's path. A request's random stream thus advances only on the steps that
# keep its token, so the same seed gives the same text however the prompt is chunked.


def _discarded_cpu_generators(runner) -> dict[int, object]:
    """Batch row -> CPU ``torch.Generator`` of the seeded requests whose token this step
    samples and then discards (a partially prefilled prompt)."""
    gens = runner.input_batch.generators
    if not gens:
        return {}
    mask = runner.discard_request_mask.np[:runner.input_batch.num_reqs]
    return {i: g for i, g in gens.items()
            if i < len(mask) and mask[i] and g.device.type == "cpu"}


def _make_sample(orig):
    def _sample(self, *a, **kw):
        saved = [(g, g.get_state()) for g in _discarded_cpu_generators(self).values()]
        out = orig(self, *a, **kw)
        for gen, state in saved:
            gen.set_state(state)
        return out
    return _sample


def _make_bookkeeping_sync(orig):
    def _bookkeeping_sync(self, *a, **kw):
        skip = _discarded_cpu_generators(self)
        if not skip:
            return orig(self, *a, **kw)
        gens = self.input_batch.generators
        # The sampling metadata holds this same dict: swap the attribute, not the contents.
        self.input_batch.generators = {i: g for i, g in gens.items() if i not in skip}
        try:
            return orig(self, *a, **kw)
        finally:
            self.input_batch.generators = gens
    return _bookkeeping_sync


# (module, owner, name, make): wrapped right after ``module`` is imported, once checked.
_WRAPS: tuple[tuple[str, str, str, Callable], ...] = (
    (_GPU_RUNNER, "GPUModelRunner", "_update_states", _make_update_states),
    (_GPU_RUNNER, "GPUModelRunner", "_build_attention_metadata", _make_build_attention_metadata),
    (_GPU_RUNNER, "GPUModelRunner", "_determine_batch_execution_and_padding",
     _make_determine_batch_execution),
    (_DISPATCHER, "CudagraphDispatcher", "dispatch", _make_dispatch),
    (_DISPATCHER, "CudagraphDispatcher", "initialize_cudagraph_keys",
     _make_initialize_cudagraph_keys),
    (_GPU_RUNNER, "GPUModelRunner", "_warmup_and_capture", _make_warmup_and_capture),
    (_GPU_RUNNER, "GPUModelRunner", "load_model", _make_load_model),
    (_CPU_RUNNER, "CPUModelRunner", "load_model", _make_load_model),
    (_INPUT, "InputProcessor", "process_inputs", _make_process_inputs),
    (_GPU_RUNNER, "GPUModelRunner", "_sample", _make_sample),
    (_GPU_RUNNER, "GPUModelRunner", "_bookkeeping_sync", _make_bookkeeping_sync),
    (_GPU_RUNNER, "GPUModelRunner", "sample_tokens", _make_sample_tokens),
    (_OUTPUT, "OutputProcessor", "process_outputs", _make_process_outputs),
)

_MARK = "_fluxserve_wrapped"


def _wrap(cls, name: str, make) -> None:
    orig = getattr(cls, name)
    if getattr(orig, _MARK, False):
        return
    wrapped = functools.wraps(orig)(make(orig))
    setattr(wrapped, _MARK, True)
    setattr(cls, name, wrapped)


def _on_import(module_name: str) -> None:
    """Check the hooks of a just-imported vLLM module, then install its wraps."""
    check_module(module_name)
    module = sys.modules[module_name]
    for mod, owner, name, make in _WRAPS:
        if mod != module_name:
            continue
        cls = getattr(module, owner)
        # CPUModelRunner overrides load_model; other inherited methods are wrapped on the base.
        if name in cls.__dict__:
            _wrap(cls, name, make)


_MODULES = tuple(dict.fromkeys(h.module for h in PRIVATE_HOOKS))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``_on_import`` right after the vLLM modules it hooks are imported.

    Importing the model runner costs seconds; only worker processes do it, so the API and
    engine-core processes never pay for it on our account.
    """

    def find_spec(self, fullname, path, target=None):
        if fullname not in _MODULES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        orig_exec = spec.loader.exec_module

        def exec_module(module):
            orig_exec(module)
            _on_import(fullname)

        spec.loader.exec_module = exec_module
        return spec


_FINDER: _AfterImport | None = None


def install() -> None:
    """Check and install the hooks of the modules already imported, the others once they are."""
    global _FINDER
    for name in _MODULES:
        if name in sys.modules:
            _on_import(name)
    if _FINDER is None:
        _FINDER = _AfterImport()
        sys.meta_path.insert(0, _FINDER)
