#!/usr/bin/env bash
# Prepare this machine to build and run the Squall image with rootful podman.
#
# Idempotent; safe to run with CI=true and no stdin. It:
#   1. installs podman, runc and debootstrap when missing (Debian/Ubuntu, as root);
#   2. writes a containers.conf to $CONTAINERS_CONF (default: a temp dir) with
#      runtime runc, cgroupfs, file events and ulimits the sandbox can grant;
#   3. when no registry is used, builds a stand-in for
#      docker.io/library/python:3.11-slim from Debian bookworm with debootstrap,
#      once (skipped when the image already exists).
#
# Callers should export the same CONTAINERS_CONF before they run podman, e.g.
#   export CONTAINERS_CONF="${CONTAINERS_CONF:-${TMPDIR:-/tmp}/squall-podman/containers.conf}"
#   scripts/container/podman-setup.sh
#
# Environment:
#   CONTAINERS_CONF        where to write containers.conf (see above)
#   SQUALL_BASE_IMAGE      base image name (default docker.io/library/python:3.11-slim)
#   SQUALL_BASE_PULL=1     pull the base image from its registry instead of building
#                          the stand-in (for machines that can reach one)
#   SQUALL_REBUILD_BASE=1  rebuild the stand-in even when it exists
#   DEBOOTSTRAP_MIRROR     Debian mirror (default http://deb.debian.org/debian)
#   DEBOOTSTRAP_SUITE      Debian suite (default bookworm)
set -euo pipefail

BASE_IMAGE="${SQUALL_BASE_IMAGE:-docker.io/library/python:3.11-slim}"
MIRROR="${DEBOOTSTRAP_MIRROR:-http://deb.debian.org/debian}"
SUITE="${DEBOOTSTRAP_SUITE:-bookworm}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-${TMPDIR:-/tmp}/squall-podman/containers.conf}"
export DEBIAN_FRONTEND=noninteractive

log() { printf '[podman-setup] %s\n' "$*" >&2; }
die() { printf '[podman-setup] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (rootful podman, apt-get and debootstrap need it)"

# One setup at a time (two callers racing would import the base twice).
mkdir -p "$(dirname "$CONTAINERS_CONF")"
exec 9>"$(dirname "$CONTAINERS_CONF")/.setup.lock"
flock 9

# --- 1. packages -------------------------------------------------------------
missing=()
for tool in podman runc debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]}"
    # A fresh machine may have no package lists yet; refresh them only then,
    # or when the first attempt fails on stale lists.
    if ! compgen -G '/var/lib/apt/lists/*_Packages' >/dev/null; then
        apt-get update -qq
    fi
    if ! apt-get install -y -qq "${missing[@]}" </dev/null >/dev/null; then
        apt-get update -qq
        apt-get install -y -qq "${missing[@]}" </dev/null >/dev/null
    fi
fi

# --- 2. containers.conf ------------------------------------------------------
# default_ulimits must not exceed the hard limits: the sandbox cannot raise them.
limit() {
    local hard want=16384
    hard="$(ulimit -H "$1")"
    if [ "$hard" = unlimited ] || [ "$hard" -ge "$want" ]; then echo "$want"; else echo "$hard"; fi
}
nofile="$(limit -n)"
nproc="$(limit -u)"
conf_tmp="$(mktemp "${CONTAINERS_CONF}.XXXXXX")"
cat >"$conf_tmp" <<CONF
# Written by scripts/container/podman-setup.sh; used through CONTAINERS_CONF.
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=${nproc}:${nproc}"]

[engine]
# crun fails on hybrid cgroup v1/v2 hosts; runc works on both.
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
mv -f "$conf_tmp" "$CONTAINERS_CONF"
log "containers.conf: $CONTAINERS_CONF (nofile=$nofile nproc=$nproc)"

# --- 3. base image -------------------------------------------------------------
if podman image exists "$BASE_IMAGE" && [ "${SQUALL_REBUILD_BASE:-0}" != 1 ]; then
    log "base image present: $BASE_IMAGE"
    exit 0
fi

if [ "${SQUALL_BASE_PULL:-0}" = 1 ]; then
    log "pulling $BASE_IMAGE"
    podman pull "$BASE_IMAGE"
    exit 0
fi

log "building stand-in $BASE_IMAGE from Debian $SUITE (debootstrap)"
workdir="$(mktemp -d "${TMPDIR:-/tmp}/squall-base.XXXXXX")"
cleanup() {
    # debootstrap may leave proc/sys mounted on failure
    for m in proc sys dev/pts dev; do
        if mountpoint -q "$workdir/rootfs/$m" 2>/dev/null; then
            umount -l "$workdir/rootfs/$m" || true
        fi
    done
    rm -rf "$workdir"
}
trap cleanup EXIT
rootfs="$workdir/rootfs"

if ! debootstrap --variant=minbase \
        --include=python3,python3-pip,python3-venv,ca-certificates \
        "$SUITE" "$rootfs" "$MIRROR" >"$workdir/debootstrap.log" 2>&1; then
    tail -n 30 "$workdir/debootstrap.log" >&2 || true
    tail -n 30 "$rootfs/debootstrap/debootstrap.log" >&2 2>/dev/null || true
    die "debootstrap failed"
fi

# Trim what an image does not need.
rm -rf "$rootfs"/var/lib/apt/lists/* \
       "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
       "$rootfs"/var/cache/debconf/*-old \
       "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
       "$rootfs"/usr/share/locale/* \
       "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* \
       "$rootfs"/root/.cache
find "$rootfs"/usr/lib/python3* -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || true
# The engine provides these at run time; do not bake the host's into the image.
: >"$rootfs/etc/resolv.conf"
: >"$rootfs/etc/hostname"

# Behave like the official image: pip may install, python/pip on PATH.
rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
mkdir -p "$rootfs/usr/local/bin"
ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python3"
ln -sf /usr/bin/pip3 "$rootfs/usr/local/bin/pip"
ln -sf /usr/bin/pip3 "$rootfs/usr/local/bin/pip3"

# Trust the same extra CAs as this machine (e.g. a TLS-intercepting proxy), so
# that pip inside builds works here. This stays in the local stand-in only.
if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    mkdir -p "$rootfs/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" /usr/sbin/update-ca-certificates >/dev/null 2>&1
fi

log "importing $BASE_IMAGE"
tar --numeric-owner -C "$rootfs" -c . | podman import --quiet \
    --change 'ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV=LANG=C.UTF-8' \
    --change 'CMD=["python3"]' \
    --message "stand-in for $BASE_IMAGE: Debian $SUITE minbase with python3" \
    - "$BASE_IMAGE" >/dev/null
podman image exists "$BASE_IMAGE" || die "import of $BASE_IMAGE failed"
log "base image ready: $BASE_IMAGE"
