"""A short way in for the busiest requests: plain publishes, single and batched.

A single publish costs what Tornado's ``RequestHandler`` costs (its objects, its
bookkeeping and its response machinery are most of the request). ``FastPaths`` is the
server's connection delegate in front of the ``Application``: it takes a publish
itself, as a plain ``HTTPMessageDelegate`` on Tornado's public HTTP/1.1 interface,
when the request is plain (a ``POST`` to ``/v1/topics/{topic}/events`` with a topic
without percent-encoding, or to ``/v1/events`` that is no streaming batch, with a
``Content-Length`` within the path's limit, and no ``Origin``, ``Expect`` or
``Transfer-Encoding`` header), and hands every other request to the Application as
before. It answers through the same functions as the handlers (grant, rate limit,
topic, body, publish) and logs the same access line, so the two ways in are one
behaviour.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import tornado
from tornado.httputil import (
    HTTPConnection,
    HTTPHeaders,
    HTTPMessageDelegate,
    HTTPServerConnectionDelegate,
    RequestStartLine,
    ResponseStartLine,
)
from tornado.web import Application

from handlers.publish import publish_batch, publish_one, publisher
from handlers.stream import MEDIA_TYPES as STREAM_TYPES
from server.codec import accept_codec
from server.errors import SquallError
from server.node import Node

log = logging.getLogger("squall.http")

_PUBLISH = re.compile(r"/v1/topics/([A-Za-z0-9_\-:@.]+)/events")
_SERVER = f"TornadoServer/{tornado.version}"
_LENGTH_DIGITS = 18  # a Content-Length this long is past every limit

LogLine = Callable[[int, str, str, str, str, float], None]
"""The access log's ``line``: (status, method, uri, path, ip, milliseconds)."""


class FastPaths(HTTPServerConnectionDelegate):
    """``application``'s delegate, taking plain single publishes itself."""

    def __init__(self, application: Application, node: Node, log_line: LogLine) -> None:
        self.application = application
        self.node = node
        self.log_line = log_line
        self.answering: set[asyncio.Task[None]] = set()
        self._date = ("", 0)

    def start_request(self, server_conn: object,
                      request_conn: HTTPConnection) -> HTTPMessageDelegate:
        return _Dispatch(self, server_conn, request_conn)

    def on_close(self, server_conn: object) -> None:
        self.application.on_close(server_conn)

    def take(self, start_line: RequestStartLine, headers: HTTPHeaders,
             connection: HTTPConnection) -> HTTPMessageDelegate | None:
        """A delegate for a plain publish, or None for the Application."""
        if start_line.method != "POST":
            return None
        length = headers.get("Content-Length", "")
        if ("Origin" in headers or "Expect" in headers or "Transfer-Encoding" in headers
                or not (length.isascii() and length.isdigit()) or len(length) > _LENGTH_DIGITS):
            return None  # (a longer length is past every limit: the Application answers it)
        path = start_line.path.partition("?")[0]
        settings = self.node.settings
        if path == "/v1/events":
            if (int(length) > settings.max_batch_bytes
                    or headers.get("Content-Type", "").split(";")[0].strip().lower()
                    in STREAM_TYPES):
                return None
            return _Publish(self, connection, start_line, headers, None)
        found = _PUBLISH.fullmatch(path)
        if found is None or int(length) > settings.max_event_bytes:
            return None
        return _Publish(self, connection, start_line, headers, found.group(1))

    def date(self) -> str:
        """The ``Date`` header's value, made once a second."""
        now = int(time.time())
        text, second = self._date
        if second != now:
            text = email.utils.formatdate(now, usegmt=True)
            self._date = (text, now)
        return text


class _Dispatch(HTTPMessageDelegate):
    """Waits for a request's head to pick who handles it, then passes everything on."""

    __slots__ = ("connection", "delegate", "paths", "server_conn")

    def __init__(self, paths: FastPaths, server_conn: object,
                 connection: HTTPConnection) -> None:
        self.paths = paths
        self.server_conn = server_conn
        self.connection = connection
        self.delegate: HTTPMessageDelegate | None = None

    def headers_received(self, start_line: RequestStartLine | ResponseStartLine,
                         headers: HTTPHeaders) -> Awaitable[None] | None:
        assert isinstance(start_line, RequestStartLine)
        paths = self.paths
        delegate = paths.take(start_line, headers, self.connection) or (
            paths.application.start_request(self.server_conn, self.connection))
        self.delegate = delegate
        return delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        assert self.delegate is not None
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        if self.delegate is not None:
            self.delegate.finish()

    def on_connection_close(self) -> None:
        if self.delegate is not None:
            self.delegate.on_connection_close()


class _Publish(HTTPMessageDelegate):
    """One plain publish, single (``topic``) or a batch (``topic`` None): the body,
    then the answer and the access line."""

    def __init__(self, paths: FastPaths, connection: HTTPConnection,
                 start_line: RequestStartLine, headers: HTTPHeaders,
                 topic: str | None) -> None:
        self.paths = paths
        self.connection = connection
        self.start_line = start_line
        self.headers = headers
        self.topic = topic
        self.chunks: list[bytes] = []
        self.started = time.perf_counter()
        context = getattr(connection, "context", None)  # Tornado's, with the client address
        self.ip = str(getattr(context, "remote_ip", "") or "")

    def headers_received(self, start_line: RequestStartLine | ResponseStartLine,
                         headers: HTTPHeaders) -> None:
        return None

    def data_received(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def finish(self) -> None:
        task = asyncio.get_running_loop().create_task(self._answer())
        answering = self.paths.answering
        answering.add(task)
        task.add_done_callback(answering.discard)

    def on_connection_close(self) -> None:
        self.chunks = []  # gone before its body ended: nothing is published

    async def _answer(self) -> None:
        paths, headers = self.paths, self.headers
        extra: dict[str, str] = {}
        try:
            rights = publisher(paths.node, headers.get("Authorization"), self.ip)
            body, content_type = b"".join(self.chunks), headers.get("Content-Type")
            if self.topic is None:
                value = await publish_batch(paths.node, rights, content_type, body)
            else:
                value = await publish_one(paths.node, rights, self.topic, content_type,
                                          headers.get("Idempotency-Key"), body)
            status = 202
        except SquallError as exc:
            status, value = exc.status, {"error": {"code": exc.code, "message": exc.message}}
            if status == 401:
                extra["WWW-Authenticate"] = 'Bearer realm="squall"'
            retry_after = getattr(exc, "retry_after", 0)
            if retry_after:
                extra["Retry-After"] = str(retry_after)
        except Exception:  # one choke point, as RequestHandler's: logged, answered 500
            log.exception("Uncaught exception POST %s (%s)", self.start_line.path, self.ip)
            status, value = 500, {"error": {"code": "internal_error",
                                            "message": "internal error"}}
        self._reply(status, value, extra)

    def _reply(self, status: int, value: Any, extra: dict[str, str]) -> None:
        codec = accept_codec(self.headers.get("Accept"))
        body = codec.dumps(value)
        headers = HTTPHeaders({
            "Server": _SERVER, "Content-Type": "application/msgpack" if codec.binary
            else "application/json", "Date": self.paths.date(),
            "Content-Length": str(len(body)), **extra})
        self.connection.write_headers(
            ResponseStartLine("HTTP/1.1", status, http.HTTPStatus(status).phrase), headers, body)
        self.connection.finish()
        line = self.start_line
        self.paths.log_line(status, line.method, line.path, line.path.partition("?")[0],
                            self.ip, 1000.0 * (time.perf_counter() - self.started))
