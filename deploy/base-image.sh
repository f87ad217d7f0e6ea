#!/usr/bin/env bash
# Make a Python 3.11 base image without a container registry, from Debian's own packages (debootstrap), for
# `docker build --build-arg BASE=...` where python:3.11-slim cannot be pulled.
#
#   deploy/base-image.sh [IMAGE]     # default: $DMOE_BASE_IMAGE or dmoe-base:bookworm
#
# Cached twice: an image already in the engine's store is kept as it is, and the root file system is kept as a
# tarball under $DMOE_CACHE (default /var/cache/dmoe), so a pruned store is refilled without debootstrap. Needs
# root (debootstrap), debootstrap itself, a Debian mirror (DEBIAN_MIRROR) and a running Docker engine (DOCKER).
set -euo pipefail

IMAGE=${1:-${DMOE_BASE_IMAGE:-dmoe-base:bookworm}}
CACHE=${DMOE_CACHE:-/var/cache/dmoe}
SUITE=${DEBIAN_SUITE:-bookworm}  # bookworm's python3 is 3.11, the version dmoe pins
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DOCKER=${DOCKER:-docker}
TARBALL="$CACHE/base-$SUITE-rootfs.tar"

if "$DOCKER" image inspect "$IMAGE" > /dev/null 2>&1; then
    echo "base image $IMAGE is already there"
    exit 0
fi

if [[ ! -s "$TARBALL" ]]; then
    command -v debootstrap > /dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }
    mkdir -p "$CACHE"
    rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs" "$TARBALL.tmp"' EXIT
    echo "debootstrap $SUITE into $rootfs (a minute or two)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$rootfs" "$MIRROR" \
        > "$CACHE/debootstrap.log" 2>&1 || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
    # what an image never needs: package lists and caches, documentation, translations
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/usr/share/doc/* \
        "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*
    tar --numeric-owner -C "$rootfs" -cf "$TARBALL.tmp" .
    mv "$TARBALL.tmp" "$TARBALL"
fi

"$DOCKER" import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    --message "Debian $SUITE minbase with python3 (deploy/base-image.sh)" \
    "$TARBALL" "$IMAGE" > /dev/null
echo "base image $IMAGE imported from $TARBALL"
