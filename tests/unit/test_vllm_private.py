"""The start-up check of the private vLLM names fluxserve hooks (vllm_glue.vllm_private)."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import vllm

from attention_backends.vllm_glue import vllm_private as vp


def test_every_private_hook_exists_in_the_installed_vllm():
    for hook in vp.PRIVATE_HOOKS:
        module = importlib.import_module(hook.module)
        vp.check_hook(hook, hook.owner_in(module))


def test_every_wrap_is_a_listed_private_hook():
    listed = {(h.module, h.owner, h.name) for h in vp.PRIVATE_HOOKS}
    assert {(m, o, n) for m, o, n, _ in vp._WRAPS} <= listed


def _hook(**kw) -> vp.PrivateHook:
    base = dict(module="vllm.fake", owner="Runner", name="_update_states",
                params=("self", "scheduler_output"), use="test")
    return vp.PrivateHook(**{**base, **kw})


def test_a_changed_signature_fails_naming_the_vllm_version():
    class Runner:
        def _update_states(self, output, extra=None):  # renamed parameter
            pass

    with pytest.raises(vp.PrivateAPIError) as err:
        vp.check_hook(_hook(), Runner)
    msg = str(err.value)
    assert "vllm.fake.Runner._update_states" in msg
    assert vllm.__version__ in msg and vp.TESTED_VLLM in msg
    assert "('self', 'output', 'extra')" in msg


def test_a_missing_name_or_owner_fails():
    with pytest.raises(vp.PrivateAPIError, match="has no such attribute"):
        vp.check_hook(_hook(), type("Runner", (), {}))
    with pytest.raises(vp.PrivateAPIError, match="has no such attribute"):
        vp.check_hook(_hook(), None)


def test_extra_trailing_parameters_pass():
    class Runner:
        def _update_states(self, scheduler_output, new_flag=False):
            pass

    vp.check_hook(_hook(), Runner)


def test_an_inherited_override_is_not_required():
    class Base:
        def load_model(self, load_dummy_weights=False):
            pass

    hook = _hook(name="load_model", params=("self", "load_dummy_weights"), own_only=True)
    vp.check_hook(hook, type("Runner", (Base,), {}))


def test_a_mismatch_stops_the_install_before_anything_is_patched(monkeypatch):
    """What a worker sees when the runner module of an unexpected vLLM is imported."""

    class Runner:
        def _update_states(self, output):
            pass

        def load_model(self, load_dummy_weights=False):
            pass

    orig = Runner.load_model
    fake = types.ModuleType("vllm.fake")
    fake.Runner = Runner
    monkeypatch.setitem(sys.modules, "vllm.fake", fake)
    monkeypatch.setattr(vp, "PRIVATE_HOOKS", (
        _hook(name="load_model", params=("self", "load_dummy_weights")), _hook()))
    monkeypatch.setattr(vp, "_WRAPS", (("vllm.fake", "Runner", "load_model",
                                        vp._make_load_model),))
    with pytest.raises(vp.PrivateAPIError, match="_update_states"):
        vp._on_import("vllm.fake")
    assert Runner.load_model is orig
