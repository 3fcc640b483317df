"""``GET /v1/ws``: the WebSocket endpoint (protocol.md, WebSocket API).

Limits (settings): ``max_frame_bytes`` per client message (closed with 1009 above),
``max_event_bytes`` per published event, ``max_subscriptions`` per connection,
``max_bad_frames`` before a close with 4000, ``send_queue_bytes`` before a close with
4008, and server pings every ``ping_interval`` seconds, closing with 1001 after
``ping_timeout`` without a pong (server/keepalive.py, one task for the node).

A bad frame is answered with an ``error`` frame and the connection stays open. All
outgoing frames, replies included, go through the connection's queue, so replies
and events keep their order.

Admission, in this order, each accepting the handshake and then closing so that a
browser sees the code: an ``Origin`` that ``allowed_origins`` refuses closes with 4003;
a bad token (``?token=`` or ``Authorization``) with 4001; a connection over
``max_connections`` or ``max_connections_per_ip`` with 4029. A token's ``exp`` closes
the connection with 4001 when it comes. Each subscribe and publish is checked
against the client's grant (server/auth.py): ``forbidden`` is an error frame, and the
connection stays open. Frames over ``frame_rate``/``frame_burst`` are answered with
``rate_limited`` and, if the client keeps on, closed with 4029 (server/ratelimit.py).

``SocketHandler`` runs the handshake and admission; an admitted client is handed to
a ``Session``, which is all that an open connection keeps (idle connections are most
of a server's memory).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import time
from typing import Any
from urllib.parse import urlsplit

from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, StreamClosedError
from tornado.log import app_log
from tornado.websocket import (
    WebSocketHandler,
    WebSocketProtocol,
    WebSocketProtocol13,
    _WebSocketParams,
)

from server import signals
from server.auth import Auth, Grant, request_summary
from server.broker.base import PublishRequest
from server.codec import BY_SUBPROTOCOL, JSON, Codec, dump_json
from server.commands import (
    FrameError,
    Ping,
    Publish,
    Subscribe,
    Unsubscribe,
    error_frame,
    parse_command,
    with_ref,
)
from server.connection import Connection
from server.errors import SquallError
from server.node import Node
from server.ratelimit import FrameLimiter, RateLimited, Verdict

log = logging.getLogger("squall.ws")

CLOSE_PROTOCOL_ABUSE = 4000
CLOSE_UNAUTHORIZED = 4001
CLOSE_GOING_AWAY = 1001
CLOSE_FORBIDDEN = 4003
CLOSE_RATE_LIMITED = 4029
CLOSE_INTERNAL_ERROR = 1011
_client_ids = itertools.count(1)
_id_prefix = os.urandom(3).hex()


class _Protocol(WebSocketProtocol13):
    """Tornado's protocol, reading frames in a task of its own.

    Tornado reads frames in the coroutine that ran the handshake, which keeps the
    request handler, the request and its headers alive as long as the connection.
    Here that coroutine ends once ``open`` is done, so an open connection holds only
    the ``Session`` the handler handed it to. Like Tornado's task, the reader is kept
    alive by the read it waits on (the IOLoop holds the stream while it reads); no
    attribute refers to it (one more would cost each connection a dict of its own).
    """

    async def _receive_frame_loop(self) -> None:
        reader = asyncio.get_running_loop().create_task(super()._receive_frame_loop())
        reader.add_done_callback(self._reader_done)

    def _reader_done(self, reader: asyncio.Task[None]) -> None:
        error = None if reader.cancelled() else reader.exception()
        if error is not None:
            self.handler.log_exception(type(error), error, error.__traceback__)
            self._abort()


@functools.lru_cache(maxsize=8)
def _protocol_params(max_message_size: int) -> _WebSocketParams:
    """One set of protocol parameters for all connections (Tornado never changes it).
    No pings: the node's keepalive sends them."""
    return _WebSocketParams(max_message_size=max_message_size)


class SocketHandler(WebSocketHandler):
    """The handshake of one WebSocket client: admits it, then hands it to a ``Session``.

    Once ``open`` is done this handler, its request and its headers are released: a
    ``Session`` is all that an open connection keeps.
    """

    def initialize(self, node: Node, auth: Auth) -> None:
        self.node = node
        self.auth = auth
        self.codec: Codec = JSON
        self.origin_refused = False
        self._counted_ip: str | None = None

    # -- handshake -------------------------------------------------------------

    def prepare(self) -> None:
        """A request that is no WebSocket handshake gets a JSON error, as the API does;
        so does an Origin that is no URL (Tornado's own origin check would fail on it)."""
        headers = self.request.headers
        if headers.get("Upgrade", "").lower() != "websocket":
            self._answer_400("this path takes WebSocket handshakes only")
        elif "Origin" in headers and not _is_url(headers["Origin"]):
            self._answer_400("the Origin header is malformed")
        elif not _is_utf8(self.request.query_arguments):
            # checked here: Tornado's own error would quote the value, maybe a token
            self._answer_400("a query parameter is not UTF-8")

    def _answer_400(self, message: str) -> None:
        self.set_status(400)
        self.set_header("Content-Type", "application/json")
        self.finish(dump_json({"error": {"code": "invalid_body", "message": message}}))

    def get_websocket_protocol(self) -> WebSocketProtocol | None:
        if self.request.headers.get("Sec-WebSocket-Version") != "13":
            return None
        return _Protocol(self, False, _protocol_params(self.max_message_size))

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        for offered in subprotocols:
            if offered in BY_SUBPROTOCOL:
                self.codec = BY_SUBPROTOCOL[offered]
                return offered
        return None

    def check_origin(self, origin: str) -> bool:
        """Note a refused origin; ``open`` closes it with 4003, which browsers can see
        (a handshake refused here would show them only 1006)."""
        self.origin_refused = not self.auth.origin_allowed(origin, self.request.host)
        return True

    async def open(self, *args: str, **kwargs: str) -> None:
        rights = self._admit()
        if rights is None:
            return
        client_id = f"c-{_id_prefix}{next(_client_ids):x}"
        rights = await self._ask_backend(client_id, rights)
        protocol = self.ws_connection
        if rights is None or protocol is None:
            return
        info = signals.ClientInfo(id=client_id, sub=rights.sub, ip=self.request.remote_ip or "")
        session = Session(protocol, self.node, self.codec, rights, info, self._counted_ip)
        self._counted_ip = None  # the session counts it out now
        topics = self.get_query_arguments("topic")
        protocol.handler = session
        # Tornado breaks the handler's own cycles when it closes; it is done now
        super(WebSocketHandler, self)._break_cycles()
        try:
            await session.start(topics)
        except BaseException:  # Tornado aborts without a close callback: release it all
            session.on_ws_connection_close(CLOSE_INTERNAL_ERROR, "internal error")
            raise

    def _admit(self) -> Grant | None:
        """The client's grant, or None after closing it (4003, 4001 or 4029)."""
        if self.origin_refused:
            self._refuse(CLOSE_FORBIDDEN, "origin not allowed")
            return None
        try:
            rights = self.auth.ws_grant(self.get_query_argument("token", None),
                                        self.request.headers.get("Authorization"))
        except SquallError as exc:
            self._refuse(CLOSE_UNAUTHORIZED, exc.message)
            return None
        ip = self.request.remote_ip or ""
        refused = self.node.limits.connections.admit(ip)
        if refused is not None:
            self._refuse(CLOSE_RATE_LIMITED, refused)
            return None
        self._counted_ip = ip
        return rights

    async def _ask_backend(self, client_id: str, rights: Grant) -> Grant | None:
        """The authorization webhook's verdict on this connect (docs/hooks.md), if one is
        configured; None after closing with 4003."""
        hook = self.node.auth_hook
        if hook is None:
            return rights
        info = signals.ClientInfo(id=client_id, sub=rights.sub, ip=self.request.remote_ip or "")
        query = {key: [value.decode() for value in values]
                 for key, values in self.request.query_arguments.items()}
        try:
            return await hook.connect(info, rights, self.request.headers, query)
        except SquallError as exc:
            self._refuse(CLOSE_FORBIDDEN, exc.message)
            return None

    def _refuse(self, code: int, reason: str) -> None:
        log.debug("refusing a WebSocket from %s with %d: %s", self.request.remote_ip, code,
                  reason)
        self.close(code, reason[:120])  # a close reason holds at most 123 bytes

    def on_close(self) -> None:
        """A client refused, or gone before its session started."""
        if self._counted_ip is not None:
            self.node.limits.connections.release(self._counted_ip)
            self._counted_ip = None

    def _request_summary(self) -> str:
        return request_summary(self.request)

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        app_log.error("Uncaught exception in WebSocket %s", self._request_summary(),
                      exc_info=(typ, value, tb))


class Session:
    """One open WebSocket client: parses its frames and calls the hub.

    Tornado's protocol calls it as its delegate (``on_message``, ``on_pong``,
    ``on_ws_connection_close``, ``log_exception``); its ``Connection`` writes through
    it (the ``Transport``); the node's keepalive pings it (a ``Peer``). Every client
    has one for as long as it is open, so it keeps only what it needs.
    """

    __slots__ = ("_counted_ip", "_expiry", "bad_frames", "codec", "connection", "frames", "node",
                 "rights", "ws_connection")

    def __init__(self, protocol: WebSocketProtocol, node: Node, codec: Codec, rights: Grant,
                 info: signals.ClientInfo, counted_ip: str | None) -> None:
        self.ws_connection: WebSocketProtocol | None = protocol
        self.node = node
        self.codec = codec
        self.rights = rights
        self.frames: FrameLimiter = node.limits.frame_limiter()
        self.bad_frames = 0
        self.connection = Connection(self, codec, node.hub.flusher,
                                     node.settings.send_queue_bytes, info)
        self._counted_ip = counted_ip
        self._expiry: object | None = None

    async def start(self, topics: list[str]) -> None:
        """Join the hub and the keepalive, then subscribe to the query's ``topics``."""
        node = self.node
        node.hub.attach(self.connection)
        node.keepalive.add(self)
        signals.client_connected.send(self, client=self.connection.info)
        self._expire_at(self.rights.expires_at)
        for topic in topics:
            await self._on_frame(self.codec.dumps({"type": "subscribe", "topic": topic}))

    def _expire_at(self, expires_at: float | None) -> None:
        """Close with 4001 when the token expires (IOLoop time runs on its own clock)."""
        if expires_at is None:
            return
        loop = IOLoop.current()
        self._expiry = loop.call_at(loop.time() + expires_at - time.time(), self._expired)

    def _expired(self) -> None:
        self._expiry = None
        self._close(CLOSE_UNAUTHORIZED, "token expired", drain=True)

    def _close(self, code: int, reason: str, drain: bool = False) -> None:
        connection = self.connection
        if not connection.closed:
            connection.close(code, reason, drain=drain)
            self.node.hub.forget(connection)

    # -- frames ------------------------------------------------------------------

    async def on_message(self, message: str | bytes) -> None:
        if self.connection.closed:
            return
        verdict = self.frames.check()
        if verdict is Verdict.ALLOW:
            await self._on_frame(message)
        elif verdict is Verdict.REFUSE:
            self.connection.send(error_frame(RateLimited(self.frames.describe())))
        else:
            self._close(CLOSE_RATE_LIMITED, "rate limited", drain=True)

    async def _on_frame(self, message: str | bytes) -> None:
        ref = None
        try:
            command = parse_command(self.codec.loads(message), self.node.settings.max_topic_length)
            ref = command.ref
            await self._run(command, len(message))
        except FrameError as exc:
            self._bad_frame(exc, exc.ref)
        except SquallError as exc:
            if exc.code == "invalid_body":
                self._bad_frame(exc, ref)
            else:
                self.connection.send(error_frame(exc, ref))

    async def _run(self, command: Any, size: int) -> None:
        connection = self.connection
        hub = self.node.hub
        if isinstance(command, Subscribe):
            if self.node.auth_hook is not None:
                await self.node.auth_hook.subscribe(connection.info, self.rights, command.topic)
            else:
                self.rights.check_subscribe(command.topic)
            await hub.subscribe(connection, command.topic, command.since, command.ref)
        elif isinstance(command, Unsubscribe):
            await hub.unsubscribe(connection, command.topic, command.ref)
        elif isinstance(command, Publish):
            if self.node.auth_hook is not None:
                await self.node.auth_hook.publish(connection.info, self.rights, command.topic)
            else:
                self.rights.check_publish(command.topic)
            await self._publish(command, size)
        elif isinstance(command, Ping):
            connection.send(with_ref({"type": "pong"}, command.ref))

    async def _publish(self, command: Publish, size: int) -> None:
        limit = self.node.settings.max_event_bytes
        if size > limit and len(self.codec.dumps(command.data)) > limit:
            raise SquallError("payload_too_large", f"data is larger than {limit} bytes")
        [published] = await self.node.hub.publish(
            [PublishRequest(command.topic, command.data, command.idempotency_key)])
        self.connection.send(with_ref({"type": "published", "topic": published.topic,
                                       "id": published.id, "ts": published.ts}, command.ref))

    def _bad_frame(self, exc: SquallError, ref: Any) -> None:
        self.bad_frames += 1
        if self.bad_frames > self.node.settings.max_bad_frames:
            self._close(CLOSE_PROTOCOL_ABUSE, "too many bad frames", drain=True)
            return
        self.connection.send(error_frame(exc, ref))

    def on_ping(self, data: bytes) -> None:
        """Tornado answers pings itself."""

    def on_pong(self, data: bytes) -> None:
        self.node.keepalive.answered(self)

    # -- keepalive (Peer) ------------------------------------------------------------

    def send_ping(self) -> None:
        protocol = self.ws_connection
        if protocol is None or protocol.is_closing():
            return
        try:
            protocol.write_ping(b"")
        except StreamClosedError:
            return  # the frame loop sees it too, and closes

    def ping_timed_out(self) -> None:
        self._close(CLOSE_GOING_AWAY, "ping timed out")

    # -- closing -----------------------------------------------------------------

    def on_ws_connection_close(self, close_code: int | None = None,
                               close_reason: str | None = None) -> None:
        if self.ws_connection is None:
            return
        self.ws_connection = None  # also breaks the cycle with the protocol
        node = self.node
        if self._expiry is not None:
            IOLoop.current().remove_timeout(self._expiry)
            self._expiry = None
        if self._counted_ip is not None:
            node.limits.connections.release(self._counted_ip)
            self._counted_ip = None
        node.keepalive.remove(self)
        connection = self.connection
        connection.mark_closed()
        signals.client_disconnected.send(self, client=connection.info, code=close_code,
                                         reason=close_reason)
        node.hub.forget(connection)

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        info = self.connection.info
        app_log.error("Uncaught exception in WebSocket of client %s (%s)", info.id, info.ip,
                      exc_info=(typ, value, tb))

    # -- Transport, for the connection's writer --------------------------------------

    def writable_stream(self) -> IOStream | None:
        protocol = self.ws_connection
        if protocol is None or protocol.is_closing():
            return None
        return protocol.stream

    def close_transport(self, code: int, reason: str) -> None:
        protocol = self.ws_connection
        if protocol is not None:
            protocol.close(code, reason)


def _is_utf8(arguments: dict[str, list[bytes]]) -> bool:
    try:
        for values in arguments.values():
            for value in values:
                value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _is_url(text: str) -> bool:
    try:
        urlsplit(text)
    except ValueError:
        return False
    return True
