"""The subscriber: one ``async for`` over every subscription, across reconnects.

Reading never waits on the application: a task of its own reads the socket into a
buffer of at most ``buffer_size`` events, which the iterator empties. A consumer that
falls that far behind does not lose events: the subscriber closes the connection,
waits until the buffer is half empty, and resumes every subscription from the last
event it buffered. Only when the server's history no longer covers what was missed
does the iterator say so, with a ``Gap``.

Resuming: each subscription remembers the id of the last event it delivered (or the
server's ``last_id`` when it took effect, protocol.md) and resubscribes with it as
``since``. The server replays what was missed before its ``subscribed`` reply; the
subscriber holds the events that arrive while any subscribe is unanswered and lets
them through after the reply, after a ``Gap`` when the reply says ``recovered:
false``, with no event twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.protocol import State

from squall_client import _connection
from squall_client._connection import After
from squall_client._registry import Registry, Subscription
from squall_client.backoff import RECONNECT_BACKOFF, Backoff
from squall_client.errors import SquallError, SubscriptionError
from squall_client.models import NO_POSITION, NOT_RECOVERED, REPLAY_TOO_LARGE, Event, Gap
from squall_client.topics import matches

log = logging.getLogger("squall_client")

TokenProvider = Callable[[], "str | Awaitable[str | None] | None"]
Item = Event | Gap

# error codes a subscribe may get that pass with time: sent again after a backoff
TRANSIENT_ERRORS = frozenset({"broker_unavailable", "rate_limited", "internal_error"})
# a connection that stayed open this long starts the backoff afresh
STABLE_AFTER = 5.0
USER_AGENT = "squall-client/0.1"


class _Raise:
    """An exception the iterator raises when it reaches this point of the stream."""

    __slots__ = ("error",)

    def __init__(self, error: SquallError) -> None:
        self.error = error


class Subscriber:
    """Subscribes over WebSocket and yields ``Event`` and ``Gap`` items in order.

    ``url`` is the server (``ws://host:8888``; ``/v1/ws`` is added when missing).
    ``token`` is a JWT, sent in the ``Authorization`` header; ``token_provider`` (a
    function, plain or async, returning a JWT or None) is called for the first
    connection when no token is given, and whenever the server closes with 4001.
    ``msgpack=True`` speaks the msgpack subprotocol (needs the ``msgpack`` extra).

    Guarantees, for one consumer iterating: each event of a subscription is yielded
    once, in publish order per topic, across reconnects, as long as the server's
    history covers the outage; otherwise a ``Gap(topic, reason)`` comes first. The
    iteration ends with ``Disconnected`` after a final close (1000, 4003, 4010, 1009,
    4000, 4001 without a new token) and stops (``StopAsyncIteration``) after
    ``close()``. A subscription the server refuses on a resume raises
    ``SubscriptionError`` at its place in the stream; iterating again goes on with
    the others.

    Bounds: ``buffer_size`` events buffered for the consumer; ``replay_size`` events
    held while a resume is under way (make it at least the server's
    ``max_replay_events``, 10,000 by default: a larger replay is skipped, after a
    ``Gap``). ``origin`` and ``headers`` go with the handshake.

    A server that stops answering is given up ``ping_interval + ping_timeout +
    close_timeout`` seconds after its last pong at most.
    """

    def __init__(self, url: str, *, token: str | None = None,
                 token_provider: TokenProvider | None = None, msgpack: bool = False,
                 buffer_size: int = 10_000, replay_size: int = 20_000,
                 backoff: Backoff = RECONNECT_BACKOFF, ping_interval: float = 20.0,
                 ping_timeout: float = 20.0, open_timeout: float = 10.0,
                 close_timeout: float = 2.0, max_message_bytes: int = 1024 * 1024,
                 origin: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        if buffer_size < 1 or replay_size < 1:
            raise ValueError("buffer_size and replay_size must be at least 1")
        self.url = _connection.socket_url(url)
        self.buffer_size = buffer_size
        self.replay_size = replay_size
        self.backoff = backoff
        self.overflows = 0  # times the consumer fell buffer_size behind
        self.reconnects = 0  # times a connection ended and another was begun
        self._token = token
        self._token_provider = token_provider
        self._codec = _Codec(msgpack)
        self._socket_options: dict[str, Any] = {
            "open_timeout": open_timeout, "close_timeout": close_timeout,
            "ping_interval": ping_interval,
            "ping_timeout": ping_timeout, "max_message_bytes": max_message_bytes,
            "origin": origin, "headers": dict(headers or {}), "user_agent": USER_AGENT}
        self._registry = Registry()
        self._buffer: deque[Item | _Raise] = deque()
        self._held: list[Event] = []
        self._seen: dict[tuple[str, str], None] = {}
        self._waiter: asyncio.Future[None] | None = None
        self._room = asyncio.Event()
        self._overflowed = False
        self._refs = itertools.count(1)
        self._socket: ClientConnection | None = None
        self._outbox: asyncio.Queue[dict[str, Any]] | None = None
        self._confirmed_here = False
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._failure: SquallError | None = None

    # -- lifecycle ----------------------------------------------------------------

    async def __aenter__(self) -> Subscriber:
        self.start()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.close()

    def start(self) -> None:
        """Start connecting (``async with``, ``subscribe`` and iterating do it too)."""
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="squall-subscriber")

    async def close(self) -> None:
        """Close the connection and stop; the iteration ends, unanswered subscribes
        raise ``SquallError("closed")``. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:  # the reader closes its socket on its way out
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._buffer.clear()
        self._settle_unconfirmed(SquallError("closed", "the subscriber is closed"))
        self._wake()

    # -- subscriptions ------------------------------------------------------------

    async def subscribe(self, topic: str, since: str | None = None) -> None:
        """Subscribe to a topic or pattern; returns once the server confirmed it.

        With ``since`` (an id this subscription delivered before, e.g. kept across a
        restart of your process), the server first replays what came after it, or
        the iteration yields a ``Gap`` when it cannot. Raises ``SubscriptionError``
        when the server refuses (the subscription is dropped), ``Disconnected`` when
        the subscriber stopped. A ``broker_unavailable`` answer, a lost connection
        and a server restart are retried for as long as it takes: bound the wait
        with ``asyncio.timeout`` if you need to; cancelling it drops the
        subscription. Subscribing to a name twice waits for the first.
        """
        if self._closed or self._failure is not None:
            raise self._failure or SquallError("closed", "the subscriber is closed")
        subscription = self._registry.by_name.get(topic)
        if subscription is None:
            subscription = Subscription(topic, since)
            self._registry.add(subscription)
            if self._outbox is not None:
                self._send_subscribe(subscription)
        self.start()
        try:
            await asyncio.shield(subscription.confirmed)
        except asyncio.CancelledError:
            if not subscription.started:
                self._forget(subscription)
            raise

    async def unsubscribe(self, topic: str) -> None:
        """Stop the subscription ``topic``. Events of it already buffered are still
        yielded; no later one is."""
        subscription = self._registry.by_name.get(topic)
        if subscription is not None:
            self._forget(subscription)

    def position(self, topic: str) -> str | None:
        """Where the subscription ``topic`` would resume: the id of the last event it
        buffered, or where the server said it started. Store it to resume after a
        restart of your process with ``subscribe(topic, since=...)``."""
        subscription = self._registry.by_name.get(topic)
        return subscription.position if subscription is not None else None

    @property
    def topics(self) -> list[str]:
        """The subscribed names, in the order they were subscribed."""
        return list(self._registry.by_name)

    def _forget(self, subscription: Subscription) -> None:
        on_server = subscription.live or subscription.ref is not None
        self._registry.remove(subscription)
        if not subscription.confirmed.done():
            subscription.confirmed.set_exception(
                SquallError("unsubscribed", f"unsubscribed from {subscription.name!r}"))
        if on_server and self._outbox is not None:
            self._outbox.put_nowait({"type": "unsubscribe", "topic": subscription.name})
        if not self._registry.in_flight:
            self._release()

    # -- iteration ----------------------------------------------------------------

    def __aiter__(self) -> Subscriber:
        return self

    async def __anext__(self) -> Item:
        buffer = self._buffer
        while True:
            if buffer:
                item = buffer.popleft()
                if self._overflowed and len(buffer) <= self.buffer_size // 2:
                    self._room.set()
                if isinstance(item, _Raise):
                    raise item.error
                return item
            if self._closed:
                raise StopAsyncIteration
            if self._failure is not None:
                raise self._failure
            self.start()
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the connection -----------------------------------------------------------

    async def _run(self) -> None:
        """Connect, serve, and reconnect as the close code says, until told to stop."""
        attempt = 0
        try:
            while True:
                if self._overflowed:
                    await self._room.wait()
                    self._overflowed = False
                    attempt = 0
                token = await self._current_token()
                code, reason = await self._connect_and_serve(token)
                if self._closed:
                    return
                if self._overflowed:
                    continue
                if code == _connection.CLOSE_UNAUTHORIZED and self._token_provider is None:
                    raise _connection.stopped(code, reason)
                action = _connection.after_close(code)
                if action is After.STOP:
                    raise _connection.stopped(code, reason)
                if action is After.NEW_TOKEN:
                    self._token = None
                if self._confirmed_here:
                    attempt = 0
                delay = self.backoff.delay(attempt)
                attempt += 1
                self.reconnects += 1
                log.info("squall connection closed (%s %s); reconnecting in %.2fs", code,
                         reason, delay)
                await asyncio.sleep(delay)
        except SquallError as exc:
            self._stop(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must reach the application, not vanish
            log.exception("the squall subscriber failed")
            self._stop(SquallError("internal_error", f"the subscriber failed: {exc!r}"))

    async def _current_token(self) -> str | None:
        """The token to connect with, from the provider when there is none; retries a
        provider that fails, with backoff; ``Disconnected`` when it has none to give."""
        attempt = 0
        while self._token is None and self._token_provider is not None:
            try:
                found = self._token_provider()
                if inspect.isawaitable(found):
                    found = await found
            except Exception:
                log.exception("the token provider failed; asking again")
                await asyncio.sleep(self.backoff.delay(attempt))
                attempt += 1
                continue
            if not found:
                raise _connection.stopped(_connection.CLOSE_UNAUTHORIZED,
                                          "the token provider gave no token")
            self._token = str(found)
        return self._token

    async def _connect_and_serve(self, token: str | None) -> tuple[int | None, str]:
        """One connection, from the handshake to its close code and reason."""
        try:
            socket = await _connection.open_socket(self.url, subprotocol=self._codec.protocol,
                                                   token=token, **self._socket_options)
        except (OSError, TimeoutError, WebSocketException) as exc:
            final = _connection.refused_handshake(exc)
            if final is not None:
                raise final from exc
            log.info("squall connect to %s failed: %r", self.url, exc)
            return _connection.CLOSE_ABNORMAL, str(exc)[:200]
        return await self._serve(socket)

    async def _serve(self, socket: ClientConnection) -> tuple[int | None, str]:
        loop = asyncio.get_running_loop()
        opened = loop.time()
        outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        writer = loop.create_task(self._write(socket, outbox))
        self._socket, self._outbox = socket, outbox
        self._confirmed_here = False
        for subscription in self._registry:
            self._send_subscribe(subscription)
        try:
            code, reason = await self._read(socket)
        finally:
            self._socket = self._outbox = None
            writer.cancel()
            self._disconnected()
            if socket.state is not State.CLOSED:  # the consumer fell behind, or a failure
                await _connection.close_discarding(socket, "client closing")
        if loop.time() - opened >= STABLE_AFTER:
            self._confirmed_here = True
        return code, reason

    async def _read(self, socket: ClientConnection) -> tuple[int | None, str]:
        decode = self._codec.decode
        on_frame = self._on_frame
        try:
            while True:
                message = await socket.recv()
                try:
                    frame = decode(message)
                except ValueError:
                    log.warning("squall sent a frame that does not decode: %r", message[:200])
                    continue
                if type(frame) is dict:
                    try:
                        on_frame(frame)
                    except (KeyError, TypeError, ValueError):
                        log.warning("squall sent a malformed frame: %r", frame)
                if self._overflowed:
                    return None, "the consumer fell behind"
        except ConnectionClosed as closed:
            if closed.rcvd is None:
                return _connection.CLOSE_ABNORMAL, "connection lost"
            return closed.rcvd.code, closed.rcvd.reason

    async def _write(self, socket: ClientConnection,
                     outbox: asyncio.Queue[dict[str, Any]]) -> None:
        encode = self._codec.encode
        with contextlib.suppress(ConnectionClosed):
            while True:
                await socket.send(encode(await outbox.get()))

    def _send_subscribe(self, subscription: Subscription) -> None:
        assert self._outbox is not None
        ref = next(self._refs)
        frame: dict[str, Any] = {"type": "subscribe", "topic": subscription.name, "ref": ref}
        if subscription.position is not None:
            frame["since"] = subscription.position
        elif subscription.started:
            subscription.no_position = True  # an older server gave no last_id
        self._registry.sent(subscription, ref)
        self._outbox.put_nowait(frame)

    def _disconnected(self) -> None:
        for subscription in self._registry:
            if subscription.skipped_to is not None:
                subscription.position = subscription.skipped_to
                subscription.skipped_to = None
        self._registry.disconnected()
        self._held.clear()
        self._seen.clear()

    def _stop(self, error: SquallError) -> None:
        """Stop for good: the iteration raises ``error`` once the buffer is empty."""
        log.warning("squall subscriber stopped: %s", error)
        self._failure = error
        self._settle_unconfirmed(error)
        self._wake()

    def _settle_unconfirmed(self, error: SquallError) -> None:
        for subscription in self._registry:
            if not subscription.confirmed.done():
                subscription.confirmed.set_exception(error)

    # -- frames -------------------------------------------------------------------

    def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "event":
            self._on_event(frame)
        elif kind == "subscribed":
            self._on_subscribed(frame)
        elif kind == "error":
            self._on_error(frame)

    def _on_event(self, frame: dict[str, Any]) -> None:
        topic = frame["topic"]
        matching = self._registry.matching(topic)
        if not matching:
            return  # unsubscribed meanwhile
        event = Event(topic, frame["id"], frame["ts"], frame.get("data"))
        in_flight = self._registry.in_flight
        if in_flight:
            replaying = next(iter(in_flight.values()))
            if not replaying.skipping:
                self._held.append(event)
                if len(self._held) > self.replay_size:
                    self._replay_too_large(replaying)
                return
            if matches(replaying.name, topic):
                replaying.skipped_to = event.id
        self._accept(event, matching)

    def _accept(self, event: Event, matching: tuple[Subscription, ...]) -> bool:
        """Buffer ``event`` for the live subscriptions it matches, once; False when the
        buffer is full (the connection is then given up, see ``_overflow``). The path
        of every event: kept short."""
        if self._overflowed:
            return False  # nothing more until the reconnect, or positions would skip
        seen = self._seen
        if seen and (event.topic, event.id) in seen:
            self._advance(matching, event.id)  # a copy: delivered already
            return True
        buffer = self._buffer
        if len(buffer) >= self.buffer_size:
            if any(subscription.live for subscription in matching):
                self._overflow()
                return False
            return True
        wanted = unsettled = False
        for subscription in matching:
            if subscription.live:
                wanted = True
                subscription.position = event.id
            else:
                unsettled = True
        if wanted:
            buffer.append(event)
            if unsettled:  # its replay may bring this event again
                self._remember((event.topic, event.id))
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        return True

    @staticmethod
    def _advance(matching: tuple[Subscription, ...], event_id: str) -> None:
        for subscription in matching:
            if subscription.live:
                subscription.position = event_id

    def _remember(self, key: tuple[str, str]) -> None:
        seen = self._seen
        seen[key] = None
        if len(seen) > 2 * self.buffer_size:
            del seen[next(iter(seen))]

    def _on_subscribed(self, frame: dict[str, Any]) -> None:
        subscription = self._registry.answered(frame.get("ref"))
        if subscription is None:
            return  # unsubscribed meanwhile
        last_id = frame.get("last_id")
        if subscription.skipping:  # its Gap is out already
            subscription.position = subscription.skipped_to or last_id or subscription.position
            subscription.skipping, subscription.skipped_to = False, None
        else:
            if frame.get("recovered") is False:
                self._push(Gap(subscription.name, NOT_RECOVERED))
            elif subscription.no_position:
                self._push(Gap(subscription.name, NO_POSITION))
            if isinstance(last_id, str) and not self._holds_for(subscription):
                subscription.position = last_id  # held events of its own advance it
        subscription.no_position = False
        subscription.attempt = 0
        self._registry.set_live(subscription, True)
        self._confirmed_here = True
        if not subscription.started:
            subscription.started = True
            subscription.confirmed.set_result(None)
        if not self._registry.in_flight:
            self._release()

    def _holds_for(self, subscription: Subscription) -> bool:
        return any(matches(subscription.name, event.topic) for event in self._held)

    def _on_error(self, frame: dict[str, Any]) -> None:
        subscription = self._registry.answered(frame.get("ref"))
        if subscription is None:
            log.debug("squall error frame: %s", frame)
            return
        code, message = str(frame.get("code")), str(frame.get("message", ""))
        if code in TRANSIENT_ERRORS:
            delay = self.backoff.delay(subscription.attempt)
            subscription.attempt += 1
            log.info("subscribe %s answered %s; again in %.2fs", subscription.name, code, delay)
            subscription.retry = asyncio.get_running_loop().call_later(
                delay, self._resubscribe, subscription)
        else:
            self._registry.remove(subscription)
            refused = SubscriptionError(code, message, subscription.name)
            if subscription.started:
                self._push(_Raise(refused))
            else:
                subscription.confirmed.set_exception(refused)
        if not self._registry.in_flight:
            self._release()

    def _resubscribe(self, subscription: Subscription) -> None:
        subscription.retry = None
        if (self._outbox is not None and self._registry.by_name.get(subscription.name)
                is subscription and not subscription.live and subscription.ref is None):
            self._send_subscribe(subscription)

    # -- holding, releasing, overflowing ------------------------------------------------

    def _release(self) -> None:
        """No subscribe is unanswered: let the held events through, each once."""
        held, self._held = self._held, []
        if held:
            self._deliver(held)
        if not self._registry.unsettled:
            self._seen.clear()

    def _deliver(self, held: list[Event]) -> None:
        matching = self._registry.matching
        if len(self._registry) == 1:  # one subscription, one replay: no copies to drop
            for event in held:
                if not self._accept(event, matching(event.topic)):
                    return
            return
        # a copy replayed later (another subscription's replay) stands where it is in order
        last = {(event.topic, event.id): index for index, event in enumerate(held)}
        for index, event in enumerate(held):
            if last[event.topic, event.id] == index and not self._accept(event,
                                                                         matching(event.topic)):
                return

    def _push(self, item: Item | _Raise) -> None:
        """Queue a gap or an error: these are never dropped, whatever the bound."""
        self._buffer.append(item)
        self._wake()

    def _overflow(self) -> None:
        """The consumer is ``buffer_size`` events behind: give up this connection (the
        reader stops at once) and resume from the buffered positions once it caught up."""
        if not self._overflowed:
            self.overflows += 1
            log.warning("the squall consumer fell %d events behind; pausing and resuming "
                        "from the server's history", self.buffer_size)
        self._overflowed = True
        self._room.clear()

    def _replay_too_large(self, subscription: Subscription) -> None:
        """The replay of ``subscription`` fills the hold: tell the application with a
        ``Gap``, let through what other subscriptions need, skip the rest of it."""
        log.warning("the replay of %s is larger than replay_size (%d); skipping it",
                    subscription.name, self.replay_size)
        self._push(Gap(subscription.name, REPLAY_TOO_LARGE))
        subscription.skipping = True
        held, self._held = self._held, []
        for event in held:
            if matches(subscription.name, event.topic):
                subscription.skipped_to = event.id
        self._deliver(held)


class _Codec:
    """Frames to and from the subprotocol's wire form."""

    def __init__(self, use_msgpack: bool) -> None:
        self.protocol = _connection.MSGPACK_PROTOCOL if use_msgpack else _connection.JSON_PROTOCOL
        self.decode: Callable[[str | bytes], Any]
        self.encode: Callable[[dict[str, Any]], str | bytes]
        if not use_msgpack:
            self.decode = json.loads
            self.encode = json.dumps
            return
        try:
            import msgpack
        except ImportError:
            raise ImportError("msgpack=True needs the msgpack package: "
                              "pip install 'squall-client[msgpack]'") from None

        def decode(message: str | bytes) -> Any:
            if isinstance(message, str):
                raise ValueError("a text frame on the msgpack subprotocol")
            try:
                return msgpack.unpackb(message)
            except (msgpack.UnpackException, ValueError) as exc:
                raise ValueError(str(exc)) from None

        self.decode = decode
        self.encode = msgpack.packb
