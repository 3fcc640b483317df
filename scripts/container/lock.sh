#!/usr/bin/env bash
# Regenerate requirements.lock: exact, hash-pinned versions of the runtime
# dependencies listed in pyproject.toml's [project] dependencies (and theirs).
# The container image installs exactly these (pip --require-hashes).
#
#   scripts/container/lock.sh            # re-resolve, keeping current pins where allowed
#   scripts/container/lock.sh --upgrade  # move every pin to the newest allowed version
#
# Run it after editing [project] dependencies; commit the result. Needs python3
# and access to PyPI; uses uv in a throwaway virtualenv.
set -euo pipefail
cd "$(dirname "$0")/../.."

UV_VERSION="${UV_VERSION:-0.13.8}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install --quiet --disable-pip-version-check "uv==${UV_VERSION}"

# --universal: one lock valid on every platform (amd64 and arm64 images);
# native TLS: trust the system CA store, like pip does.
UV_NATIVE_TLS=1 "$tmp/venv/bin/uv" pip compile pyproject.toml \
    --quiet \
    --universal \
    --python-version 3.11 \
    --generate-hashes \
    --no-strip-markers \
    --custom-compile-command "scripts/container/lock.sh" \
    --output-file requirements.lock \
    "$@"
echo "requirements.lock updated:"
grep -E '^[A-Za-z0-9_.-]+==' requirements.lock | sed 's/ .*//; s/^/  /'
