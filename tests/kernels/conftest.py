"""Kernel tests run the Triton kernels on CPU tensors in Triton's interpreter.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is defined, so it is set here, at
import time, before any test module imports the kernels. ``FLUXSERVE_FORCE_TRITON`` routes
``attention_backends.kernels.ops`` to the Triton path for CPU tensors; it is set per test only.
"""

import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("FLUXSERVE_FORCE_TRITON", "1")
