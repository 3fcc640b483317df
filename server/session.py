"""The client, whatever carries it: WebSocket, Server-Sent Events or the TCP line protocol.

A ``Session`` is what one open client is: its grant, its limits, its subscriptions
and bounded send queue (its ``Connection`` in the hub), the commands it may send,
its token's expiry and its keepalive. The transport adapter (transports/) owns the
socket and only moves bytes: it calls ``received`` with each complete client
message, ``answered`` when the client answered a keepalive ping, and ``closed`` when
the socket is gone; the session writes through the adapter's ``Transport`` seam
(``write``, ``close``). Every transport therefore behaves the same: the same error
frames, limits, close codes, replay and hold-back rules, slow-consumer close,
signals and webhooks.

Limits (settings): ``max_frame_bytes`` per client message (the adapter closes with
1009 above), ``max_event_bytes`` per published event, ``max_subscriptions``,
``max_bad_frames`` before a close with 4000, ``frame_rate``/``frame_burst`` (an
``error`` frame ``rate_limited``, then a close with 4029), ``max_pending_bytes`` of
messages waiting behind one under way (more get ``rate_limited``), and
``send_queue_bytes`` before a close with 4008 (server/connection.py). A token's
``exp`` closes the session with 4001 when it comes.

Client messages run one at a time, in order, in a task that lives while there are
some; the adapter goes on reading meanwhile, so a subscribe whose replay is paced
by a slow reader never keeps its keepalive answers unread.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from server import signals
from server.admission import CLOSE_FORBIDDEN, CLOSE_UNAUTHORIZED, Admitted
from server.broker.base import Publishable, Published
from server.codec import JSON, load_json
from server.commands import (
    Auth,
    Command,
    FrameError,
    Ping,
    Publish,
    Subscribe,
    Unsubscribe,
    error_frame,
    parse_command,
    with_ref,
)
from server.connection import Connection, Transport
from server.errors import SquallError
from server.keepalive import Keepalive
from server.node import Node
from server.ratelimit import FrameLimiter, RateLimited, Verdict
from server.wire import LINES, SSE, WireFormat

log = logging.getLogger("squall.session")

CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN = 1013
CLOSE_PROTOCOL_ABUSE = 4000
CLOSE_RATE_LIMITED = 4029

Message = bytes | str | dict[str, Any]
"""A client message as the adapter read it, or a frame the server made for it."""
Parsed = Command | SquallError
"""What a message says: a command, or why it is not one."""

PUBLISH_GROUP = 256  # consecutive publish frames sent to the broker in one call at most


_PENDING: Any = object()  # an outcome still to come from the broker
_PUBLISHED = {"type": "published"}  # what a wire format's framing needs to know of a reply


def _size(message: Message) -> int:
    return len(message) if not isinstance(message, dict) else 0


class Session:
    """One open client. IOLoop only; keeps little, since idle clients are most of a
    server's memory."""

    __slots__ = ("_admitted", "_expiry", "_inbox", "_inbox_bytes", "_keepalive", "_runner",
                 "bad_frames", "connection", "frames", "node", "rights", "transport", "wire")

    def __init__(self, node: Node, transport: Transport, wire: WireFormat,
                 admitted: Admitted) -> None:
        self.node = node
        self.transport = transport
        self.wire = wire
        self.rights = admitted.rights
        self.frames: FrameLimiter = node.limits.frame_limiter()
        self.bad_frames = 0
        self.connection = Connection(transport, wire, node.hub.flusher,
                                     node.settings.send_queue_bytes, admitted.info)
        self._admitted: Admitted | None = admitted
        self._expiry: asyncio.TimerHandle | None = None
        # messages waiting, as (size, parsed); None: none running
        self._inbox: collections.deque[tuple[int, Parsed]] | None = None
        self._inbox_bytes = 0
        self._runner: asyncio.Task[None] | None = None
        self._keepalive: Keepalive | None = node.keepalive_for(wire)

    @property
    def info(self) -> signals.ClientInfo:
        info: signals.ClientInfo = self.connection.info
        return info

    def start(self, commands: Iterable[dict[str, Any]] = ()) -> None:
        """Join the hub and the keepalive, then run ``commands`` (the subscribes of a
        handshake's query) as if the client had sent them first."""
        node = self.node
        node.hub.attach(self.connection)
        if self._keepalive is not None:
            self._keepalive.add(self)
        signals.client_connected.send(self, client=self.info)
        self._expire_at(self.rights.expires_at)
        for command in commands:
            self._queue(command)

    # -- from the adapter --------------------------------------------------------------

    def received(self, message: bytes | str) -> None:
        """One complete message from the client. Never raises, never blocks."""
        if self.connection.closed:
            return
        verdict = self.frames.check()
        if verdict is Verdict.CLOSE:
            self.close(CLOSE_RATE_LIMITED, "rate limited")
        elif verdict is Verdict.REFUSE:
            self.connection.send(error_frame(RateLimited(self.frames.describe())))
        elif self._inbox_bytes + len(message) > self.node.settings.max_pending_bytes:
            self.connection.send(error_frame(RateLimited(
                f"at most {self.node.settings.max_pending_bytes} bytes of frames may wait for "
                "an earlier one (a subscribe's replay, a publish); send fewer at once")))
        else:
            self._queue(message)

    def answered(self) -> None:
        """The client answered a keepalive ping."""
        if self._keepalive is not None:
            self._keepalive.answered(self)

    def closed(self, code: int | None = None, reason: str | None = None) -> None:
        """The transport is gone (either side closed it): release everything. Idempotent."""
        admitted = self._admitted
        if admitted is None:
            return
        self._admitted = None
        node = self.node
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        admitted.release()
        if self._keepalive is not None:
            self._keepalive.remove(self)
        connection = self.connection
        connection.mark_closed()
        signals.client_disconnected.send(self, client=self.info, code=code, reason=reason)
        node.hub.forget(connection)

    def close(self, code: int, reason: str, drain: bool = True) -> None:
        """Close the client with ``code``, by default after what is queued for it."""
        connection = self.connection
        if not connection.closed:
            connection.close(code, reason, drain=drain)
            self.node.hub.forget(connection)

    # -- keepalive (a Peer) ---------------------------------------------------------------

    def send_ping(self) -> None:
        """Send the format's keepalive bytes straight to the transport, ahead of the
        queue: liveness must not wait behind a backlog."""
        ping = self.wire.ping
        if ping is not None and not self.connection.closed:
            self.transport.write(ping)

    def ping_timed_out(self) -> None:
        self.close(CLOSE_GOING_AWAY, "ping timed out", drain=False)

    # -- running messages -----------------------------------------------------------------

    def _queue(self, message: Message) -> None:
        """Parse ``message`` (now: it waits parsed) and queue it for its turn."""
        size = _size(message)
        self._inbox_bytes += size
        try:
            item: tuple[int, Parsed] = (size, self._parse(message))
        except SquallError as exc:
            item = (size, exc)
        if self._inbox is not None:
            self._inbox.append(item)
            return
        self._inbox = collections.deque([item])
        self._runner = asyncio.get_running_loop().create_task(self._run_inbox())

    async def _run_inbox(self) -> None:
        """Run the waiting messages in order, until there are none (or the client closed).

        Consecutive publishes (pipelined, or read together) go to the broker in one
        call, up to ``PUBLISH_GROUP`` of them; their replies keep their order. A publish
        the auth hook must decide is a group of its own."""
        inbox = self._inbox
        try:
            while inbox and not self.connection.closed:
                size, parsed = inbox.popleft()
                self._inbox_bytes -= size
                if not self._groupable(parsed):
                    if isinstance(parsed, Publish):  # the auth hook decides it: alone
                        await self._publish_group([(size, parsed)])
                    else:
                        await self._on_parsed(parsed)
                    continue
                group = [(size, parsed)]
                while inbox and len(group) < PUBLISH_GROUP and self._groupable(inbox[0][1]):
                    size, parsed = inbox.popleft()
                    self._inbox_bytes -= size
                    group.append((size, parsed))
                await self._publish_group(group)
        except Exception:  # one choke point: a bug costs this client, never the others
            info = self.info
            log.exception("a message of client %s (%s) failed", info.id, info.ip)
            self.close(CLOSE_INTERNAL_ERROR, "internal error")
        finally:
            self._inbox = None
            self._inbox_bytes = 0
            self._runner = None

    def _groupable(self, parsed: Parsed) -> bool:
        """A publish the grant decides. One the auth hook must decide goes alone, so
        that the publishes before it are not kept waiting for the backend's answers."""
        return isinstance(parsed, Publish) and (
            self.node.auth_hook is None or self.rights.may_publish(parsed.topic))

    async def _on_parsed(self, parsed: Parsed) -> None:
        ref = parsed.ref if isinstance(parsed, FrameError) else None
        try:
            if isinstance(parsed, SquallError):
                raise parsed
            ref = parsed.ref
            await self._run(parsed)
        except SquallError as exc:
            self._refused(exc, exc.ref if isinstance(exc, FrameError) else ref)
            if self.wire is SSE and isinstance(parsed, Subscribe):
                self._end_stream(exc)
        except RecursionError:  # a value decoded, but too deep to encode again
            self._bad_frame(SquallError("invalid_body", "the value is nested too deeply"), ref)

    def _end_stream(self, exc: SquallError) -> None:
        """An SSE stream's subscriptions are its query's: one that failed ends the stream
        (after its ``error`` event), so that ``EventSource`` comes back and tries again
        rather than staying open without it."""
        if exc.code == "broker_unavailable":
            self.close(CLOSE_TRY_AGAIN, "the broker is unavailable; try again later")
        elif exc.code == "forbidden":
            self.close(CLOSE_FORBIDDEN, exc.message)
        else:
            self.close(CLOSE_INTERNAL_ERROR, f"a subscription failed: {exc.code}")

    def _refused(self, exc: SquallError, ref: Any) -> None:
        if isinstance(exc, FrameError) or exc.code == "invalid_body":  # the frame was bad
            self._bad_frame(exc, ref)
        else:
            self.connection.send(error_frame(exc, ref))

    def _parse(self, message: Message) -> Command:
        """The command in ``message``; any failure to decode it is ``invalid_body``."""
        codec = self.wire.codec
        try:
            if isinstance(message, dict):
                value = message
            elif codec is JSON:  # the common case, one call fewer
                value = load_json(message)
            else:
                value = codec.loads(message)
        except SquallError:
            raise
        except (ValueError, TypeError, RecursionError, MemoryError) as exc:
            raise SquallError("invalid_body", f"the frame cannot be decoded: "
                              f"{type(exc).__name__}") from None
        return parse_command(value, self.node.settings.max_topic_length,
                             allow_auth=self.wire is LINES)

    async def _run(self, command: Command) -> None:
        connection = self.connection
        hub = self.node.hub
        if isinstance(command, Subscribe):
            if self.node.auth_hook is not None:
                await self.node.auth_hook.subscribe(self.info, self.rights, command.topic)
            else:
                self.rights.check_subscribe(command.topic)
            await hub.subscribe(connection, command.topic, command.since, command.ref)
        elif isinstance(command, Unsubscribe):
            await hub.unsubscribe(connection, command.topic, command.ref)
        elif isinstance(command, Ping):
            connection.send(with_ref({"type": "pong"}, command.ref))
        elif isinstance(command, Auth):
            self._authenticate(command)

    async def _publish_group(self, group: list[tuple[int, Parsed]]) -> None:
        """Publish each of ``group`` (publish commands and their sizes, in order) in one
        broker call; a refused one gets its error frame in its place among the replies.
        With an auth hook, it decides each one first, in order."""
        outcomes: list[Published | SquallError] = []
        requests: list[Publishable] = []
        hook = self.node.auth_hook
        for size, command in group:
            assert isinstance(command, Publish)
            try:
                if hook is not None:
                    await hook.publish(self.info, self.rights, command.topic)
                else:
                    self.rights.check_publish(command.topic)
                requests.append(self._request(command, size))
            except SquallError as exc:
                outcomes.append(exc)
            else:
                outcomes.append(_PENDING)
        if requests:
            try:
                published = iter(await self.node.hub.publish(requests))
            except SquallError as exc:
                outcomes = [exc if outcome is _PENDING else outcome for outcome in outcomes]
            else:
                outcomes = [next(published) if outcome is _PENDING else outcome
                            for outcome in outcomes]
        replies: list[bytes] = []  # queued together, in order, until an error comes between
        for (_, command), outcome in zip(group, outcomes, strict=True):
            assert isinstance(command, Publish)
            if isinstance(outcome, SquallError):
                self._queue_replies(replies)
                self._refused(outcome, command.ref)
            else:
                replies.append(self._published_frame(command, outcome))
        self._queue_replies(replies)

    def _queue_replies(self, replies: list[bytes]) -> None:
        if replies:
            self.connection.enqueue(b"".join(replies), len(replies))
            replies.clear()

    def _request(self, command: Publish, size: int) -> Publish:
        """The command is its own request (a frame no larger than the limit cannot carry
        data larger than it); the data of a larger one is encoded once, to measure it,
        and those bytes go with it."""
        limit = self.node.settings.max_event_bytes
        if size <= limit:
            return command
        encoded = self._encoded(command.data)
        if len(encoded) > limit:
            raise SquallError("payload_too_large", f"data is larger than {limit} bytes")
        return command._replace(data_json=None if self.wire.codec.binary else encoded)

    def _published_frame(self, command: Publish, published: Published) -> bytes:
        """The ``published`` reply's bytes (the common JSON one formatted directly)."""
        wire, ref = self.wire, command.ref
        if wire.codec is JSON and (ref is None or type(ref) is int):
            payload = b'{"type":"published","topic":"%s","id":"%s","ts":%d%s}' % (
                published.topic.encode(), published.id.encode(), published.ts,
                b"" if ref is None else b',"ref":%d' % ref)
            return wire.wrap(payload, _PUBLISHED)
        return wire.frame(with_ref({"type": "published", "topic": published.topic,
                                    "id": published.id, "ts": published.ts}, ref))

    def _encoded(self, data: Any) -> bytes:
        try:
            return self.wire.codec.dumps(data)
        except (ValueError, TypeError, RecursionError, OverflowError) as exc:
            raise SquallError("invalid_body", f"data cannot be encoded: "
                              f"{type(exc).__name__}") from None

    def _authenticate(self, command: Auth) -> None:
        """Take the grant of an API key or JWT (the TCP line protocol's ``auth``)."""
        rights = self.node.auth.grant(command.token, key_allowed=True)
        self.rights = rights
        self.node.hub.identify(self.connection, replace(self.info, sub=rights.sub,
                                                        info=rights.info))
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._expire_at(rights.expires_at)
        self.connection.send(with_ref({"type": "authed", "sub": rights.sub}, command.ref))

    def _bad_frame(self, exc: SquallError, ref: Any) -> None:
        self.bad_frames += 1
        if self.bad_frames > self.node.settings.max_bad_frames:
            self.close(CLOSE_PROTOCOL_ABUSE, "too many bad frames")
            return
        self.connection.send(error_frame(exc, ref))

    # -- token expiry -----------------------------------------------------------------------

    def _expire_at(self, expires_at: float | None) -> None:
        """Close with 4001 when the token expires (the loop's clock is not the wall's)."""
        if expires_at is None:
            return
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_at(loop.time() + expires_at - time.time(), self._expired)

    def _expired(self) -> None:
        self._expiry = None
        self.close(CLOSE_UNAUTHORIZED, "token expired")
