"""Builds the CPU image with a real Docker engine, runs it, and serves a request through it.

Needs a Docker engine with BuildKit (Docker >= 20.10) and a Debian bookworm base image. On CI
(`CI=true`) both are prepared by `scripts/ci_machine_setup.sh` (called by `.ci/run`), and a
missing engine FAILS this test. On a developer machine without Docker it is skipped.

Environment:
- FLUXSERVE_DOCKER_BASE_IMAGE: the CPU base image (default local/debian:bookworm, made by
  scripts/docker_base_image.sh; `debian:bookworm-slim` where a registry is reachable).
- FLUXSERVE_TORCH_WHEELS_DIR: a folder of wheels pip takes first (default /opt/wheels when it
  holds torch's CPU wheel, which the registry does not have); imported as an image and passed
  as the Dockerfile's TORCH_WHEELS stage.
- FLUXSERVE_DOCKER_CA_BUNDLE: a CA bundle passed as the BuildKit secret `ca_bundle` (default the
  system bundle, /etc/ssl/certs/ca-certificates.crt, when it exists).
- FLUXSERVE_DOCKER_PIP_EXTRA_INDEX_URL: overrides the Dockerfile's PyTorch CPU index; empty by
  default when the wheels folder is used, so pip does not retry an unreachable index per package.

Build and run timings are written to build/container-test/timings.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "fluxserve:cpu-test"
API_KEY = "container-test-key"
MODEL = "fluxserve-tiny-smoke-test"
UID = 10001
GRACE_S = 30  # Kubernetes' default terminationGracePeriodSeconds
BUILD_TIMEOUT_S = 3600
READY_TIMEOUT_S = 600
TIMINGS = ROOT / "build" / "container-test" / "timings.json"

pytestmark = [pytest.mark.container, pytest.mark.timeout(BUILD_TIMEOUT_S + 1200)]


def _on_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"true", "1", "yes"}


def _unavailable(reason: str) -> None:
    if _on_ci():
        pytest.fail(f"CI=true and {reason}: .ci/run runs scripts/ci_machine_setup.sh to prepare "
                    "the machine")
    pytest.skip(f"{reason} (the container test needs a Docker engine with BuildKit; "
                "see scripts/ci_machine_setup.sh)")


def _docker_cli() -> str:
    # Debian's docker.io CLI (20.10) builds with BuildKit built in. A newer CLI earlier on PATH
    # refuses DOCKER_BUILDKIT=1 unless its buildx plugin is installed.
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and Path(candidate).exists():
            return candidate
    _unavailable("no docker CLI on this machine")
    raise AssertionError("unreachable")


class Docker:
    def __init__(self, cli: str, log_dir: Path):
        self.cli = cli
        self.log_dir = log_dir

    def __call__(self, *args: str, timeout: float = 120, check: bool = True,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run([self.cli, *args], capture_output=True, text=True,
                              timeout=timeout, env=env)
        if check and proc.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} -> {proc.returncode}\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def image_exists(self, ref: str) -> bool:
        return self("image", "inspect", ref, check=False).returncode == 0


def _wheels_image(docker: Docker) -> str | None:
    """Imports the wheels folder as a files-only image, named by its content (so a rebuild with
    the same wheels hits the layer cache). None when there is no such folder."""
    folder = Path(os.environ.get("FLUXSERVE_TORCH_WHEELS_DIR", "/opt/wheels"))
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if not wheels:
        return None
    digest = hashlib.sha256()
    for wheel in wheels:
        digest.update(f"{wheel.name}:{wheel.stat().st_size}:{wheel.stat().st_mtime_ns}\n".encode())
    ref = f"local/fluxserve-wheels:{digest.hexdigest()[:16]}"
    if not docker.image_exists(ref):
        tar = subprocess.Popen(["tar", "-C", str(folder), "-c", *[w.name for w in wheels]],
                               stdout=subprocess.PIPE)
        imported = subprocess.run([docker.cli, "import", "-", ref], stdin=tar.stdout,
                                  capture_output=True, text=True, timeout=600)
        tar.wait()
        assert imported.returncode == 0 and tar.returncode == 0, imported.stderr
    return ref


def _record_timing(key: str, seconds: float) -> None:
    TIMINGS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(TIMINGS.read_text()) if TIMINGS.exists() else {}
    data[key] = round(seconds, 1)
    TIMINGS.write_text(json.dumps(data, indent=2) + "\n")


@pytest.fixture(scope="module")
def docker(tmp_path_factory: pytest.TempPathFactory) -> Docker:
    cli = _docker_cli()
    info = subprocess.run([cli, "version", "--format", "{{.Server.Version}}"], capture_output=True,
                          text=True, timeout=60)
    if info.returncode != 0:
        _unavailable(f"the Docker engine does not answer ({info.stderr.strip()[:300]})")
    return Docker(cli, tmp_path_factory.mktemp("docker"))


@pytest.fixture(scope="module")
def cpu_image(docker: Docker) -> str:
    base = os.environ.get("FLUXSERVE_DOCKER_BASE_IMAGE", "local/debian:bookworm")
    if not docker.image_exists(base):
        _unavailable(f"the base image {base} is missing (make it with "
                     "scripts/docker_base_image.sh, or set FLUXSERVE_DOCKER_BASE_IMAGE to a "
                     "Debian bookworm image)")
    args = ["build", "--network", "host", "--progress", "plain", "--target", "cpu",
            "--build-arg", f"CPU_BASE_IMAGE={base}", "-t", IMAGE]
    wheels = _wheels_image(docker)
    if wheels:
        args += ["--build-arg", f"TORCH_WHEELS={wheels}"]
    extra_index = os.environ.get("FLUXSERVE_DOCKER_PIP_EXTRA_INDEX_URL",
                                 "" if wheels else None)
    if extra_index is not None:
        args += ["--build-arg", f"PIP_EXTRA_INDEX_URL={extra_index}"]
    ca_bundle = os.environ.get("FLUXSERVE_DOCKER_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    if ca_bundle and Path(ca_bundle).is_file():
        args += ["--secret", f"id=ca_bundle,src={ca_bundle}"]
    log = docker.log_dir / "build.log"
    started = time.monotonic()
    proc = docker(*args, str(ROOT), timeout=BUILD_TIMEOUT_S, check=False,
                  env=dict(os.environ, DOCKER_BUILDKIT="1"))
    elapsed = time.monotonic() - started
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"docker build failed ({log}):\n{proc.stderr[-6000:]}"
    _record_timing("build_s", elapsed)
    print(f"docker build of {IMAGE}: {elapsed:.1f} s")
    return IMAGE


@pytest.fixture(scope="module")
def container(docker: Docker, cpu_image: str) -> Iterator[str]:
    name = f"fluxserve-test-{uuid.uuid4().hex[:8]}"
    # Runs as Kubernetes runs it in deploy/: read-only root filesystem, writable cache and /tmp.
    docker("run", "-d", "--name", name, "--read-only",
           "--tmpfs", f"/var/cache/fluxserve:exec,uid={UID},gid={UID},size=2g",
           "--tmpfs", "/tmp:exec,mode=1777,size=1g", "--shm-size", "1g",
           "-p", "127.0.0.1::8000", cpu_image,
           # No --enforce-eager: vLLM's default CPU path compiles C++ kernels at start, which
           # is what needs the image's compiler and Python headers.
           "--api-key", API_KEY, "--max-model-len", "2048", "--max-num-seqs", "8")
    try:
        yield name
    finally:
        logs = docker("logs", name, check=False)
        (docker.log_dir / "container.log").write_text(logs.stdout + logs.stderr)
        docker("rm", "-f", name, check=False)


def _wait_ready_inside(docker: Docker, name: str) -> float:
    probe = ("import json, urllib.request as u; "
             "print(json.load(u.urlopen('http://127.0.0.1:8000/ready', timeout=3)))")
    started = time.monotonic()
    last = ""
    while time.monotonic() - started < READY_TIMEOUT_S:
        state = docker("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        if state != "running":
            logs = docker("logs", "--tail", "60", name, check=False)
            raise AssertionError(f"container {state}:\n{logs.stdout}{logs.stderr}")
        proc = docker("exec", name, "python3", "-c", probe, check=False, timeout=30)
        if proc.returncode == 0:
            assert "'status': 'ready'" in proc.stdout, proc.stdout
            return time.monotonic() - started
        last = proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else ""
        time.sleep(2)
    raise AssertionError(f"/ready not 200 inside the container in {READY_TIMEOUT_S} s: {last}")


def _published_url(docker: Docker, name: str) -> str:
    mapping = docker("port", name, "8000/tcp").stdout.strip().splitlines()[0]
    return "http://" + mapping


def test_cpu_image_serves_and_stops_cleanly(docker: Docker, container: str):
    ready_s = _wait_ready_inside(docker, container)
    _record_timing("ready_s", ready_s)
    base_url = _published_url(docker, container)
    assert base_url.startswith("http://127.0.0.1:")

    # A chat completion with fluxserve's options, through the published port.
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0,
                           timeout=120)
    reply = client.chat.completions.create(
        model=MODEL, max_tokens=16, temperature=0,
        messages=[{"role": "user", "content": " ".join(["long context"] * 150)}],
        extra_body={"flux": {"mode": "sparse", "sink": 16, "window": 64},
                    "kv_policy": {"name": "calidrop", "budget": 64, "window": 8}})
    assert reply.choices[0].finish_reason in {"length", "stop"}
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 64
    assert httpx.get(f"{base_url}/v1/models", timeout=10).status_code == 401  # key enforced

    # Every process in the container runs as the image's non-root user.
    top = docker("top", container, "-eo", "uid,pid,args").stdout.strip().splitlines()
    uids = {line.split()[0] for line in top[1:]}
    assert uids == {str(UID)}, top
    assert any("fluxserve serve" in line for line in top), top
    assert docker("inspect", "--format", "{{.Config.User}}", container).stdout.strip() \
        == f"{UID}:{UID}"

    # The HEALTHCHECK (GET /health) turns healthy.
    deadline = time.monotonic() + 120
    health = ""
    while time.monotonic() < deadline:
        health = docker("inspect", "--format", "{{.State.Health.Status}}", container
                        ).stdout.strip()
        if health == "healthy":
            break
        time.sleep(2)
    assert health == "healthy", docker("inspect", "--format", "{{json .State.Health}}",
                                       container).stdout

    # docker stop sends SIGTERM; the server shuts down by itself well before the SIGKILL.
    started = time.monotonic()
    docker("stop", "-t", str(GRACE_S), container, timeout=GRACE_S + 60)
    stop_s = time.monotonic() - started
    _record_timing("stop_s", stop_s)
    state = json.loads(docker("inspect", "--format", "{{json .State}}", container).stdout)
    logs = docker("logs", "--tail", "40", container, check=False)
    # uvicorn re-raises the SIGTERM it handled once its shutdown is complete, so a graceful stop
    # exits 143 (128 + SIGTERM) through tini; 137 would be docker's SIGKILL at the deadline.
    assert state["ExitCode"] in {0, 143} and not state["OOMKilled"], \
        (state, logs.stdout + logs.stderr)
    assert stop_s < GRACE_S, f"stop took {stop_s:.1f} s (grace {GRACE_S} s)"
    assert "Application shutdown complete" in logs.stdout + logs.stderr
    assert "Finished server process" in logs.stdout + logs.stderr



def _pem_blocks(text: str) -> set[str]:
    blocks = text.split("-----BEGIN CERTIFICATE-----")[1:]
    return {b.split("-----END CERTIFICATE-----")[0].strip() for b in blocks}


def test_build_secret_ca_bundle_is_in_no_layer(docker: Docker, cpu_image: str):
    """The certificates only the build secret carried (a local CA that intercepts TLS, here)
    appear nowhere in the image's filesystem."""
    ca_bundle = Path(os.environ.get("FLUXSERVE_DOCKER_CA_BUNDLE",
                                    "/etc/ssl/certs/ca-certificates.crt"))
    if not ca_bundle.is_file():
        pytest.skip("no CA bundle was passed to the build")
    image_bundle = docker("run", "--rm", "--entrypoint", "cat", cpu_image,
                          "/etc/ssl/certs/ca-certificates.crt").stdout
    foreign = _pem_blocks(ca_bundle.read_text()) - _pem_blocks(image_bundle)
    if not foreign:
        pytest.skip("the CA bundle holds only the certificates Debian ships too")
    # One base64 line from the middle of each such certificate, searched in every text file.
    needles = [block.splitlines()[len(block.splitlines()) // 2] for block in foreign]
    proc = docker("run", "--rm", "--user", "0", "--entrypoint", "grep", cpu_image, "-rIlF",
                  *[arg for needle in needles for arg in ("-e", needle)],
                  "/", "--exclude-dir=proc", "--exclude-dir=sys", "--exclude-dir=dev",
                  check=False, timeout=600)
    assert proc.returncode == 1, f"found in the image: {proc.stdout[:2000]} {proc.stderr[:500]}"
    history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", cpu_image).stdout
    assert "BEGIN CERTIFICATE" not in history and not any(n in history for n in needles)
