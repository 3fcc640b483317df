#!/usr/bin/env bash
# Container smoke test for Squall (run as root; `make test-container` calls it).
#
# Builds the image with podman, runs it on a free loopback port and checks,
# end to end through the published port:
#   requirements.lock in step with pyproject.toml, hadolint, image metadata (non-root USER, HEALTHCHECK, EXPOSE 8888),
#   /healthz, /readyz, `podman healthcheck run`, the process uid is not 0,
#   an HTTP publish reaching a WebSocket subscriber, and a graceful stop on
#   SIGTERM (subscriber closed with 1001, exit code 0, within SMOKE_STOP_MAX s).
# The container is always removed. Prints PASS/FAIL per check and exits non-zero
# when any check failed.
#
# Environment:
#   SMOKE_IMAGE       image tag to build and test (default squall:ci)
#   SMOKE_CONTEXT     build context (default: the repository root)
#   SMOKE_SKIP_BUILD  1: test an existing SMOKE_IMAGE
#   SMOKE_LINT        0: skip hadolint
#   SMOKE_STOP_MAX    seconds `podman stop` may take (default 5)
#   SMOKE_PYTHON      python with websockets>=13 (default: .venv, python3, or a
#                     throwaway virtualenv)
#   CONTAINERS_CONF   podman config written by podman-setup.sh
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
HERE="$ROOT/scripts/container"
CLIENT="$ROOT/tests/container/smoke_client.py"
IMAGE="${SMOKE_IMAGE:-squall:ci}"
CONTEXT="${SMOKE_CONTEXT:-$ROOT}"
STOP_MAX="${SMOKE_STOP_MAX:-5}"
NAME="squall-smoke-$$"
export CONTAINERS_CONF="${CONTAINERS_CONF:-${TMPDIR:-/tmp}/squall-podman/containers.conf}"
# Loopback traffic must never go through a proxy from the environment.
export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}"
export no_proxy="$NO_PROXY"

passed=0
failed=0
started_container=0
hold_pid=""
tmp="$(mktemp -d "${TMPDIR:-/tmp}/squall-smoke.XXXXXX")"

now() { echo "${EPOCHREALTIME/,/.}"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
info() { printf '       %s\n' "$*"; }
pass() { passed=$((passed + 1)); printf 'PASS   %s\n' "$*"; }
fail() { failed=$((failed + 1)); printf 'FAIL   %s\n' "$*"; }
# podman prints a harmless systemd-timer error for health checks without systemd.
podman_q() { podman "$@" 2> >(grep -v 'unable to get systemd connection' >&2); }

summary() {
    echo "------------------------------------------------------------"
    if [ "$failed" -eq 0 ]; then echo "container smoke test: PASS"; else echo "container smoke test: FAIL"; fi
    echo "container-smoke: $passed passed, $failed failed"
}

cleanup() {
    local rc=$?
    if [ -n "$hold_pid" ]; then kill "$hold_pid" 2>/dev/null; wait "$hold_pid" 2>/dev/null; fi
    if [ "$started_container" = 1 ]; then
        if [ "$failed" -gt 0 ]; then
            echo "--- last container log lines ---"
            podman logs --tail 40 "$NAME" 2>&1 | sed 's/^/  | /'
        fi
        podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
    fi
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

abort() { fail "$*"; summary; exit 1; }

# --- prerequisites ---------------------------------------------------------------
t0="$(now)"
"$HERE/podman-setup.sh" </dev/null || abort "podman setup (scripts/container/podman-setup.sh)"
info "podman ready ($(since "$t0") s)"

pick_python() {
    local py
    for py in "${SMOKE_PYTHON:-}" "$ROOT/.venv/bin/python" python3; do
        [ -n "$py" ] || continue
        if "$py" -c 'import websockets.asyncio.client' >/dev/null 2>&1; then echo "$py"; return; fi
    done
    local venv="${TMPDIR:-/tmp}/squall-smoke-venv"
    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import websockets.asyncio.client' 2>/dev/null; then
        python3 -m venv "$venv" >&2 && "$venv/bin/python" -m pip install --quiet \
            --disable-pip-version-check 'websockets>=13' >&2 || return 1
    fi
    echo "$venv/bin/python"
}
PY="$(pick_python)" || abort "no python with websockets>=13 (set SMOKE_PYTHON)"
info "client python: $PY"

# --- lock, lint and build ----------------------------------------------------------
if out="$(cd "$ROOT" && "$PY" tests/container/check_lock.py pyproject.toml requirements.lock 2>&1)"; then
    pass "$out"
else
    fail "$out"
fi

if [ "${SMOKE_LINT:-1}" != 0 ]; then
    if "$HERE/lint.sh" >"$tmp/lint.log" 2>&1; then
        pass "hadolint: Dockerfile clean"
    else
        fail "hadolint"; sed 's/^/  | /' "$tmp/lint.log"
    fi
fi

if [ "${SMOKE_SKIP_BUILD:-0}" != 1 ]; then
    t0="$(now)"
    if podman build --pull=never --format docker -f "$ROOT/Dockerfile" -t "$IMAGE" "$CONTEXT" \
            >"$tmp/build.log" 2>&1; then
        pass "podman build -t $IMAGE ($(since "$t0") s)"
    else
        tail -n 30 "$tmp/build.log" | sed 's/^/  | /'
        abort "podman build -t $IMAGE"
    fi
fi

# --- image metadata ---------------------------------------------------------------
user="$(podman image inspect --format '{{.Config.User}}' "$IMAGE" 2>/dev/null)"
case "${user%%:*}" in
    "" | root | 0) fail "image USER is non-root (got '${user}')" ;;
    *) pass "image USER is non-root ($user)" ;;
esac
hc="$(podman image inspect --format '{{if .Config.Healthcheck}}{{json .Config.Healthcheck.Test}}{{end}}' "$IMAGE" 2>/dev/null)"
if [ -n "$hc" ] && [ "$hc" != null ]; then pass "image has a HEALTHCHECK"; else fail "image has a HEALTHCHECK (build with --format docker)"; fi
if podman image inspect --format '{{json .Config.ExposedPorts}}' "$IMAGE" | grep -q '"8888/tcp"'; then
    pass "image EXPOSEs 8888/tcp"
else
    fail "image EXPOSEs 8888/tcp"
fi

# --- run ---------------------------------------------------------------------------
PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
BASE="http://127.0.0.1:$PORT"
if ! podman_q run -d --name "$NAME" -p "127.0.0.1:$PORT:8888" "$IMAGE" >/dev/null; then
    abort "podman run $IMAGE"
fi
started_container=1
info "container $NAME on $BASE"

t0="$(now)"
healthy=0
for _ in $(seq 1 60); do
    if [ "$(podman inspect --format '{{.State.Running}}' "$NAME" 2>/dev/null)" != true ]; then
        break
    fi
    if "$PY" "$CLIENT" health "$BASE" >"$tmp/health.out" 2>&1; then healthy=1; break; fi
    sleep 0.5
done
if [ "$healthy" = 1 ]; then
    pass "$(cat "$tmp/health.out") after $(since "$t0") s"
else
    abort "GET /healthz: $(cat "$tmp/health.out" 2>/dev/null) (state: $(podman inspect --format '{{.State.Status}} exit={{.State.ExitCode}}' "$NAME" 2>/dev/null))"
fi

if out="$("$PY" "$CLIENT" ready "$BASE" 2>&1)"; then pass "$out"; else fail "$out"; fi

if out="$(podman_q healthcheck run "$NAME" 2>&1)"; then
    pass "podman healthcheck run: ${out:-healthy}"
else
    fail "podman healthcheck run: $out"
fi

uid="$(podman exec "$NAME" id -u 2>/dev/null)"
pid1_uid="$(podman exec "$NAME" sh -c 'stat -c %u /proc/1' 2>/dev/null)"
if [ -n "$uid" ] && [ "$uid" != 0 ] && [ -n "$pid1_uid" ] && [ "$pid1_uid" != 0 ]; then
    pass "container user is not root (exec uid $uid, server process uid $pid1_uid)"
else
    fail "container user is not root (exec uid '${uid}', server process uid '${pid1_uid}')"
fi

if out="$("$PY" "$CLIENT" roundtrip "$BASE" 2>&1)"; then pass "publish -> WebSocket: $out"; else fail "publish -> WebSocket: $out"; fi

if podman logs "$NAME" 2>&1 | "$PY" -c '
import json, sys
for line in sys.stdin:
    try:
        if isinstance(json.loads(line), dict):
            sys.exit(0)
    except ValueError:
        pass
sys.exit(1)'; then
    info "logs are JSON lines (SQUALL_LOG_FORMAT=json)"
else
    info "WARN: no JSON log line seen (SQUALL_LOG_FORMAT=json)"
fi

# --- graceful stop -------------------------------------------------------------------
"$PY" "$CLIENT" hold "$BASE" 30 >"$tmp/hold.out" 2>&1 &
hold_pid=$!
for _ in $(seq 1 50); do
    grep -q READY "$tmp/hold.out" 2>/dev/null && break
    kill -0 "$hold_pid" 2>/dev/null || break
    sleep 0.1
done
grep -q READY "$tmp/hold.out" 2>/dev/null || info "WARN: shutdown subscriber not connected: $(cat "$tmp/hold.out")"

t0="$(now)"
podman stop -t 10 "$NAME" >/dev/null 2>&1
took="$(since "$t0")"
status="$(podman inspect --format '{{.State.Status}}' "$NAME" 2>/dev/null)"
code="$(podman inspect --format '{{.State.ExitCode}}' "$NAME" 2>/dev/null)"
if [ "$status" = exited ] && [ "$code" = 0 ] && awk -v t="$took" -v m="$STOP_MAX" 'BEGIN { exit !(t <= m) }'; then
    pass "SIGTERM: stopped in $took s with exit code 0"
else
    fail "SIGTERM: want exit code 0 within $STOP_MAX s; got status=$status exit=$code after $took s"
fi

if wait "$hold_pid"; then hold_rc=0; else hold_rc=$?; fi
hold_pid=""
if [ "$hold_rc" = 0 ]; then
    pass "SIGTERM: subscriber $(tail -n 1 "$tmp/hold.out")"
else
    fail "SIGTERM: subscriber: $(tail -n 1 "$tmp/hold.out")"
fi

summary
[ "$failed" -eq 0 ]
