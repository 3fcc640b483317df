"""Serving a node: listen, run until SIGTERM or SIGINT, shut down gracefully."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from config.settings import Settings
from server.app import make_app
from server.logs import setup_logging
from server.node import Node

log = logging.getLogger("squall")

LISTEN_BACKLOG = 4096


def serve(settings: Settings) -> int:
    """Serve until a signal; the process's exit status."""
    setup_logging(settings.log_level, settings.log_format)
    try:
        sockets = bind_sockets(settings.port, settings.host, family=socket.AF_INET
                               if ":" not in settings.host else socket.AF_UNSPEC,
                               backlog=LISTEN_BACKLOG)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", settings.host, settings.port, exc.strerror)
        return 1
    return asyncio.run(_serve(settings, sockets))


async def _serve(settings: Settings, sockets: list[socket.socket]) -> int:
    node = Node(settings)
    await node.start()
    server = HTTPServer(make_app(node), xheaders=True, max_body_size=max(
        settings.max_batch_bytes, settings.max_event_bytes) + 65536)
    server.add_sockets(sockets)
    _warn_if_open(settings)
    port = sockets[0].getsockname()[1]
    log.info("listening on http://%s:%d with broker %s", settings.host, port,
             settings.broker.split("@")[-1])
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    return await _shutdown(node, server, settings.shutdown_timeout)


async def _shutdown(node: Node, server: HTTPServer, timeout: float) -> int:
    """Stop accepting, close WebSockets with 1001, finish in-flight requests."""
    log.info("shutting down (up to %.0fs)", timeout)
    server.stop()
    await node.stop()
    try:
        await asyncio.wait_for(server.close_all_connections(), timeout)
    except TimeoutError:
        log.warning("connections still open after %.0fs; exiting anyway", timeout)
    log.info("stopped")
    return 0


def _warn_if_open(settings: Settings) -> None:
    if not settings.auth_enabled:
        log.warning("AUTH IS OFF: no API key and no JWT key configured, so anyone may "
                    "publish and subscribe. Set --api-keys and --jwt-secret (or "
                    "SQUALL_API_KEYS, SQUALL_JWT_SECRET) before exposing this server.")
