#!/usr/bin/env bash
# Fill deploy/wheels/ with every wheel thalex-tp's image needs, made by the image's own Python, for
# `PIP_SOURCE=wheels` builds (deploy/Dockerfile; docs/operations.md, "Offline build").
#
#   deploy/offline/make-wheels.sh [--image IMAGE] [--out DIR] [--pip-cache DIR] [--cert FILE]
#
#   --image      the PYTHON_IMAGE the thalex-tp image will be built on (default
#                thalex-tp/python:bookworm, from build-base-images.sh)
#   --out        where the wheels go (default deploy/wheels/ beside this script)
#   --pip-cache  a directory kept between runs as pip's cache (downloads are not repeated)
#   --cert       CA bundle pip trusts (default $PIP_CERT): a network whose proxy re-signs TLS
#
# Why inside the image: pip picks dependencies by the interpreter's exact version (redis needs
# async-timeout below Python 3.11.3, Debian bookworm has 3.11.2), so wheels made by another
# Python may miss one. pip reaches PyPI on the host's network, or the index in PIP_INDEX_URL /
# PIP_EXTRA_INDEX_URL (passed through). Run it where that index is reachable, then copy the
# directory to the machine that builds the image.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
image=thalex-tp/python:bookworm
out=$repo/deploy/wheels
pip_cache=""
cert=${PIP_CERT:-}

while [ $# -gt 0 ]; do
  case "$1" in
    --image) image=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --pip-cache) pip_cache=$2; shift 2 ;;
    --cert) cert=$2; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "make-wheels: unknown argument $1 (--help)" >&2; exit 2 ;;
  esac
done

mkdir -p "$out"
out=$(cd "$out" && pwd)
mounts=()  # the optional ones
if [ -n "$pip_cache" ]; then
  mkdir -p "$pip_cache"
  mounts=(--volume "$(cd "$pip_cache" && pwd):/tmp/pip-cache" --env PIP_CACHE_DIR=/tmp/pip-cache)
fi
if [ -n "$cert" ]; then
  mounts+=(--volume "$(readlink -f "$cert"):/tmp/pip-cert.pem:ro" --env PIP_CERT=/tmp/pip-cert.pem)
fi

# The build backend comes from pyproject.toml's [build-system] requires (the image builds
# thalex-tp from its sources with it).
backend=$(sed -n '/^\[build-system\]/,/^\[/{s/^requires *= *\[\(.*\)\]/\1/p}' "$repo/pyproject.toml" | tr -d '" ' | tr ',' ' ')

docker run --rm --network host --user "$(id -u):$(id -g)" --env HOME=/tmp \
  --volume "$repo/pyproject.toml:/src/pyproject.toml:ro" \
  --volume "$repo/README.md:/src/README.md:ro" \
  --volume "$repo/services:/src/services:ro" \
  --volume "$out:/wheels" \
  "${mounts[@]}" \
  --env PIP_INDEX_URL --env PIP_EXTRA_INDEX_URL --env PIP_TRUSTED_HOST --env PIP_DISABLE_PIP_VERSION_CHECK=1 \
  --env BUILD_REQUIRES="$backend" \
  --entrypoint /bin/sh "$image" -ec '
    cp -r /src /tmp/src
    python3 -m venv /tmp/venv
    /tmp/venv/bin/pip wheel --quiet --wheel-dir /wheels /tmp/src $BUILD_REQUIRES
    rm -f /wheels/thalex_tp-*.whl   # the image builds thalex-tp from the sources it is given
  '
echo "make-wheels: $(ls "$out"/*.whl | wc -l) wheels in $out (for $image)" >&2
