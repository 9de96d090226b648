"""The one-way layering of docs/architecture.md, as import-linter contracts in pyproject.toml:
kernels -> Flux routing | KV policies -> vLLM glue -> plugin -> server, no vLLM import
below the glue, none of vLLM, the server or the glue in the evaluation package; training
imports neither vLLM nor the glue nor the server, and nothing imports training."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("server", "attention_backends", "kv_policies", "evaluation", "training")


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(root)})


def test_imports_follow_the_layers():
    res = _lint_imports(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "5 kept, 0 broken" in res.stdout


def _copy_tree(tmp_path: Path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg,
                        ignore=shutil.ignore_patterns("__pycache__", "assets"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + line + "\n")


def test_an_import_against_the_direction_breaks_the_contract(tmp_path):
    root = _copy_tree(tmp_path)
    # a kernel reaching up into the glue, hidden inside a function as the old cycles were
    _append(root / "attention_backends" / "kernels" / "ops.py",
            "def _up():\n    from attention_backends.vllm_glue import metadata  # noqa: F401")
    res = _lint_imports(root)
    assert res.returncode == 1, res.stdout
    assert "attention_backends.kernels.ops -> attention_backends.vllm_glue.metadata" in res.stdout


def test_training_importing_the_server_breaks_the_contract(tmp_path):
    root = _copy_tree(tmp_path)
    _append(root / "training" / "data.py", "def _up():\n    from server import cli  # noqa: F401")
    res = _lint_imports(root)
    assert res.returncode == 1, res.stdout
    assert "training.data -> server.cli" in res.stdout


def test_vllm_below_the_glue_breaks_the_contract(tmp_path):
    root = _copy_tree(tmp_path)
    _append(root / "kv_policies" / "eviction" / "plan.py", "import vllm  # noqa: F401,E402")
    res = _lint_imports(root)
    assert res.returncode == 1, res.stdout
    assert "kv_policies.eviction.plan -> vllm" in res.stdout


def test_the_server_in_evaluation_breaks_the_contract(tmp_path):
    root = _copy_tree(tmp_path)
    _append(root / "evaluation" / "head_ablation.py",
            "def _up():\n    from server import default_model  # noqa: F401")
    res = _lint_imports(root)
    assert res.returncode == 1, res.stdout
    assert "evaluation.head_ablation -> server.default_model" in res.stdout
