#!/usr/bin/env bash
# Build the dmoe image without a container registry or a package index inside the build (`make image-offline`):
#   1. a Python 3.11 base image from Debian's packages (deploy/base-image.sh; cached),
#   2. a wheelhouse of the pinned dependencies, CPU torch included (deploy/wheelhouse.sh; cached),
#   3. `docker build --build-arg BASE=... --build-arg OFFLINE=1`, which installs only from that wheelhouse.
#
#   deploy/build-image-offline.sh [TAG]    # default: dmoe:latest (the image docker-compose.yml runs)
#
# Steps 1 and 2 need, once, a Debian mirror and a package index on the host (an air-gapped site copies
# $DMOE_CACHE over instead: base-bookworm-rootfs.tar and wheelhouse/). Environment: DOCKER (the client),
# DOCKER_BUILDKIT (default: 1 where the client can), DMOE_BASE_IMAGE, DMOE_CACHE, DMOE_WHEELHOUSE, and what the
# two scripts read.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${1:-dmoe:latest}
DOCKER=${DOCKER:-docker}
export DOCKER
export DMOE_CACHE=${DMOE_CACHE:-/var/cache/dmoe}
BASE=${DMOE_BASE_IMAGE:-dmoe-base:bookworm}
WHEELHOUSE=${DMOE_WHEELHOUSE:-$DMOE_CACHE/wheelhouse}

deploy/base-image.sh "$BASE"
deploy/wheelhouse.sh "$WHEELHOUSE"

# The build context holds deploy/wheelhouse/ (git ignores it): hard links to the cache where the file system
# allows, copies where it does not.
mkdir -p deploy/wheelhouse
find deploy/wheelhouse -name '*.whl' -delete
cp -l "$WHEELHOUSE"/*.whl deploy/wheelhouse/ 2> /dev/null || cp "$WHEELHOUSE"/*.whl deploy/wheelhouse/

# BuildKit keeps the copy of the dependencies' venv cached across code changes (the legacy builder copies its
# 1.5 GB again each time). Clients before 23.0 have it built in; later ones need the buildx plugin.
if [[ -z "${DOCKER_BUILDKIT:-}" ]]; then
    client=$("$DOCKER" version --format '{{.Client.Version}}' 2> /dev/null || echo 0)
    if "$DOCKER" buildx version > /dev/null 2>&1 || (( ${client%%.*} < 23 )); then
        export DOCKER_BUILDKIT=1
    else
        export DOCKER_BUILDKIT=0
    fi
fi
"$DOCKER" build --build-arg BASE="$BASE" --build-arg OFFLINE=1 --tag "$TAG" .
echo "built $TAG on $BASE: $("$DOCKER" image inspect --format '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1 / 1e6}')"
