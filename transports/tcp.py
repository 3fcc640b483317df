"""The TCP line protocol on ``--tcp-port``: one JSON object per line, both ways.

For services on the same network that want a persistent connection without a
WebSocket library; ``nc`` works. The asynchat pattern: input is buffered and split
on ``\\n`` (a ``\\r`` before it is dropped, blank lines are skipped), each line is one
command for the session, exactly as a WebSocket JSON frame would be, plus
``{"type": "auth", "token": ...}``. A line longer than ``max_frame_bytes`` closes
the connection with 1009. Output is server/wire.py's ``LINES`` format; closing
writes ``{"type": "close", "code": C, "reason": ...}``, then half-closes.

A connection starts anonymous (or with every right when auth is off); the
connection limits and, when configured, the authorization webhook admit it as they
admit any client (server/admission.py), without headers.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from tornado.iostream import IOStream
from tornado.netutil import bind_sockets
from tornado.tcpserver import TCPServer

from config.settings import Settings
from server.admission import Request
from server.node import Node
from server.wire import LINES
from transports.stream import StreamTransport, open_session

log = logging.getLogger("squall.tcp")

CLOSE_TOO_BIG = 1009
LISTEN_BACKLOG = 4096


class LineTransport(StreamTransport):
    """One line-protocol connection."""

    __slots__ = ("_buffer", "max_line")

    def __init__(self, stream: IOStream, max_line: int) -> None:
        super().__init__(stream)
        self.max_line = max_line
        self._buffer = b""

    def closing_bytes(self, code: int, reason: str) -> bytes:
        return LINES.frame({"type": "close", "code": code, "reason": reason})

    def data_received(self, data: bytes) -> None:
        if self.closing or self.sink is None:
            self.read()
            return
        buffer = self._buffer + data if self._buffer else data
        *lines, rest = buffer.split(b"\n")
        received, limit = self.sink.received, self.max_line
        for raw in lines:
            line = raw[:-1] if raw.endswith(b"\r") else raw
            if len(line) > limit:
                self._too_long()
                break
            if line and not line.isspace():
                received(line)
            if self.closing:
                break
        # (the line so far may end in the \r of its \r\n)
        if not self.closing and len(rest) > limit + rest.endswith(b"\r"):
            self._too_long()
        self._buffer = b"" if self.closing else rest
        self.read()

    def _too_long(self) -> None:
        self.close(CLOSE_TOO_BIG, f"a line is longer than {self.max_line} bytes")


class LineServer(TCPServer):
    """Accepts line-protocol clients and hands each to a session."""

    def __init__(self, node: Node) -> None:
        super().__init__()
        self.node = node

    async def handle_stream(self, stream: IOStream, address: Any) -> None:
        node = self.node
        transport = LineTransport(stream, node.settings.max_frame_bytes)
        ip = address[0] if isinstance(address, tuple) else ""
        await open_session(node, transport, LINES, Request(ip=ip))


def bind_tcp(settings: Settings) -> list[socket.socket]:
    """The listening sockets of ``--tcp-port`` (none when it is 0), bound before any fork."""
    if not settings.tcp_port:
        return []
    family = socket.AF_INET if ":" not in settings.host else socket.AF_UNSPEC
    return bind_sockets(settings.tcp_port, settings.host, family=family, backlog=LISTEN_BACKLOG)


def serve_lines(node: Node, sockets: list[socket.socket]) -> LineServer | None:
    """Serve the line protocol on ``sockets``; None when there are none."""
    if not sockets:
        return None
    server = LineServer(node)
    server.add_sockets(sockets)
    host, port = sockets[0].getsockname()[:2]
    log.info("TCP line protocol on %s:%d", host, port)
    return server
