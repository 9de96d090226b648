"""Fixtures shared by the test folders. Nothing heavy is imported here: tests/kernels needs
Triton's interpreter turned on before Triton is first imported (tests/kernels/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def model_dir() -> str:
    """The embedded smoke-test checkpoint's directory (made on first use)."""
    from server.default_model import ensure_default_model

    return str(ensure_default_model())
