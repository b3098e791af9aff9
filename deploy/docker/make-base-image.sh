#!/usr/bin/env bash
# Build the base image of both Dockerfiles from a Debian root filesystem made with Debian's own
# debootstrap, and `docker import` it. No image registry is needed (none is reachable from the
# machines this project is built on): only a Debian mirror, as apt uses.
#
#   sudo deploy/docker/make-base-image.sh [TAG]        # default TAG: lmcache-base:bookworm
#
# Needs root, debootstrap and a running Docker engine (DOCKER_HOST is honoured). Takes about
# two minutes and 400 MB. Environment:
#   DEBIAN_SUITE   (bookworm: its python3 is 3.11, the Python this project is built for)
#   DEBIAN_MIRROR  (http://deb.debian.org/debian)
#   EXTRA_CA_DIR   (/usr/local/share/ca-certificates: the CAs this host added to its own trust
#                   store, e.g. a TLS-intercepting proxy's, are trusted in the image too, so that
#                   pip inside `docker build` works behind the same proxy; set it empty to skip)
set -euo pipefail
TAG=${1:-lmcache-base:bookworm}
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
EXTRA_CA_DIR=${EXTRA_CA_DIR-/usr/local/share/ca-certificates}
# python3-venv: the images install into /opt/venv; gcc, libc6-dev, python3-dev: lmcache's one C
# extension (setup.py); libgomp1, libnuma1: what vLLM's CPU build loads.
PACKAGES=python3,python3-venv,python3-dev,gcc,libc6-dev,ca-certificates,libgomp1,libnuma1

[ "$(id -u)" = 0 ] || { echo "make-base-image: debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || {
    echo "make-base-image: no debootstrap (apt-get install debootstrap)" >&2; exit 1; }
docker version >/dev/null || { echo "make-base-image: no Docker engine answers" >&2; exit 1; }

ROOTFS=$(mktemp -d /tmp/lmcache-rootfs.XXXXXX)
trap 'rm -rf --one-file-system "$ROOTFS"' EXIT
echo "make-base-image: debootstrap $SUITE ($MIRROR) into $ROOTFS" >&2
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" >&2

shopt -s nullglob
extra_cas=()
[ -n "$EXTRA_CA_DIR" ] && extra_cas=("$EXTRA_CA_DIR"/*.crt)
if [ ${#extra_cas[@]} -gt 0 ]; then
    echo "make-base-image: trusting this host's added CAs: ${extra_cas[*]}" >&2
    cp "${extra_cas[@]}" "$ROOTFS/usr/local/share/ca-certificates/"
    chroot "$ROOTFS" update-ca-certificates >&2
fi
# No apt caches or package lists in the image (apt-get update before installing more).
chroot "$ROOTFS" apt-get clean
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin

echo "make-base-image: importing as $TAG" >&2
tar -C "$ROOTFS" --numeric-owner -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase $SUITE" - "$TAG"
echo "make-base-image: done: $TAG" >&2
