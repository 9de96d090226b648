"""Kernel tests run the Triton kernels on CPU tensors in Triton's interpreter.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is defined, so it is set here, at
import time, before any test module imports the kernels. ``FLUXSERVE_FORCE_TRITON`` routes
``attention_backends.kernels.ops`` to the Triton path for CPU tensors; it is set per test only.
"""

import importlib
import os
import sys

import pytest

os.environ["TRITON_INTERPRET"] = "1"
# A test module collected before this folder may have imported the kernels already, as compiled-
# mode JIT functions that the interpreter cannot call: define them again in interpreter mode
# (paged_attention first: snapkv imports its helpers).
for _name in ("attention_backends.kernels.paged_attention", "attention_backends.kernels.snapkv"):
    if _name in sys.modules:
        importlib.reload(sys.modules[_name])


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("FLUXSERVE_FORCE_TRITON", "1")
