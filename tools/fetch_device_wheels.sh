#!/usr/bin/env bash
# Download, on a machine with network, the wheels a GPU machine without a package registry lacks.
#
#   bash tools/fetch_device_wheels.sh            # into .whl/ (git-ignored), then copy the tree over
#
# The GPU image (python3 3.12, torch, triton, numpy, scipy, pyyaml, tqdm, tokenizers, pytest, ...)
# lacks megatron-core (the token store) and highspy (the scatter MILP). Their own dependencies
# (torch, numpy, packaging) are there, so they travel alone, as cp312 manylinux x86-64 wheels
# that tools/device_check.sh installs with `pip install --no-index --no-deps --target`.
# (Carry the folder: it is git-ignored, so name `.whl` in the device tool's carry list.)
# Versions: those installed in this checkout's environment (PYTHON, default .venv/bin/python),
# else the defaults below. Idempotent: a wheel already there is kept, other versions of the
# same package are removed (two versions of one package would stop the install there).
set -euo pipefail

usage() { echo "usage: bash tools/fetch_device_wheels.sh [--dest DIR]   (default DIR: .whl)"; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST="$ROOT/.whl"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dest) [[ $# -ge 2 ]] || { echo "fetch_device_wheels: error: --dest needs a directory" >&2; exit 2; }
                DEST=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "fetch_device_wheels: error: unknown argument '$1'; $(usage)" >&2; exit 2 ;;
    esac
done

# Defaults: the versions this project was last checked with (pyproject asks megatron-core>=0.12, highspy>=1.7).
declare -A DEFAULT_VERSION=([megatron-core]=0.16.1 [highspy]=1.16.0)
PACKAGES=(megatron-core highspy)

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
PIP=("$PYTHON" -m pip)

installed_version() {  # the version pip reports for $1 in $PYTHON's environment, or nothing
    "${PIP[@]}" show "$1" 2>/dev/null | awk '/^Version:/ {print $2}'
}

mkdir -p "$DEST"
for pkg in "${PACKAGES[@]}"; do
    version=$(installed_version "$pkg")
    version=${version:-${DEFAULT_VERSION[$pkg]}}
    stem=${pkg//-/_}  # wheel file names use underscores
    keep=$(compgen -G "$DEST/${stem}-${version}-*.whl" || true)
    for old in "$DEST/${stem}"-*.whl; do
        [[ -e "$old" && "$old" != "$keep" ]] || continue
        echo "removing $(basename "$old") (keeping $pkg==$version only)"
        rm -f -- "$old"
    done
    if [[ -n "$keep" ]]; then
        echo "have $(basename "$keep")"
        continue
    fi
    echo "downloading $pkg==$version (cp312, manylinux x86-64)"
    "${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$DEST" "$pkg==$version"
done

echo "wheels in $DEST:"
du -h "$DEST"/*.whl | sed 's|'"$DEST"'/||'
du -sh "$DEST" | awk '{print "total " $1 " (the tree that travels, carried paths included, must stay under 64 MiB)"}'
