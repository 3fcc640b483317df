"""Minimal client-side HTTP/1.1, WebSocket, SSE and line protocols for the load generator.

Only what the bench needs, kept cheap so the load generator is not the bottleneck:
keep-alive HTTP/1.1 requests with one request in flight per connection, the client
side of the WebSocket handshake, parsing of unmasked server frames and encoding of
masked client frames; an SSE stream and a TCP line connection that count events.
Everything runs as raw ``asyncio.Protocol`` callbacks: no
coroutine per message, no JSON parsing unless a message callback asks for the payload.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_TEXT = 0x1
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

MessageCallback = Callable[[bytes, int], None]
# per data-frame header: a pattern matching a run of frames with that same header
_SAME_FRAMES: dict[bytes, re.Pattern[bytes]] = {}
ResponseCallback = Callable[["HttpClient", int], None]


@dataclass(frozen=True)
class Url:
    """A parsed ``http://`` or ``ws://`` URL on the loopback interface."""

    host: str
    port: int
    target: str  # path and query, as sent on the request line

    @classmethod
    def parse(cls, url: str) -> Url:
        """Parse ``url``; refuse anything that is not loopback, the bench never leaves it."""
        parts = urlsplit(url)
        if parts.hostname not in LOOPBACK_HOSTS:
            raise ValueError(f"refusing non-loopback URL {url!r}")
        if parts.port is None:
            raise ValueError(f"URL needs an explicit port: {url!r}")
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        return cls(parts.hostname, parts.port, target)

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"


def post_request(url: Url, body: bytes, content_type: str = "application/json") -> bytes:
    """The bytes of one keep-alive ``POST`` carrying ``body``."""
    head = (
        f"POST {url.target} HTTP/1.1\r\nHost: {url.authority}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def get_request(url: Url) -> bytes:
    """The bytes of one keep-alive ``GET``."""
    return f"GET {url.target} HTTP/1.1\r\nHost: {url.authority}\r\n\r\n".encode()


def encode_client_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One masked client frame with FIN set (RFC 6455 section 5.2)."""
    size = len(payload)
    if size < 126:
        header = bytes((0x80 | opcode, 0x80 | size))
    elif size < 1 << 16:
        header = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
    mask = os.urandom(4)
    return header + mask + _xor_mask(payload, mask)


def _xor_mask(payload: bytes, mask: bytes) -> bytes:
    size = len(payload)
    if not size:
        return b""
    key = (mask * (size // 4 + 1))[:size]
    masked = int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")
    return masked.to_bytes(size, "big")


def _same_frames(header: bytes, length: int) -> re.Pattern[bytes]:
    """A pattern for consecutive complete frames with ``header`` (``length`` bytes each).

    Counting messages this way costs a few dozen nanoseconds each, not a Python loop
    turn: bursts from a server that batches writes stay cheap to count.
    """
    pattern = _SAME_FRAMES.get(header)
    if pattern is None:
        body = b"(?:" + re.escape(header) + b".{%d})*" % length
        pattern = _SAME_FRAMES[header] = re.compile(body, re.DOTALL)
    return pattern


_SAME_MESSAGES: dict[tuple[bytes, int, bytes], re.Pattern[bytes]] = {}


def _same_messages(prefix: bytes, size: int, separator: bytes) -> re.Pattern[bytes]:
    """A pattern for consecutive ``size``-byte messages that start with ``prefix`` and end
    with ``separator`` (SSE events, JSON lines)."""
    key = (prefix, size, separator)
    pattern = _SAME_MESSAGES.get(key)
    if pattern is None:
        middle = size - len(prefix) - len(separator)
        body = b"(?:" + re.escape(prefix) + b".{%d}" % middle + re.escape(separator) + b")*"
        pattern = _SAME_MESSAGES[key] = re.compile(body, re.DOTALL)
    return pattern


class HttpClient(asyncio.Protocol):
    """A keep-alive HTTP/1.1 connection with one request in flight at a time.

    ``on_response(client, status)`` runs for every complete response; it may call
    ``send`` again at once; ``on_lost(client)`` runs when the server closes it (for
    instance at a keep-alive request limit). Responses must carry ``Content-Length``
    or be chunked.
    """

    def __init__(
        self, on_response: ResponseCallback, on_lost: Callable[[HttpClient], None] | None = None
    ) -> None:
        self.on_response = on_response
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        while True:
            size, status = _response_size(buffer)
            if size == 0:
                break
            buffer = buffer[size:]
            self.on_response(self, status)
        self._buffer = buffer

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
            if self.on_lost is not None:
                self.on_lost(self)

    def close(self) -> None:
        self.on_lost = None
        if self.transport is not None:
            self.transport.close()


def _response_size(buffer: bytes) -> tuple[int, int]:
    """(bytes, status) of the first complete response in ``buffer``, or (0, 0)."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return 0, 0
    status = int(buffer[9:12])
    head = buffer[:head_end].lower()
    body_start = head_end + 4
    at = head.find(b"\r\ncontent-length:")
    if at >= 0:
        line_end = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : line_end if line_end >= 0 else None])
        end = body_start + length
        return (end, status) if len(buffer) >= end else (0, 0)
    if b"\r\ntransfer-encoding: chunked" in head:
        last = buffer.find(b"0\r\n\r\n", body_start)
        return (last + 5, status) if last >= 0 else (0, 0)
    return body_start, status  # no body (e.g. 204)


class WebSocketClient(asyncio.Protocol):
    """The client side of one WebSocket connection.

    ``opened`` resolves after a valid ``101`` handshake and fails otherwise. Every
    complete data message increments ``messages``; when ``on_message`` is set it is
    also called with the payload and the receive time (``time.monotonic_ns``, taken
    once per read). Pings are answered; a close frame is answered and recorded in
    ``close_code``.
    """

    def __init__(self, url: Url, subprotocol: str = "") -> None:
        self.messages = 0
        self.on_message: MessageCallback | None = None
        self.close_code: int | None = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self._request, self._accept = _handshake(url, subprotocol)
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self._request)

    def send_frame(self, frame: bytes) -> None:
        """Write one already encoded client frame."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        if not self.opened.done():
            buffer = self._finish_handshake(buffer)
        self._buffer = self._read_frames(buffer) if buffer else b""

    def _finish_handshake(self, buffer: bytes) -> bytes:
        head_end = buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return buffer
        head = buffer[:head_end]
        if not head.startswith(b"HTTP/1.1 101") or self._accept not in head:
            self.opened.set_exception(ConnectionError(head.split(b"\r\n", 1)[0].decode()))
            self.close()
            return b""
        self.opened.set_result(None)
        return buffer[head_end + 4 :]

    def _read_frames(self, buffer: bytes) -> bytes:
        """Consume complete frames; return the incomplete tail."""
        pos, end, count = 0, len(buffer), 0
        callback = self.on_message
        now = time.monotonic_ns() if callback is not None else 0
        while end - pos >= 2:
            first, length, head = buffer[pos], buffer[pos + 1] & 0x7F, 2
            if length == 126:
                if end - pos < 4:
                    break
                length, head = int.from_bytes(buffer[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if end - pos < 10:
                    break
                length, head = int.from_bytes(buffer[pos + 2 : pos + 10], "big"), 10
            stop = pos + head + length
            if stop > end:
                break
            opcode = first & 0x0F
            if opcode >= OP_CLOSE:
                self._control(opcode, buffer[pos + head : stop])
            elif first & 0x80:
                count += 1
                if callback is not None:
                    callback(buffer[pos + head : stop], now)
                elif end - stop >= stop - pos:  # only counting: skip same-size frames in C
                    run_end = _same_frames(buffer[pos : pos + head], length).match(buffer, stop)
                    assert run_end is not None  # the pattern also matches no frame
                    count += (run_end.end() - stop) // (stop - pos)
                    stop = run_end.end()
            pos = stop
        self.messages += count
        return buffer[pos:] if pos < end else b""

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            self.send_frame(encode_client_frame(payload, OP_PONG))
        elif opcode == OP_CLOSE:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.send_frame(encode_client_frame(payload[:2], OP_CLOSE))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during handshake"))
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def set_receive_low_water(self, size: int) -> None:
        """Be woken only once ``size`` bytes wait (``SO_RCVLOWAT``); 1 restores the default."""
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is not None and self.is_open:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, max(1, size))

    @property
    def is_open(self) -> bool:
        return self.opened.done() and not self.closed.done()


def _handshake(url: Url, subprotocol: str) -> tuple[bytes, bytes]:
    """The upgrade request and the ``Sec-WebSocket-Accept`` value it must yield."""
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
    lines = [
        f"GET {url.target} HTTP/1.1",
        f"Host: {url.authority}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key.decode()}",
        "Sec-WebSocket-Version: 13",
    ]
    if subprotocol:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), accept


async def open_websocket(url: Url, subprotocol: str = "", timeout: float = 10.0) -> WebSocketClient:
    """Connect and complete the handshake, or raise."""
    loop = asyncio.get_running_loop()
    _, client = await asyncio.wait_for(
        loop.create_connection(lambda: WebSocketClient(url, subprotocol), url.host, url.port),
        timeout,
    )
    try:
        await asyncio.wait_for(asyncio.shield(client.opened), timeout)
    except BaseException:
        client.close()
        raise
    return client


async def open_http(
    url: Url,
    on_response: ResponseCallback,
    on_lost: Callable[[HttpClient], None] | None = None,
    timeout: float = 10.0,
) -> HttpClient:
    """Open one keep-alive HTTP connection."""
    loop = asyncio.get_running_loop()
    _, client = await asyncio.wait_for(
        loop.create_connection(lambda: HttpClient(on_response, on_lost), url.host, url.port),
        timeout,
    )
    return client


class _Counting(asyncio.Protocol):
    """What the SSE and line subscribers share with ``WebSocketClient``: ``messages``,
    ``on_message(payload, now)``, ``opened``/``closed``, ``close``."""

    separator = b"\n"

    def __init__(self) -> None:
        self.messages = 0
        self.on_message: MessageCallback | None = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self._buffer = b""

    def _count(self, buffer: bytes) -> bytes:
        """Count complete messages in ``buffer``; return the incomplete tail.

        As for WebSocket frames, a run of messages of one size is counted by one
        regular-expression match (a C loop), not a Python loop turn per message.
        """
        callback = self.on_message
        if callback is not None:
            last = buffer.rfind(self.separator)
            if last < 0:
                return buffer
            end = last + len(self.separator)
            messages = buffer[:end].split(self.separator)[:-1]
            now = time.monotonic_ns()
            for message in messages:
                callback(message, now)
            self.messages += sum(1 for message in messages if self._counts(message))
            return buffer[end:]
        separator, width = self.separator, len(self.separator)
        pos, count = 0, 0
        while True:
            stop = buffer.find(separator, pos)
            if stop < 0:
                break
            stop += width
            if not self._counts(buffer[pos:stop]):
                pos = stop
                continue
            size = stop - pos
            run = _same_messages(buffer[pos:pos + 4], size, separator).match(buffer, stop)
            assert run is not None  # the pattern also matches no message
            count += 1 + (run.end() - stop) // size
            pos = run.end()
        self.messages += count
        return buffer[pos:] if pos < len(buffer) else b""

    def _counts(self, message: bytes) -> bool:
        """Whether ``message`` is one to count (not a keepalive)."""
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed while opening"))
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def set_receive_low_water(self, size: int) -> None:
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is not None and self.is_open:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, max(1, size))

    @property
    def is_open(self) -> bool:
        return self.opened.done() and not self.closed.done()


class SseClient(_Counting):
    """One Server-Sent Events stream; each event (heartbeat comments aside) is a message."""

    separator = b"\n\n"

    def __init__(self, url: Url) -> None:
        super().__init__()
        self._request = (f"GET {url.target} HTTP/1.1\r\nHost: {url.authority}\r\n"
                         "Accept: text/event-stream\r\n\r\n").encode()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        if not self.opened.done():
            head_end = buffer.find(b"\r\n\r\n")
            if head_end < 0:
                self._buffer = buffer
                return
            if not buffer.startswith(b"HTTP/1.1 200"):
                self.opened.set_exception(ConnectionError(buffer[:head_end].decode()))
                self.close()
                return
            self.opened.set_result(None)
            buffer = buffer[head_end + 4:]
        self._buffer = self._count(buffer)

    def _counts(self, message: bytes) -> bool:
        return not message.startswith(b":")  # a heartbeat comment


class LineClient(_Counting):
    """One TCP line-protocol connection that sends ``first`` (its subscribe) on connect."""

    def __init__(self, first: bytes) -> None:
        super().__init__()
        self._first = first

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._first)
        self.opened.set_result(None)

    def send_frame(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)

    def data_received(self, data: bytes) -> None:
        self._buffer = self._count(self._buffer + data if self._buffer else data)


Subscriber = WebSocketClient | SseClient | LineClient


async def open_subscriber(transport: str, url: Url, subprotocol: str = "", topic: str = "",
                          timeout: float = 10.0) -> Subscriber:
    """A subscriber over ``transport`` (``ws``, ``sse`` or ``tcp``), connected."""
    if transport == "ws":
        return await open_websocket(url, subprotocol, timeout)
    loop = asyncio.get_running_loop()
    if transport == "sse":
        factory: Callable[[], _Counting] = lambda: SseClient(url)  # noqa: E731
    else:
        line = b'{"type":"subscribe","topic":%s}\n' % json.dumps(topic).encode()
        factory = lambda: LineClient(line)  # noqa: E731
    _, client = await asyncio.wait_for(loop.create_connection(factory, url.host, url.port),
                                       timeout)
    try:
        await asyncio.wait_for(asyncio.shield(client.opened), timeout)
    except BaseException:
        client.close()
        raise
    return client  # type: ignore[return-value]
