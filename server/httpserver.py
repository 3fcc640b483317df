"""The HTTP server: Tornado's, with bounded connections and JSON answers to bad requests.

What Tornado's own ``HTTPServer`` leaves open, and how it is closed here:

- Connections: at most ``max_total`` in all and ``max_per_ip`` per client address
  (WebSockets included: they are HTTP connections first). A connection that is
  waiting for a request's headers (a new one, an idle keep-alive one, or one sending
  its headers slowly) holds its place only until somebody needs it: when a bound is
  reached, the oldest such connection of that address (or, for the total, of any
  address) is closed to make room. One address holding thousands of half-sent
  requests therefore cannot lock out anyone, itself included; a connection that is
  busy (a request being handled, an open WebSocket) is never closed for room. When
  no room can be made, the new connection is answered ``429 rate_limited`` and closed.
- Time: a request's headers must arrive within ``header_timeout`` seconds (also how
  long an idle keep-alive connection stays), its body within ``body_timeout``.
- Accepting: when the process is out of file descriptors (``EMFILE``), accepting
  pauses for a growing while (up to a second) instead of spinning, one line is
  logged per ``LOG_EVERY`` seconds, and ``accept_errors`` counts it.
- Errors Tornado answers itself: a malformed request gets ``400 invalid_body`` and
  headers over ``max_header_size`` get ``431``, each with the JSON error body, where
  Tornado would send an empty 400 or close without a word. A body that goes bad after
  its answer began (a streaming batch's) just ends the connection: a status line in
  the middle of an answer would corrupt it.

The last point relies on Tornado's HTTP/1.1 reader: that it reads a request's head
with ``IOStream.read_until_regex`` (closing the stream with ``UnsatisfiableReadError``
past ``max_header_size``) and answers a malformed message with exactly
``MALFORMED_REPLY``. tests/test_http_server.py fails if either changes.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections import OrderedDict
from collections.abc import Awaitable, Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from tornado.concurrent import Future
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, UnsatisfiableReadError

from server.codec import dump_json
from server.logs import Throttle

log = logging.getLogger("squall.http")

MALFORMED_REPLY = b"HTTP/1.1 400 Bad Request\r\n\r\n"  # what Tornado writes, byte for byte
CONTINUE = b"HTTP/1.1 100 "  # the interim answer to Expect: 100-continue
ACCEPTS_PER_WAKEUP = 128
PAUSE = 0.05  # seconds accepting stops after EMFILE, doubling up to MAX_PAUSE
MAX_PAUSE = 1.0
LOG_EVERY = 10.0
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def error_reply(status: int, reason: str, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 response carrying the protocol's JSON error, then closing."""
    body = dump_json({"error": {"code": code, "message": message}})
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class Connections:
    """Open connections per address and in all, and which of them may make room."""

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self.evicted = 0
        self.refused = 0
        self._per_ip: dict[str, int] = {}
        self._idle: OrderedDict[ServerStream, None] = OrderedDict()  # oldest first
        self._idle_per_ip: dict[str, OrderedDict[ServerStream, None]] = {}

    def admit(self, ip: str) -> bool:
        """Count a new connection from ``ip`` in, closing idle ones to make room;
        False (not counted) when no room can be made."""
        if self.max_per_ip and self._per_ip.get(ip, 0) >= self.max_per_ip \
                and not self._evict(self._idle_per_ip.get(ip)):
            self.refused += 1
            return False
        if self.max_total and self.total >= self.max_total and not self._evict(self._idle):
            self.refused += 1
            return False
        self.total += 1
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        return True

    def release(self, stream: ServerStream) -> None:
        self.busy(stream)
        self.total -= 1
        left = self._per_ip.get(stream.ip, 1) - 1
        if left > 0:
            self._per_ip[stream.ip] = left
        else:
            self._per_ip.pop(stream.ip, None)

    def idle(self, stream: ServerStream) -> None:
        """``stream`` waits for a request's headers: it may be closed to make room."""
        self._idle[stream] = None
        self._idle_per_ip.setdefault(stream.ip, OrderedDict())[stream] = None

    def busy(self, stream: ServerStream) -> None:
        self._idle.pop(stream, None)
        mine = self._idle_per_ip.get(stream.ip)
        if mine is not None:
            mine.pop(stream, None)
            if not mine:
                del self._idle_per_ip[stream.ip]

    def from_ip(self, ip: str) -> int:
        return self._per_ip.get(ip, 0)

    def _evict(self, candidates: OrderedDict[ServerStream, None] | None) -> bool:
        if not candidates:
            return False
        oldest = next(iter(candidates))
        self.evicted += 1
        oldest.close()  # releases it, which takes it out of the candidates
        return True


class ServerStream(IOStream):
    """A server-side connection that tells ``Connections`` when it is idle, and
    answers in JSON where Tornado would answer a bad request with nothing."""

    def __init__(self, sock: socket.socket, ip: str, connections: Connections,
                 **kwargs: Any) -> None:
        super().__init__(sock, **kwargs)
        self.ip = ip
        self._connections: Connections | None = connections
        self._reading_head = False
        self._answering = False  # the answer to the current request has begun

    def read_until_regex(self, regex: bytes, max_bytes: int | None = None) -> Awaitable[bytes]:
        # how Tornado reads a request's head (and only that)
        self._reading_head = True
        self._answering = False
        if self._connections is not None:
            self._connections.idle(self)
        future = super().read_until_regex(regex, max_bytes)
        future.add_done_callback(self._head_done)  # type: ignore[attr-defined]
        return future

    def _head_done(self, future: Any) -> None:
        self._reading_head = False
        if self._connections is not None:
            self._connections.busy(self)

    def write(self, data: bytes | memoryview) -> Any:
        if data == MALFORMED_REPLY:
            if self._answering:  # a body went bad after its answer began (a stream's):
                done: Future[None] = Future()  # no second status line in it; Tornado
                done.set_result(None)          # closes the connection next
                return done
            data = error_reply(400, "Bad Request", "invalid_body",
                               "the request is not valid HTTP/1.1")
        elif bytes(data[:len(CONTINUE)]) != CONTINUE:
            self._answering = True
        return super().write(data)

    def close(self, exc_info: Any = False) -> None:
        if not self.closed():
            if isinstance(exc_info, UnsatisfiableReadError) and self._reading_head:
                self._tell(error_reply(431, "Request Header Fields Too Large",
                                       "payload_too_large", "the request's headers are "
                                       "larger than this server accepts"))
            connections, self._connections = self._connections, None
            if connections is not None:
                connections.release(self)
        super().close(exc_info)

    def _tell(self, reply: bytes) -> None:
        """Best effort, before closing: the reply fits a socket buffer or is lost."""
        try:
            self.socket.send(reply)
        except OSError:
            return


class _Acceptor:
    """Accepts on one listening socket; pauses instead of spinning when out of fds."""

    def __init__(self, sock: socket.socket, server: SquallHTTPServer) -> None:
        self.sock = sock
        self.server = server
        self.loop = IOLoop.current()
        self.pause = PAUSE
        self.paused = False
        self.stopped = False
        self._reports = Throttle(LOG_EVERY)
        self.loop.add_handler(sock, self._ready, IOLoop.READ)

    def _ready(self, fd: Any, events: int) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                connection, address = self.sock.accept()
            except BlockingIOError:
                self.pause = PAUSE
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._out_of_resources(exc)
                return
            self.server.accepted(connection, address)

    def _out_of_resources(self, exc: OSError) -> None:
        self.server.accept_errors += 1
        if self._reports.ready():
            level = logging.ERROR if exc.errno in _OUT_OF_RESOURCES else logging.WARNING
            log.log(level, "cannot accept connections (%s); pausing accepts, %d errors so far",
                    exc.strerror or exc, self.server.accept_errors)
        self.loop.remove_handler(self.sock)
        self.paused = True
        self.loop.call_later(self.pause, self._resume)
        self.pause = min(self.pause * 2, MAX_PAUSE)

    def _resume(self) -> None:
        if self.stopped or not self.paused:
            return
        self.paused = False
        self.loop.add_handler(self.sock, self._ready, IOLoop.READ)

    def stop(self) -> None:
        self.stopped = True
        if not self.paused:
            self.loop.remove_handler(self.sock)
        self.sock.close()


class SquallHTTPServer(HTTPServer):
    """``HTTPServer`` with the bounds of the module docstring.

    Build it with the usual HTTPServer arguments plus ``connections`` (the bounds);
    ``header_timeout`` is Tornado's ``idle_connection_timeout``.
    """

    def initialize(self, *args: Any, connections: Connections | None = None,
                   **kwargs: Any) -> None:
        super().initialize(*args, **kwargs)
        self.connections = connections or Connections(0, 0)
        self.accept_errors = 0
        self._acceptors: list[_Acceptor] = []

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        for sock in sockets:
            self._acceptors.append(_Acceptor(sock, self))

    def stop(self) -> None:
        """Stop listening; open connections stay (``close_all_connections`` ends them)."""
        for acceptor in self._acceptors:
            acceptor.stop()
        self._acceptors = []

    def accepted(self, connection: socket.socket, address: Any) -> None:
        ip = str(address[0]) if isinstance(address, tuple) else ""
        if not self.connections.admit(ip):
            _refuse(connection, "too many connections from this address, or in all; "
                    "try again later")
            return
        stream = ServerStream(connection, ip, self.connections,
                              max_buffer_size=self.max_buffer_size,
                              read_chunk_size=self.read_chunk_size)
        self.handle_stream(stream, address)


def _refuse(connection: socket.socket, message: str) -> None:
    connection.setblocking(False)
    try:
        connection.send(error_reply(429, "Too Many Requests", "rate_limited", message))
    except OSError:
        log.debug("a refused connection went away first")
    connection.close()


def server_metrics(server: SquallHTTPServer) -> Iterator[Metric]:
    """The HTTP server's counters, for the node's metrics."""
    connections = server.connections
    yield GaugeMetricFamily("squall_http_connections", "Open TCP connections (HTTP and "
                            "WebSocket)", value=connections.total)
    yield CounterMetricFamily("squall_http_connections_refused", "Connections refused "
                              "because no room could be made", value=connections.refused)
    yield CounterMetricFamily("squall_http_connections_evicted", "Connections waiting for "
                              "a request that were closed to make room",
                              value=connections.evicted)
    yield CounterMetricFamily("squall_accept_errors", "Failed accepts (out of file "
                              "descriptors, say)", value=server.accept_errors)
