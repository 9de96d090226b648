#!/usr/bin/env bash
# Prepares a CI machine (Debian bookworm, run as root) for the container test:
#   1. installs Debian's docker.io and debootstrap (skipped when already there);
#   2. starts dockerd in the background unless one answers, and waits for it;
#   3. imports the Debian base image the CPU image is built FROM (scripts/docker_base_image.sh),
#      from a cached debootstrap tarball when there is one.
# Idempotent: a second run on the same machine only checks. Not needed on a developer machine
# that already has a Docker engine (the container test then builds on the official base image,
# or on FLUXSERVE_DOCKER_BASE_IMAGE).
#
#   sudo bash scripts/ci_machine_setup.sh
#
# Environment: FLUXSERVE_CI_CACHE (default /var/cache/fluxserve-ci) holds what later runs on the
# same machine reuse (the debootstrap tarball); DOCKERD_LOG (default $FLUXSERVE_CI_CACHE/dockerd.log).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${FLUXSERVE_CI_CACHE:-/var/cache/fluxserve-ci}
DOCKERD_LOG=${DOCKERD_LOG:-$CACHE/dockerd.log}
mkdir -p "$CACHE"

log() { printf '[ci_machine_setup %(%H:%M:%S)T] %s\n' -1 "$*"; }

if [ "$(id -u)" != 0 ]; then
    echo "ci_machine_setup.sh: run as root (it installs packages and starts dockerd)" >&2
    exit 1
fi

# --- 1. packages ---------------------------------------------------------------------------
need=()
[ -x /usr/sbin/dockerd ] || [ -x /usr/bin/dockerd ] || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
    log "apt-get install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# --- 2. dockerd ----------------------------------------------------------------------------
# Debian's docker.io ships the 20.10 CLI at /usr/bin/docker. It has BuildKit built in
# (DOCKER_BUILDKIT=1), which the Dockerfile needs for its secret and cache mounts. A newer CLI
# earlier on PATH without the buildx plugin refuses BuildKit builds, so talk to this one.
DOCKER=/usr/bin/docker
if ! "$DOCKER" info >/dev/null 2>&1; then
    log "starting dockerd (log: $DOCKERD_LOG)"
    # setsid: dockerd outlives this script and is not in the CI job's process group.
    setsid nohup dockerd >"$DOCKERD_LOG" 2>&1 </dev/null &
    for _ in $(seq 1 60); do
        "$DOCKER" info >/dev/null 2>&1 && break
        sleep 1
    done
    if ! "$DOCKER" info >/dev/null 2>&1; then
        echo "dockerd did not come up in 60 s; the end of its log:" >&2
        tail -n 30 "$DOCKERD_LOG" >&2
        exit 1
    fi
fi
log "dockerd up: $("$DOCKER" info --format '{{.ServerVersion}} storage={{.Driver}} cgroup={{.CgroupVersion}}')"

# --- 3. base image -------------------------------------------------------------------------
FLUXSERVE_CI_CACHE=$CACHE bash scripts/docker_base_image.sh

# --- 4. checkov ----------------------------------------------------------------------------
# The policy scan of deploy/ (tests/unit/test_deploy_manifests.py). Its own venv: checkov pins
# older packaging/platformdirs/importlib-metadata than vLLM's stack wants.
CHECKOV_VERSION=3.3.30
CHECKOV_VENV=${FLUXSERVE_CHECKOV_VENV:-$CACHE/checkov-$CHECKOV_VERSION}
if ! "$CHECKOV_VENV/bin/checkov" --version >/dev/null 2>&1; then
    log "installing checkov $CHECKOV_VERSION into $CHECKOV_VENV"
    rm -rf "$CHECKOV_VENV"
    python3 -m venv "$CHECKOV_VENV"
    "$CHECKOV_VENV/bin/pip" install -q "checkov==$CHECKOV_VERSION"
fi
log "checkov $("$CHECKOV_VENV/bin/checkov" --version) at $CHECKOV_VENV/bin/checkov"
