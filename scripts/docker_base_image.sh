#!/usr/bin/env bash
# Makes the Debian bookworm base image that the CPU image is built FROM on machines that reach
# Debian's package mirror but no image registry: debootstrap (minbase) into a folder, then
# `docker import`. Run as root.
#
#   sudo bash scripts/docker_base_image.sh            # -> local/debian:bookworm
#
# The tarball is cached (FLUXSERVE_CI_CACHE, default /var/cache/fluxserve-ci), so a later run on
# the same machine only re-imports it, and does nothing when the image already exists.
# Environment: FLUXSERVE_DOCKER_BASE_IMAGE (default local/debian:bookworm), DEBIAN_MIRROR
# (default: the mirror apt on this machine already uses).
set -euo pipefail

IMAGE=${FLUXSERVE_DOCKER_BASE_IMAGE:-local/debian:bookworm}
CACHE=${FLUXSERVE_CI_CACHE:-/var/cache/fluxserve-ci}
SUITE=bookworm
TARBALL=$CACHE/debian-$SUITE-minbase.tar
DOCKER=${DOCKER:-/usr/bin/docker}
[ -x "$DOCKER" ] || DOCKER=docker

log() { printf '[docker_base_image %(%H:%M:%S)T] %s\n' -1 "$*"; }

if "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1; then
    log "$IMAGE already present"
    exit 0
fi

mirror() {
    # The first Debian archive URI apt is configured with (deb822 .sources or one-line .list).
    local uri
    uri=$(grep -h -E '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
          | awk '{print $2}' | grep -v -- '-security' | head -n 1 || true)
    if [ -z "$uri" ]; then
        uri=$(grep -h -E '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
              | awk '{print $2}' | grep -v -- '-security' | head -n 1 || true)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

if [ ! -s "$TARBALL" ]; then
    MIRROR=${DEBIAN_MIRROR:-$(mirror)}
    ROOTFS=$(mktemp -d /tmp/debootstrap-XXXXXX)
    trap 'rm -rf "$ROOTFS"' EXIT
    log "debootstrap --variant=minbase $SUITE from $MIRROR"
    debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
        || { tail -n 30 "$CACHE/debootstrap.log" >&2; exit 1; }
    # Slim it the way Debian's official images are: no apt lists, no package caches.
    rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/archives/*.deb
    mkdir -p "$CACHE"
    tar -C "$ROOTFS" --numeric-owner -cf "$TARBALL.part" .
    mv "$TARBALL.part" "$TARBALL"
fi

log "docker import $TARBALL as $IMAGE"
"$DOCKER" import --change 'CMD ["/bin/bash"]' "$TARBALL" "$IMAGE" >/dev/null
log "done: $("$DOCKER" image inspect --format '{{.Size}}' "$IMAGE") bytes"
