"""``GET /v1/ws``: the WebSocket endpoint (protocol.md, WebSocket API).

Limits (settings): ``max_frame_bytes`` per client message (closed with 1009 above),
``max_event_bytes`` per published event, ``max_subscriptions`` per connection,
``max_bad_frames`` before a close with 4000, ``send_queue_bytes`` before a close with
4008, and server pings every ``ping_interval`` seconds, closing after
``ping_timeout`` without a pong.

A bad frame is answered with an ``error`` frame and the connection stays open. All
outgoing frames, replies included, go through the connection's queue, so replies
and events keep their order.
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import Any

from tornado.iostream import IOStream
from tornado.websocket import WebSocketHandler

from server import signals
from server.broker.base import PublishRequest
from server.codec import BY_SUBPROTOCOL, JSON, Codec
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

log = logging.getLogger("squall.ws")

CLOSE_PROTOCOL_ABUSE = 4000
_client_ids = itertools.count(1)
_id_prefix = os.urandom(3).hex()


class SocketHandler(WebSocketHandler):
    """One WebSocket client: parses its frames and calls the hub."""

    node: Node
    connection: Connection | None = None

    def initialize(self, node: Node) -> None:
        self.node = node
        self.codec: Codec = JSON
        self.bad_frames = 0

    # -- handshake -------------------------------------------------------------

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        for offered in subprotocols:
            if offered in BY_SUBPROTOCOL:
                self.codec = BY_SUBPROTOCOL[offered]
                return offered
        return None

    async def open(self, *args: str, **kwargs: str) -> None:
        settings = self.node.settings
        info = signals.ClientInfo(id=f"c-{_id_prefix}{next(_client_ids):x}", sub=None,
                                  ip=self.request.remote_ip or "")
        self.connection = Connection(self, self.codec, self.node.hub.flusher,
                                     settings.send_queue_bytes, info)
        self.node.hub.attach(self.connection)
        signals.client_connected.send(self, client=info)
        for topic in self.get_query_arguments("topic"):
            await self.on_message(self.codec.dumps({"type": "subscribe", "topic": topic}))

    # -- frames ------------------------------------------------------------------

    async def on_message(self, message: str | bytes) -> None:
        connection = self.connection
        if connection is None or connection.closed:
            return
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
        if isinstance(command, Subscribe):
            await hub.subscribe(connection, command.topic, command.since, command.ref)
        elif isinstance(command, Unsubscribe):
            await hub.unsubscribe(connection, command.topic, command.ref)
        elif isinstance(command, Publish):
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

