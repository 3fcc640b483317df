"""The part every transport shares: one Tornado ``IOStream``, written and read without a
task of its own.

``StreamTransport`` implements the engine's ``Transport`` seam (server/connection.py):

- ``write`` is the fan-out fast path. When the stream's own buffer is empty the bytes
  go straight to ``socket.send``; what the kernel does not take, and everything while
  a write is pending, goes through ``IOStream.write``, which keeps the order. So
  frames never interleave, and a write costs one system call.
- ``close(code, reason)`` writes the transport's closing bytes (``closing_bytes``),
  then ends the connection: the subclass says how (``after_closing``); by default
  the server half-closes (FIN) and waits, reading and dropping what still comes,
  until the client closes too or ``CLOSE_TIMEOUT`` passes. Writes after ``close``
  are dropped.

Reading is a chain of ``read_bytes(partial=True)`` callbacks, so an idle connection
holds one pending future and no coroutine. ``data_received`` gets each chunk.

The transport tells its ``Sink`` (the session, server/session.py) when the stream is
gone, with the close code the connection ended with: the one the server sent, else
the client's (WebSocket), else None.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterable
from typing import Any, Protocol

from tornado.iostream import IOStream, SSLIOStream, StreamClosedError
from tornado.web import RequestHandler

from server.admission import Refused, Request, admit
from server.connection import CLOSE_INTERNAL_ERROR
from server.node import Node
from server.session import Session
from server.wire import WireFormat

log = logging.getLogger("squall.transport")

READ_CHUNK = 64 * 1024
CLOSE_TIMEOUT = 5.0  # seconds a closing connection may take before it is cut


def take_stream(handler: RequestHandler, status: int, reason: str,
                headers: list[tuple[str, str]]) -> IOStream:
    """Detach the request's stream, answer with ``status`` and ``headers`` by hand and
    log the request: from here on the caller owns the connection."""
    handler.set_status(status)
    handler.application.log_request(handler)
    stream = handler.detach()
    handler.ui = None  # type: ignore[assignment]  # as finish() does: a cycle otherwise
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{name}: {value}" for name, value in headers)]
    stream.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace"))
    return stream


class Sink(Protocol):
    """Who hears what a transport reads: a ``Session``, or a test's echo."""

    def received(self, message: bytes | str) -> None:
        """One complete client message."""

    def answered(self) -> None:
        """The client answered a keepalive ping."""

    def closed(self, code: int | None, reason: str | None) -> None:
        """The connection is gone."""


class StreamTransport:
    """One client's IOStream. Subclasses frame the bytes (WebSocket, SSE, lines)."""

    __slots__ = ("_close_timer", "closing", "end_code", "end_reason", "sink", "stream")

    def __init__(self, stream: IOStream) -> None:
        self.stream = stream
        self.sink: Sink | None = None
        self.closing = False  # close() was called: nothing more is written
        self.end_code: int | None = None
        self.end_reason: str | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        stream.set_close_callback(self._stream_closed)
        with contextlib.suppress(StreamClosedError):
            stream.set_nodelay(True)

    # -- the Transport seam -------------------------------------------------------------

    def write(self, data: bytes | memoryview) -> asyncio.Future[None] | None:
        """See ``server.connection.Transport.write``."""
        if self.closing:
            return None
        return self._send(data)

    def close(self, code: int, reason: str) -> None:
        """See ``server.connection.Transport.close``."""
        if self.closing:
            return
        self.closing = True
        if self.end_code is None:
            self.end_code, self.end_reason = code, reason
        self._start_close_timer()
        written = self._send(self.closing_bytes(code, reason))
        if written is None:
            self.after_closing()
        else:
            written.add_done_callback(lambda _: self.after_closing())

    # -- for subclasses -------------------------------------------------------------------

    def closing_bytes(self, code: int, reason: str) -> bytes:
        """What tells the client it is being closed, and why."""
        raise NotImplementedError

    def after_closing(self) -> None:
        """The closing bytes are written (or lost): half-close, and let the client end it."""
        sock = self.stream.socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)

    def data_received(self, data: bytes) -> None:
        """A chunk of client bytes. Call ``read`` to get the next one. This one drops
        them, as every transport does once it is closing."""
        self.read()

    def read(self, size: int = READ_CHUNK, partial: bool = True) -> None:
        """Ask for the next chunk: up to ``size`` bytes as soon as any come, or exactly
        ``size`` bytes when not ``partial``."""
        try:
            future = self.stream.read_bytes(size, partial=partial)
        except StreamClosedError:
            return
        future.add_done_callback(self._on_read)  # type: ignore[attr-defined]

    def abort(self) -> None:
        """Cut the connection now."""
        self.stream.close()

    # -- inside -----------------------------------------------------------------------------

    def _send(self, data: bytes | memoryview) -> asyncio.Future[None] | None:
        stream = self.stream
        if stream.closed():
            return None
        if not stream.writing() and not isinstance(stream, SSLIOStream):
            try:
                sent = stream.socket.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                stream.close()  # the close callback tells the sink
                return None
            if sent == len(data):
                return None
            if sent:
                data = memoryview(data)[sent:]
        try:
            return stream.write(data)
        except StreamClosedError:
            return None

    def _on_read(self, future: asyncio.Future[bytes]) -> None:
        if future.cancelled() or future.exception() is not None:
            return  # the stream closed: its close callback follows
        self.data_received(future.result())

    def _start_close_timer(self) -> None:
        loop = asyncio.get_running_loop()
        self._close_timer = loop.call_later(CLOSE_TIMEOUT, self.abort)

    def _stream_closed(self) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self.closing = True
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.closed(self.end_code, self.end_reason)


async def open_session(node: Node, transport: StreamTransport, wire: WireFormat,
                       client: Request, commands: Iterable[dict[str, Any]] = ()) -> None:
    """Admit ``client`` and start its session on ``transport``, running ``commands``
    first; a refused client is closed with the refusal's code."""
    try:
        admitted = await admit(node, client)
    except Refused as refused:
        log.debug("refusing a %s client from %s with %d: %s", wire.name, client.ip,
                  refused.close_code, refused.message)
        transport.close(refused.close_code, refused.message)
        transport.read()  # for the client's own close
        return
    except Exception:  # a bug: this client is closed, not left open with no session
        log.exception("admitting a %s client from %s failed", wire.name, client.ip)
        transport.close(CLOSE_INTERNAL_ERROR, "internal error")
        transport.read()
        return
    if transport.closing:  # gone while the authorization webhook was asked
        admitted.release()
        return
    session = Session(node, transport, wire, admitted)
    transport.sink = session
    transport.read()
    session.start(commands)
