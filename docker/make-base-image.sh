#!/usr/bin/env bash
# Build a local Debian base image with Python, for machines that cannot pull from Docker Hub.
#
#   docker/make-base-image.sh [IMAGE]        # default: convirt-local/python:3.11-bookworm
#
# The image is a debootstrap "minbase" root file system plus python3, python3-venv and the
# CA certificates, imported with `docker import`. It plays the part of python:3.11-slim for
# docker/Dockerfile (BASE_IMAGE) and of debian:bookworm-slim for docker/postgres/Dockerfile.
#
# The root file system tarball is cached (CACHE_DIR, default /tmp/convirt-docker-cache) and
# keyed by everything that shapes it, so a second run only re-imports it (seconds), and a run
# that finds the image already present does nothing. FORCE=1 rebuilds from scratch.
#
# Environment: SUITE (bookworm), MIRROR (http://deb.debian.org/debian),
# SECURITY_MIRROR (http://deb.debian.org/debian-security), CACHE_DIR, FORCE.
# Needs root, debootstrap and a running Docker daemon.
set -euo pipefail

IMAGE="${1:-convirt-local/python:3.11-bookworm}"
SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
CACHE_DIR="${CACHE_DIR:-/tmp/convirt-docker-cache}"
FORCE="${FORCE:-0}"
PACKAGES="python3,python3-venv,ca-certificates"

log() { printf '[make-base-image] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "the Docker daemon is not reachable (is dockerd running?)"

if [[ "$FORCE" != 1 ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "$IMAGE already present"
    exit 0
fi

# A change of suite, mirror or package list must not reuse an old tarball.
key="$(printf '%s|%s|%s|%s|v1' "$SUITE" "$MIRROR" "$SECURITY_MIRROR" "$PACKAGES" \
    | sha256sum | cut -c1-16)"
tarball="$CACHE_DIR/rootfs-$SUITE-$key.tar"
mkdir -p "$CACHE_DIR"

if [[ "$FORCE" == 1 || ! -s "$tarball" ]]; then
    [[ "$(id -u)" == 0 ]] || die "debootstrap needs root"
    command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
    rootfs="$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")"
    # debootstrap mounts /proc and /sys inside the target; unmount them even on failure,
    # or the rm below would walk into the host's /proc.
    cleanup() {
        for m in proc sys dev/pts; do
            mountpoint -q "$rootfs/$m" 2>/dev/null && umount -l "$rootfs/$m" || true
        done
        rm -rf --one-file-system "$rootfs"
    }
    trap cleanup EXIT
    log "debootstrap $SUITE ($MIRROR) into $rootfs"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >&2

    cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF
    # What the official Debian images do: no docs, man pages or apt caches in later layers.
    cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-excludes" <<'EOF'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
EOF
    cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
        >"$rootfs/etc/apt/apt.conf.d/docker-no-recommends"
    # The host's resolver and hostname must not leak into the image; Docker provides both.
    : >"$rootfs/etc/resolv.conf"
    : >"$rootfs/etc/hostname"
    find "$rootfs/usr/share/doc" -mindepth 2 ! -name copyright -delete 2>/dev/null || true
    rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
        "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/log/*.log \
        "$rootfs"/var/cache/debconf/*-old "$rootfs"/tmp/*
    find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias \
        -exec rm -rf {} + 2>/dev/null || true

    log "writing $tarball"
    tar --numeric-owner -C "$rootfs" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    cleanup
    trap - EXIT
else
    log "reusing cached root file system $tarball"
fi

log "docker import -> $IMAGE"
docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase $SUITE + $PACKAGES" \
    "$tarball" "$IMAGE" >/dev/null
docker image inspect --format '{{.Id}} {{.Size}}' "$IMAGE" >&2
