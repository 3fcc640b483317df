#!/usr/bin/env bash
# Seconds from `git clone` to the first answer of /healthz after `make run`: the
# README's quick start, as a new user runs it. Usage: scripts/quickstart.sh [PORT]
# (the clone goes to a temporary directory, removed afterwards).
set -euo pipefail
source=$(cd "$(dirname "$0")/.." && pwd)
port=${1:-18888}
work=$(mktemp -d)
server=
cleanup() {
  if [ -n "$server" ]; then kill -TERM -- "-$server" 2>/dev/null || true; wait "$server" || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

start=$(date +%s.%N)
git clone --quiet "$source" "$work/squall"
cd "$work/squall"
SQUALL_PORT=$port setsid make run >"$work/make.log" 2>&1 &
server=$!
until curl -sf "http://127.0.0.1:$port/healthz" >/dev/null; do
  kill -0 "$server" 2>/dev/null || { cat "$work/make.log"; exit 1; }
  sleep 0.1
done
end=$(date +%s.%N)
awk -v start="$start" -v end="$end" 'BEGIN { printf "quick start: %.1f s\n", end - start }'
