#!/usr/bin/env bash
# Build the images thalex-tp's compose stack needs from Debian's packages alone, for machines that
# reach a Debian mirror but no image registry (docs/operations.md, "Offline build"):
#
#   thalex-tp/debian:SUITE      debootstrap's minimal Debian, imported, upgraded from -updates/-security
#   thalex-tp/python:SUITE      + python3, python3-venv   (deploy/Dockerfile's PYTHON_IMAGE)
#   thalex-tp/redis:SUITE       + redis-server            (in place of redis:7.4-alpine)
#   thalex-tp/prometheus:SUITE  + prometheus, wget        (in place of prom/prometheus)
#
# Usage (as root: debootstrap needs it; `docker` talks to the engine DOCKER_HOST names):
#   deploy/offline/build-base-images.sh [--mirror URL] [--security-mirror URL] [--suite NAME] [--cache DIR]
#
#   --mirror           Debian archive (default http://deb.debian.org/debian)
#   --security-mirror  Debian security archive (default http://deb.debian.org/debian-security)
#   --suite            Debian release (default bookworm: Python 3.11, Redis 7.0, Prometheus 2.42)
#   --cache DIR        keep the debootstrap root filesystem and a `docker save` of the images in DIR,
#                      named by a hash of everything they are made from (this script, the
#                      Dockerfiles beside it, mirrors, suite, architecture); a later run loads them
#                      instead of building. Entries older than 7 days are rebuilt (security updates).
#
# The image builds run apt-get on the host's network (`docker build --network host`): the only
# traffic is to the mirrors given. Nothing is pulled from a registry.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
mirror=http://deb.debian.org/debian
security_mirror=http://deb.debian.org/debian-security
suite=bookworm
cache=""
max_age_days=7

while [ $# -gt 0 ]; do
  case "$1" in
    --mirror) mirror=$2; shift 2 ;;
    --security-mirror) security_mirror=$2; shift 2 ;;
    --suite) suite=$2; shift 2 ;;
    --cache) cache=$2; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "build-base-images: unknown argument $1 (--help)" >&2; exit 2 ;;
  esac
done

arch=$(dpkg --print-architecture 2>/dev/null || uname -m)
refs=("thalex-tp/debian:$suite" "thalex-tp/python:$suite" "thalex-tp/redis:$suite" "thalex-tp/prometheus:$suite")
say() { echo "build-base-images: $*" >&2; }

key_of() {  # a short hash of a text and of the files named after it
  local text=$1; shift
  { printf '%s\n' "$text"; cat "$@"; } | sha256sum | cut -c1-16
}
rootfs_key=$(key_of "$suite $arch $mirror $security_mirror" "$0")
images_key=$(key_of "$rootfs_key" "$here"/debian/Dockerfile "$here"/python/Dockerfile "$here"/redis/Dockerfile \
  "$here"/redis/docker-entrypoint.sh "$here"/prometheus/Dockerfile)

fresh() {  # the file exists and is younger than max_age_days
  [ -s "$1" ] && [ -z "$(find "$1" -mmin +$((max_age_days * 24 * 60)))" ]
}

if [ -n "$cache" ]; then
  mkdir -p "$cache"
  saved="$cache/images-$suite-$arch-$images_key.tar"
  if fresh "$saved"; then
    say "loading the images from $saved"
    docker load --quiet --input "$saved" >/dev/null
    say "done: ${refs[*]}"
    exit 0
  fi
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/tp-base-images.XXXXXX")
trap 'rm -rf "$work"' EXIT

rootfs_tar="$work/rootfs.tar"
if [ -n "$cache" ] && fresh "$cache/rootfs-$suite-$arch-$rootfs_key.tar"; then
  rootfs_tar="$cache/rootfs-$suite-$arch-$rootfs_key.tar"
  say "root filesystem from $rootfs_tar"
else
  command -v debootstrap >/dev/null || { say "debootstrap not installed (Debian/Ubuntu: apt-get install debootstrap)"; exit 2; }
  [ "$(id -u)" = 0 ] || { say "debootstrap needs root"; exit 2; }
  say "debootstrap --variant=minbase $suite from $mirror"
  debootstrap --variant=minbase "$suite" "$work/rootfs" "$mirror" > "$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  cat > "$work/rootfs/etc/apt/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security_mirror $suite-security main
EOF
  rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
  tar --numeric-owner -C "$work/rootfs" -cf "$rootfs_tar" .
  rm -rf "$work/rootfs"
  if [ -n "$cache" ]; then
    rm -f "$cache"/rootfs-"$suite"-"$arch"-*.tar
    cp "$rootfs_tar" "$cache/rootfs-$suite-$arch-$rootfs_key.tar.$$"
    mv "$cache/rootfs-$suite-$arch-$rootfs_key.tar.$$" "$cache/rootfs-$suite-$arch-$rootfs_key.tar"
  fi
fi

say "importing the root filesystem"
docker import "$rootfs_tar" "thalex-tp/debootstrap:$suite" >/dev/null
build() {  # name, then build args
  local name=$1; shift
  say "building thalex-tp/$name:$suite"
  docker build --quiet --network host --tag "thalex-tp/$name:$suite" "$@" "$here/$name" >/dev/null
}
build debian --build-arg "ROOTFS=thalex-tp/debootstrap:$suite"
docker rmi --no-prune "thalex-tp/debootstrap:$suite" >/dev/null 2>&1 || true
pids=()  # the three images are independent: build them side by side
for name in python redis prometheus; do
  build "$name" --build-arg "BASE=thalex-tp/debian:$suite" & pids+=($!)
done
for pid in "${pids[@]}"; do
  wait "$pid" || { say "a build failed (above)"; exit 1; }
done

if [ -n "$cache" ]; then
  rm -f "$cache"/images-"$suite"-"$arch"-*.tar
  docker save --output "$saved.$$" "${refs[@]}"  # another run may be saving too: rename, never share
  mv "$saved.$$" "$saved"
  say "saved the images in $saved"
fi
say "done: ${refs[*]}"
