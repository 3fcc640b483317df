"""``GET /v1/ws``: the WebSocket endpoint (protocol.md, WebSocket API).

Limits (settings): ``max_frame_bytes`` per client message (closed with 1009 above),
``max_event_bytes`` per published event, ``max_subscriptions`` per connection,
``max_bad_frames`` before a close with 4000, ``send_queue_bytes`` before a close with
4008, and server pings every ``ping_interval`` seconds, closing after
``ping_timeout`` without a pong.

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
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from typing import Any
from urllib.parse import urlsplit

from tornado.ioloop import IOLoop
from tornado.iostream import IOStream
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
_client_ids = itertools.count(1)
_id_prefix = os.urandom(3).hex()


class _Protocol(WebSocketProtocol13):
    """Tornado's protocol, but its ping timeout closes with 1001 (reconnect), not 1000."""

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        if code is None and reason is not None:  # only Tornado's own closes look like this
            code = CLOSE_GOING_AWAY
        super().close(code, reason)


class SocketHandler(WebSocketHandler):
    """One WebSocket client: parses its frames and calls the hub."""

    node: Node
    connection: Connection | None = None

    def initialize(self, node: Node, auth: Auth) -> None:
        self.node = node
        self.auth = auth
        self.codec: Codec = JSON
        self.bad_frames = 0
        self.origin_refused = False
        self.rights: Grant | None = None
        self.frames: FrameLimiter = node.limits.frame_limiter()
        self._counted_ip: str | None = None
        self._expiry: object | None = None

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
        params = _WebSocketParams(ping_interval=self.ping_interval,
                                  ping_timeout=self.ping_timeout,
                                  max_message_size=self.max_message_size,
                                  compression_options=self.get_compression_options())
        return _Protocol(self, False, params)

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
        if rights is None:
            return
        self.rights = rights
        settings = self.node.settings
        info = signals.ClientInfo(id=client_id, sub=rights.sub, ip=self.request.remote_ip or "")
        self.connection = Connection(self, self.codec, self.node.hub.flusher,
                                     settings.send_queue_bytes, info)
        self.node.hub.attach(self.connection)
        signals.client_connected.send(self, client=info)
        self._expire_at(rights.expires_at)
        for topic in self.get_query_arguments("topic"):
            await self._on_frame(self.connection,
                                 self.codec.dumps({"type": "subscribe", "topic": topic}))

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

    def _expire_at(self, expires_at: float | None) -> None:
        """Close with 4001 when the token expires (IOLoop time runs on its own clock)."""
        if expires_at is None:
            return
        loop = IOLoop.current()
        self._expiry = loop.call_at(loop.time() + expires_at - time.time(), self._expired)

    def _expired(self) -> None:
        self._expiry = None
        connection = self.connection
        if connection is not None and not connection.closed:
            connection.close(CLOSE_UNAUTHORIZED, "token expired", drain=True)
            self.node.hub.forget(connection)

    # -- frames ------------------------------------------------------------------

    async def on_message(self, message: str | bytes) -> None:
        connection = self.connection
        if connection is None or connection.closed:
            return
        verdict = self.frames.check()
        if verdict is Verdict.ALLOW:
            await self._on_frame(connection, message)
        elif verdict is Verdict.REFUSE:
            connection.send(error_frame(RateLimited(self.frames.describe())))
        else:
            connection.close(CLOSE_RATE_LIMITED, "rate limited", drain=True)
            self.node.hub.forget(connection)

    async def _on_frame(self, connection: Connection, message: str | bytes) -> None:
        ref = None
        try:
            command = parse_command(self.codec.loads(message), self.node.settings.max_topic_length)
            ref = command.ref
            await self._run(connection, command, len(message))
        except FrameError as exc:
            self._bad_frame(connection, exc, exc.ref)
        except SquallError as exc:
            if exc.code == "invalid_body":
                self._bad_frame(connection, exc, ref)
            else:
                connection.send(error_frame(exc, ref))

    async def _run(self, connection: Connection, command: Any, size: int) -> None:
        hub = self.node.hub
        assert self.rights is not None
        if isinstance(command, Subscribe):
            if self.node.auth_hook is not None:
                await self.node.auth_hook.subscribe(connection.info, self.rights, command.topic)
            else:
                self.rights.check_subscribe(command.topic)
            await hub.subscribe(connection, command.topic, command.since, command.ref)
        elif isinstance(command, Unsubscribe):
            await hub.unsubscribe(connection, command.topic, command.ref)
        elif isinstance(command, Publish):
            self.rights.check_publish(command.topic)
            await self._publish(connection, command, size)
        elif isinstance(command, Ping):
            connection.send(with_ref({"type": "pong"}, command.ref))

    async def _publish(self, connection: Connection, command: Publish, size: int) -> None:
        limit = self.node.settings.max_event_bytes
        if size > limit and len(self.codec.dumps(command.data)) > limit:
            raise SquallError("payload_too_large", f"data is larger than {limit} bytes")
        [published] = await self.node.hub.publish(
            [PublishRequest(command.topic, command.data, command.idempotency_key)])
        connection.send(with_ref({"type": "published", "topic": published.topic,
                                   "id": published.id, "ts": published.ts}, command.ref))

    def _bad_frame(self, connection: Connection, exc: SquallError, ref: Any) -> None:
        self.bad_frames += 1
        if self.bad_frames > self.node.settings.max_bad_frames:
            connection.close(CLOSE_PROTOCOL_ABUSE, "too many bad frames", drain=True)
            self.node.hub.forget(connection)
            return
        connection.send(error_frame(exc, ref))

    # -- closing -----------------------------------------------------------------

    def on_close(self) -> None:
        if self._expiry is not None:
            IOLoop.current().remove_timeout(self._expiry)
            self._expiry = None
        if self._counted_ip is not None:
            self.node.limits.connections.release(self._counted_ip)
            self._counted_ip = None
        connection = self.connection
        if connection is None:
            return
        connection.mark_closed()
        signals.client_disconnected.send(self, client=connection.info, code=self.close_code,
                                         reason=self.close_reason)
        self.node.hub.forget(connection)

    # -- Transport, for the connection's writer --------------------------------------

    def writable_stream(self) -> IOStream | None:
        protocol = self.ws_connection
        if protocol is None or protocol.is_closing():
            return None
        return protocol.stream

    def close_transport(self, code: int, reason: str) -> None:
        self.close(code, reason)

    def _request_summary(self) -> str:
        return request_summary(self.request)

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        app_log.error("Uncaught exception in WebSocket %s", self._request_summary(),
                      exc_info=(typ, value, tb))


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
