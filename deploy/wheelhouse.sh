#!/usr/bin/env bash
# Build the wheelhouse an offline image build installs from: a wheel of every pinned dependency in pyproject.toml
# (CPU-only torch), plus the build backend pip needs for the project itself.
#
#   deploy/wheelhouse.sh [DIR]      # default: $DMOE_WHEELHOUSE or /var/cache/dmoe/wheelhouse
#
# Runs on a machine that reaches a package index (PyPI, a mirror, or pip's own find-links/extra-index-url
# configuration). torch comes from PyTorch's CPU index (TORCH_INDEX, '' to use only pip's configuration), so no
# CUDA libraries end up in the image. A wheelhouse that already matches pyproject.toml is left as it is (a stamp
# file records what it was built for); otherwise only the missing wheels are fetched.
#
# Environment: PYTHON (a Python 3.11 with pip; default: .venv/bin/python, else python3.11), TORCH_INDEX.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELHOUSE=${1:-${DMOE_WHEELHOUSE:-/var/cache/dmoe/wheelhouse}}
TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=$(command -v python3.11); fi
fi

# The pins, one a line: torch as its CPU build, everything else as pyproject.toml says.
requirements=$("$PYTHON" - <<'PY'
import re
import tomllib

with open("pyproject.toml", "rb") as file:
    project = tomllib.load(file)
for requirement in project["build-system"]["requires"] + project["project"]["dependencies"]:
    match = re.fullmatch(r"torch==([\w.]+)", requirement.replace(" ", ""))
    print(f"torch=={match.group(1)}+cpu" if match else requirement)
PY
)
stamp="$("$PYTHON" -c 'import sys; print(sys.version.split()[0])') $(echo "$requirements" | sha256sum | cut -c1-16)"
if [[ -f "$WHEELHOUSE/.stamp" && "$(cat "$WHEELHOUSE/.stamp")" == "$stamp" ]]; then
    echo "wheelhouse $WHEELHOUSE is up to date ($(find "$WHEELHOUSE" -name "*.whl" | wc -l) wheels)"
    exit 0
fi

mkdir -p "$WHEELHOUSE"
echo "$requirements" > "$WHEELHOUSE/requirements.txt"
index_args=()
if [[ -n "$TORCH_INDEX" ]]; then
    # an unreachable index costs pip minutes of retries per package: ask once, then leave it out
    if "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)' "$TORCH_INDEX" \
        2>/dev/null; then
        index_args=(--extra-index-url "$TORCH_INDEX")
    else
        echo "$TORCH_INDEX is not reachable: torch's CPU build must come from pip's own configuration" >&2
    fi
fi
# --find-links on the wheelhouse itself: wheels already there are reused, not fetched again
"$PYTHON" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$WHEELHOUSE" --find-links "$WHEELHOUSE" \
    "${index_args[@]}" -r "$WHEELHOUSE/requirements.txt"
echo "$stamp" > "$WHEELHOUSE/.stamp"
echo "wheelhouse $WHEELHOUSE: $(find "$WHEELHOUSE" -name "*.whl" | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1)"
