"""Serving a node: listen, run until SIGTERM or SIGINT, shut down gracefully.

With ``--workers N`` above 1 the listening sockets are bound once and N worker
processes are forked to share them; each runs its own node. The parent only
supervises: it passes SIGTERM and SIGINT on, restarts a worker that died, and
exits when every worker has.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from tornado.netutil import bind_sockets
from tornado.web import Application

from config.settings import Settings, SettingsError
from handlers.fastpath import FastPaths
from server import extensions
from server.app import access_log_of, make_app
from server.httpserver import Connections, SquallHTTPServer, server_metrics
from server.logs import setup_logging
from server.node import Node
from transports.tcp import LineServer, bind_tcp, serve_lines

log = logging.getLogger("squall")

LISTEN_BACKLOG = 4096
SPARE_FILES = 256  # descriptors kept for Redis, webhooks, logs and the like
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
EARLY_EXIT = 5.0  # seconds: a worker that dies sooner is failing to start, not crashing
RESTART_DELAY = 1.0


# the host names nothing, or nothing of this machine's (a DNS that does not answer now
# is not a bad value: the status is then 1, for a supervisor to try again)
_BAD_HOST = {socket.EAI_NONAME, socket.EAI_FAMILY, errno.EADDRNOTAVAIL} | (
    {socket.EAI_NODATA} if hasattr(socket, "EAI_NODATA") else set())


def _bad_setting(line: str) -> None:
    """A bad value found at start, in the one-line form of every other (run.py)."""
    print(f"squall: {line}", file=sys.stderr)


def _cannot_listen(host: str, port: int, port_setting: str, exc: Exception) -> int:
    """Say in one line why the server cannot listen; the exit status: 2 when the host is
    a bad value (no address, or none of this machine's), as for any bad setting."""
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if isinstance(exc, UnicodeError) or (isinstance(exc, OSError) and exc.errno in _BAD_HOST):
        _bad_setting(f"setting host = {host!r}: cannot listen on it: {why} (--host or "
                     "SQUALL_HOST)")
        return 2
    log.error("cannot listen on %s:%s: %s (another port: %s)", host, port, why, port_setting)
    return 1


def serve(settings: Settings) -> int:
    """Serve until a signal; the process's exit status."""
    setup_logging(settings.log_level, settings.log_format)
    try:
        extensions.prepare(settings)
    except SettingsError as exc:
        _bad_setting(str(exc))
        return 2
    try:
        sockets = bind_sockets(settings.port, settings.host, family=socket.AF_INET
                               if ":" not in settings.host else socket.AF_UNSPEC,
                               backlog=LISTEN_BACKLOG)
    except (OSError, UnicodeError) as exc:
        return _cannot_listen(settings.host, settings.port, "--port or SQUALL_PORT", exc)
    try:
        tcp_sockets = bind_tcp(settings)
    except (OSError, UnicodeError) as exc:
        return _cannot_listen(settings.host, settings.tcp_port, "--tcp-port or "
                              "SQUALL_TCP_PORT", exc)
    if settings.workers > 1:
        status = _run_workers(settings.workers)
        if status is not None:  # the parent, once every worker has exited
            for sock in [*sockets, *tcp_sockets]:
                sock.close()
            return status
    return run_loop(settings.event_loop, _serve(settings, sockets, tcp_sockets))


def run_loop(kind: str, main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` on the event loop ``kind`` names (``event_loop``)."""
    if kind == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def _run_workers(count: int) -> int | None:
    """Fork ``count`` workers and supervise them; returns None in a worker.

    A worker that dies is started again, unless it died within ``EARLY_EXIT``
    seconds of its start (it cannot start: all stop). The parent's exit status is
    the worst of the workers' after the stop.
    """
    started: dict[int, tuple[int, float]] = {}  # pid -> (worker index, start time)
    for index in range(count):
        pid = _fork()
        if pid == 0:
            return None
        started[pid] = (index, time.monotonic())
    log.info("started %d workers: %s", count, ", ".join(map(str, started)))
    stopping = _forward_signals(started)
    status = 0
    giving_up = False
    while started:
        pid, code = os.wait()
        index, since = started.pop(pid)
        failed = _exit_status(code)
        if stopping() or giving_up:
            status = max(status, failed)
            continue
        if failed and time.monotonic() - since < EARLY_EXIT:
            log.error("worker %d exited at start (status %d); stopping", index, failed)
            status, giving_up = failed, True
            _signal_all(started, signal.SIGTERM)
            continue
        log.error("worker %d (pid %d) died (status %d); starting another", index, pid, failed)
        time.sleep(RESTART_DELAY)
        pid = _fork()
        if pid == 0:
            return None
        started[pid] = (index, time.monotonic())
    return status


def _fork() -> int:
    """Fork with stop signals held back, so none is lost or caught by the wrong handler."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    pid = os.fork()
    if pid == 0:
        for signum in _STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    return pid


def _forward_signals(workers: dict[int, tuple[int, float]]) -> Callable[[], bool]:
    """Pass SIGTERM and SIGINT on to the workers; returns whether one came."""
    received: list[int] = []

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        _signal_all(workers, signum)

    for signum in _STOP_SIGNALS:
        signal.signal(signum, forward)
    return lambda: bool(received)


def _signal_all(workers: dict[int, tuple[int, float]], signum: int) -> None:
    for pid in list(workers):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            log.debug("worker %d is already gone", pid)


def _exit_status(wait_status: int) -> int:
    """A worker's exit code, or 128 + the signal that ended it (as a shell says)."""
    code = os.waitstatus_to_exitcode(wait_status)
    return code if code >= 0 else 128 - code


async def _serve(settings: Settings, sockets: list[socket.socket],
                 tcp_sockets: list[socket.socket]) -> int:
    node = Node(settings)
    await node.start()
    server = http_server(node)
    server.add_sockets(sockets)
    lines = serve_lines(node, tcp_sockets)
    _warn_if_open(settings)
    _tune_gc()
    port = sockets[0].getsockname()[1]
    log.info("listening on http://%s:%d with broker %s", settings.host, port,
             settings.broker.split("@")[-1])
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    return await _shutdown(node, server, settings.shutdown_timeout, lines)


# Young objects collected after this many allocations (Python's default is 700): a
# batch of 100 events makes about a thousand, and nearly all are freed by reference
# counting anyway. Measured: Redis batch ingest 7-26% faster in three pairs of runs.
GC_THRESHOLDS = (50_000, 20, 100)


def _tune_gc() -> None:
    """Leave what startup made (modules, the app, the node) out of every collection,
    and collect less often: the cyclic collector then walks what requests make, seldom."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def _shutdown(node: Node, server: SquallHTTPServer, timeout: float,
                    lines: LineServer | None = None) -> int:
    """Stop accepting, close every client with 1001, finish in-flight requests."""
    log.info("shutting down (up to %.0fs)", timeout)
    server.stop()
    if lines is not None:
        lines.stop()
    await node.drain(timeout)
    try:
        await asyncio.wait_for(server.close_all_connections(), timeout)
    except TimeoutError:
        log.warning("connections still open after %.0fs; exiting anyway", timeout)
    await node.close()
    log.info("stopped")
    return 0


def http_server(node: Node, app: Application | None = None) -> SquallHTTPServer:
    """The node's HTTP server (for ``app``, by default the node's own), with its
    connection bounds and timeouts; its counters go to the node's metrics."""
    settings = node.settings
    most = connection_budget(settings.max_http_connections)
    routes = FastPaths(app or make_app(node), node, access_log_of(node).line)
    server = SquallHTTPServer(
        routes, xheaders=settings.trust_proxy_headers,
        max_body_size=max(settings.max_batch_bytes, settings.max_event_bytes) + 65536,
        max_header_size=settings.max_header_bytes,
        idle_connection_timeout=settings.header_timeout, body_timeout=settings.body_timeout,
        connections=Connections(most, settings.max_http_connections_per_ip))
    node.metric_sources.append(lambda: server_metrics(server))
    return server


def connection_budget(wanted: int) -> int:
    """``wanted`` connections (0: as many as fit), within the open-file limit (raised to
    its hard limit first) less ``SPARE_FILES`` for everything else the process opens."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft == resource.RLIM_INFINITY:
        return wanted
    fits = max(soft - SPARE_FILES, 1)
    if wanted == 0 or wanted > fits:
        if wanted:
            log.warning("max_http_connections %d does not fit the open-file limit %d; "
                        "using %d", wanted, soft, fits)
        return fits
    return wanted


def _warn_if_open(settings: Settings) -> None:
    if not settings.auth_enabled:
        log.warning("AUTH IS OFF: no API key and no JWT key configured, so anyone may "
                    "publish and subscribe. Set --api-keys and --jwt-secret (or "
                    "SQUALL_API_KEYS, SQUALL_JWT_SECRET) before exposing this server.")
