"""Hooks on vLLM's V1 model runner (CPU uses it; on GPU we pin it: VLLM_USE_V2_MODEL_RUNNER=0).

Wrapped methods, each calling the original unchanged:

- ``_update_states``: release the Flux and eviction state of finished/aborted requests (and
  the eviction state of preempted ones), close the prefill timers of requests whose prompt
  completed last step.
- ``_build_attention_metadata``: publish the batch (request ids in batch order, prompt lengths,
  computed tokens) so that our metadata builder can attach per-request routing.
- ``load_model``: for a stock model started with a standalone router
  (``additional_config={"flux_router": PATH}``), load the router and install routing.
- ``_sample`` and ``_bookkeeping_sync``: seeded sampling with chunked prefill on CPU (see
  ``_seeded_cpu_sampling``).

It also installs the prefix-cache salting of ``prefix_cache`` (API process).

Installed by ``attention_backends.plugin.register()`` in every process; idempotent.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import inspect
import logging
import sys
import time

from attention_backends import metrics
from attention_backends.request_state import BatchRow, get_registry
from kv_policies.runtime import get_runtime as get_kv_runtime

logger = logging.getLogger(__name__)

_MARK = "_fluxserve_wrapped"


def _wrap(cls, name: str, make):
    orig = getattr(cls, name)
    if getattr(orig, _MARK, False):
        return
    wrapped = functools.wraps(orig)(make(orig))
    setattr(wrapped, _MARK, True)
    setattr(cls, name, wrapped)


def _require(cls, name: str, params: tuple[str, ...]) -> None:
    """Fail at start-up, naming the vLLM method, if ``cls.name`` is gone or its leading
    parameters are no longer ``params``: the hook that wraps it relies on both."""
    orig = getattr(cls, name, None)
    if orig is None:
        raise RuntimeError(f"fluxserve hooks vLLM's {cls.__qualname__}.{name}, which this vLLM "
                           "version no longer has; fluxserve supports vLLM 0.32")
    got = tuple(inspect.signature(orig).parameters)[:len(params)]
    if got != params:
        raise RuntimeError(f"fluxserve hooks vLLM's {cls.__qualname__}.{name}{params}, but this "
                           f"vLLM version has {name}{got}; fluxserve supports vLLM 0.32")


def _discarded_cpu_generators(runner) -> dict[int, object]:
    """Batch row -> CPU ``torch.Generator`` of the seeded requests whose token this step
    samples and then discards (a partially prefilled prompt)."""
    gens = runner.input_batch.generators
    if not gens:
        return {}
    mask = runner.discard_request_mask.np[:runner.input_batch.num_reqs]
    return {i: g for i, g in gens.items()
            if i < len(mask) and mask[i] and g.device.type == "cpu"}


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


def _publish_batch(runner) -> None:
    ib = runner.input_batch
    rows: list[BatchRow | None] = []
    for i, req_id in enumerate(ib.req_ids):
        st = runner.requests.get(req_id) if req_id is not None else None
        if st is None:
            rows.append(None)
            continue
        rows.append(BatchRow(req_id, st.num_prompt_tokens, int(ib.num_computed_tokens_cpu[i])))
    get_registry().set_batch(rows)
    get_registry().extra_args_of = lambda rid: _extra_args(runner, rid)


def _extra_args(runner, req_id: str) -> dict | None:
    st = runner.requests.get(req_id)
    sp = getattr(st, "sampling_params", None) if st is not None else None
    return getattr(sp, "extra_args", None) if sp is not None else None


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
    from attention_backends.router import load_router_file
    from attention_backends.routing import attach_routers, install_routing

    routers, spec = load_router_file(path)
    dev = next(runner.model.parameters()).device
    routers = {i: r.to(dev) for i, r in routers.items()}
    attach_routers(runner.model, routers)
    n = install_routing(runner.model)
    if n != len(routers):
        raise ValueError(f"flux_router {path}: {len(routers)} routers for a {n}-layer model")
    reg.set_routers(routers, spec)
    logger.info("Loaded Flux router %s (%d layers, pool %d)", path, n, spec.pool_size)


_RUNNER_MODULES = ("vllm.v1.worker.gpu_model_runner", "vllm.v1.worker.cpu_model_runner")
_INPUT_MODULE = "vllm.v1.engine.input_processor"


def _install_prefix_cache_salt() -> None:
    if _INPUT_MODULE in sys.modules and hasattr(sys.modules[_INPUT_MODULE], "InputProcessor"):
        from attention_backends import prefix_cache

        prefix_cache.install()


_AFTER = {m: (lambda: _install_now()) for m in _RUNNER_MODULES}
_AFTER[_INPUT_MODULE] = _install_prefix_cache_salt


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs our installers right after the vLLM modules they patch are imported.

    Importing the model runner costs seconds; only worker processes do it, so the API and
    engine-core processes never pay for it on our account.
    """

    def find_spec(self, fullname, path, target=None):
        if fullname not in _AFTER:
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
            _AFTER[fullname]()

        spec.loader.exec_module = exec_module
        return spec


_FINDER: _AfterImport | None = None


def install() -> None:
    """Install the hooks now if the runner is imported, else right after it is."""
    global _FINDER
    if any(m in sys.modules for m in _RUNNER_MODULES):
        _install_now()
    _install_prefix_cache_salt()
    if _FINDER is None:
        _FINDER = _AfterImport()
        sys.meta_path.insert(0, _FINDER)


def _install_now() -> None:
    if "vllm.v1.worker.gpu_model_runner" not in sys.modules:
        return  # imported first by the CPU runner's own import of it; done when that finishes
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def make_update(orig):
        def _update_states(self, scheduler_output, *a, **kw):
            _release_finished(self, scheduler_output)
            return orig(self, scheduler_output, *a, **kw)
        return _update_states

    def make_build(orig):
        def _build_attention_metadata(self, *a, **kw):
            _publish_batch(self)
            try:
                return orig(self, *a, **kw)
            finally:
                get_registry().set_batch(None)
        return _build_attention_metadata

    def make_load(orig):
        def load_model(self, *a, **kw):
            out = orig(self, *a, **kw)
            _load_standalone_router(self)
            return out
        return load_model

    _seeded_cpu_sampling(GPUModelRunner)
    _wrap(GPUModelRunner, "_update_states", make_update)
    _wrap(GPUModelRunner, "_build_attention_metadata", make_build)
    _wrap(GPUModelRunner, "load_model", make_load)
    cpu = sys.modules.get("vllm.v1.worker.cpu_model_runner")
    runner_cls = getattr(cpu, "CPUModelRunner", None)
    # CPUModelRunner overrides load_model: wrap its own too (once its module has run).
    if runner_cls is not None and "load_model" in runner_cls.__dict__:
        _wrap(runner_cls, "load_model", make_load)


def _seeded_cpu_sampling(runner_cls) -> None:
    """Seeded sampling (``SamplingParams.seed``) with chunked prefill on CPU.

    vLLM samples every row of a step, then discards the token of a request whose prompt is only
    partially prefilled and rewinds that request's generator in ``_bookkeeping_sync`` with
    ``gen.set_offset(gen.get_offset() - 4)``: Philox offsets, which only CUDA generators have.
    A CPU generator (Mersenne Twister) raises ``RuntimeError: CPU Generator does not use
    offset`` and the engine dies (stock vLLM 0.32 on CPU too). Instead, for CPU generators, we
    save the full generator state before ``_sample`` and restore it after, and hide those
    generators from the offset rewind; CUDA generators keep vLLM's path. The random stream of a
    request thus advances only on the steps that keep its token, so the same seed gives the
    same text however the prompt is chunked.
    """
    _require(runner_cls, "_sample", ("self", "logits", "spec_decode_metadata"))
    _require(runner_cls, "_bookkeeping_sync", ("self", "scheduler_output", "sampler_output"))

    def make_sample(orig):
        def _sample(self, *a, **kw):
            saved = {i: (g, g.get_state()) for i, g in _discarded_cpu_generators(self).items()}
            out = orig(self, *a, **kw)
            for gen, state in saved.values():
                gen.set_state(state)
            return out
        return _sample

    def make_bookkeeping(orig):
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

    _wrap(runner_cls, "_sample", make_sample)
    _wrap(runner_cls, "_bookkeeping_sync", make_bookkeeping)
