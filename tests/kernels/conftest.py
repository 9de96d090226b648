"""Kernel tests run the Triton kernels on CPU tensors in Triton's interpreter.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is defined, Triton's own library
functions included, so it must be on before ``triton`` is first imported in the process. Other
test folders import vLLM (and with it Triton) at collection, so these tests run in a pytest
process of their own: ``make test`` runs ``TRITON_INTERPRET=1 pytest tests/kernels`` first, then
the rest. Collected in a process where Triton was imported without the interpreter, they are
skipped with that reason. ``FLUXSERVE_FORCE_TRITON`` routes ``attention_backends.kernels.ops`` to
the Triton path for CPU tensors; it is set per test only.
"""

import os
import sys

import pytest

_INTERPRETER_ON = "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1"
os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    if _INTERPRETER_ON:
        return
    skip = pytest.mark.skip(reason="Triton was imported before the interpreter was turned on: "
                                   "run `TRITON_INTERPRET=1 pytest tests/kernels` in its own "
                                   "process (make test does)")
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("FLUXSERVE_FORCE_TRITON", "1")
