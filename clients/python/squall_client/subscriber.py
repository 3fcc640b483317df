"""The subscriber: one ``async for`` over every subscription, across reconnects.

Reading never waits on the application: a task of its own reads the socket into a
buffer of at most ``buffer_size`` events, which the iterator empties. A consumer that
falls that far behind does not lose events: the subscriber closes the connection,
waits until the buffer is half empty, and resumes every subscription from the last
event it buffered. Only when the server's history no longer covers what was missed
does the iterator say so, with a ``Gap``.

Resuming: each subscription remembers the id of the last event it delivered (or the
server's ``last_id`` when it took effect, docs/protocol.md) and resubscribes with it as
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
import logging
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.protocol import State

from squall_client import _connection
from squall_client._connection import After, Codec
from squall_client._delivery import Delivery, Item, Raise
from squall_client._registry import Registry, Subscription
from squall_client.backoff import RECONNECT_BACKOFF, Backoff
from squall_client.errors import SquallError, SubscriptionError
from squall_client.models import NO_POSITION, NOT_RECOVERED, REPLAY_TOO_LARGE, Event, Gap
from squall_client.topics import matches

log = logging.getLogger("squall_client")

TokenProvider = Callable[[], "str | Awaitable[str | None] | None"]

# error codes a subscribe may get that pass with time: sent again after a backoff
TRANSIENT_ERRORS = frozenset({"broker_unavailable", "rate_limited", "internal_error"})
# a connection that stayed open this long starts the backoff afresh
STABLE_AFTER = 5.0
USER_AGENT = "squall-client/0.1"


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
        self.url = _connection.socket_url(url)
        self.backoff = backoff
        self.reconnects = 0  # times a connection ended and another was begun
        self._token = token
        self._token_provider = token_provider
        self._codec = Codec(msgpack)
        self._socket_options: dict[str, Any] = {
            "open_timeout": open_timeout, "close_timeout": close_timeout,
            "ping_interval": ping_interval,
            "ping_timeout": ping_timeout, "max_message_bytes": max_message_bytes,
            "origin": origin, "headers": dict(headers or {}), "user_agent": USER_AGENT}
        self._registry = Registry()
        self._delivery = Delivery(buffer_size, replay_size)
        self._refs = itertools.count(1)
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
        self._delivery.clear()
        self._settle_unconfirmed(SquallError("closed", "the subscriber is closed"))
        self._delivery.wake()

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
            self._delivery.release(self._registry)

    @property
    def buffer_size(self) -> int:
        return self._delivery.buffer_size

    @property
    def replay_size(self) -> int:
        return self._delivery.replay_size

    @property
    def overflows(self) -> int:
        """Times the consumer fell ``buffer_size`` events behind."""
        return self._delivery.overflows

    # -- iteration ----------------------------------------------------------------

    def __aiter__(self) -> Subscriber:
        return self

    async def __anext__(self) -> Item:
        delivery = self._delivery
        while True:
            item = delivery.pop()
            if item is not None:
                return item
            if self._closed:
                raise StopAsyncIteration
            if self._failure is not None:
                raise self._failure
            self.start()
            await delivery.wait()

    # -- the connection -----------------------------------------------------------

    async def _run(self) -> None:
        """Connect, serve, and reconnect as the close code says, until told to stop."""
        attempt = 0
        try:
            while True:
                if self._delivery.overflowed:  # resume once the consumer caught up
                    await self._delivery.room.wait()
                    self._delivery.resumed()
                    attempt = 0
                code, reason = await self._connect_and_serve(await self._current_token())
                if self._closed:
                    return
                if self._delivery.overflowed:
                    continue
                attempt = 0 if self._confirmed_here else attempt
                await self._pause_after(code, reason, attempt)
                attempt += 1
        except SquallError as exc:
            self._stop(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must reach the application, not vanish
            log.exception("the squall subscriber failed")
            self._stop(SquallError("internal_error", f"the subscriber failed: {exc!r}"))

    async def _pause_after(self, code: int | None, reason: str, attempt: int) -> None:
        """Wait out the backoff before connecting again; ``Disconnected`` after a close
        that ends it all (docs/protocol.md, close codes)."""
        action = _connection.after_close(code)
        if action is After.STOP or (action is After.NEW_TOKEN
                                    and self._token_provider is None):
            raise _connection.stopped(code, reason)
        if action is After.NEW_TOKEN:
            self._token = None  # the provider is asked before the next connection
        delay = self.backoff.delay(attempt)
        self.reconnects += 1
        log.info("squall connection closed (%s %s); reconnecting in %.2fs", code, reason,
                 delay)
        await asyncio.sleep(delay)

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
        self._confirmed_here = False  # until this connection proves itself (a failed
        try:                          # connect does not: the backoff grows)
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
        self._outbox = outbox  # set while connected: subscribes go out at once
        for subscription in self._registry:
            self._send_subscribe(subscription)
        try:
            code, reason = await self._read(socket)
        finally:
            self._outbox = None
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
        delivery = self._delivery
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
                if delivery.overflowed:
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
        self._delivery.disconnected()

    def _stop(self, error: SquallError) -> None:
        """Stop for good: the iteration raises ``error`` once the buffer is empty."""
        log.warning("squall subscriber stopped: %s", error)
        self._failure = error
        self._settle_unconfirmed(error)
        self._delivery.wake()

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
                if not self._delivery.hold(event):
                    self._replay_too_large(replaying)
                return
            if matches(replaying.name, topic):
                replaying.skipped_to = event.id
        self._delivery.accept(event, matching)

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
                self._delivery.push(Gap(subscription.name, NOT_RECOVERED))
            elif subscription.no_position:
                self._delivery.push(Gap(subscription.name, NO_POSITION))
            if isinstance(last_id, str) and not self._delivery.holds_for(subscription.name):
                subscription.position = last_id  # held events of its own advance it
        subscription.no_position = False
        subscription.attempt = 0
        self._registry.set_live(subscription, True)
        self._confirmed_here = True
        if not subscription.started:
            subscription.started = True
            subscription.confirmed.set_result(None)
        if not self._registry.in_flight:
            self._delivery.release(self._registry)

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
                self._delivery.push(Raise(refused))
            else:
                subscription.confirmed.set_exception(refused)
        if not self._registry.in_flight:
            self._delivery.release(self._registry)

    def _resubscribe(self, subscription: Subscription) -> None:
        subscription.retry = None
        if (self._outbox is not None and self._registry.by_name.get(subscription.name)
                is subscription and not subscription.live and subscription.ref is None):
            self._send_subscribe(subscription)

    def _replay_too_large(self, subscription: Subscription) -> None:
        """The replay of ``subscription`` overflows the hold: tell the application with
        a ``Gap``, let through what other subscriptions need, skip the rest of it."""
        log.warning("the replay of %s is larger than replay_size (%d); skipping it",
                    subscription.name, self._delivery.replay_size)
        self._delivery.push(Gap(subscription.name, REPLAY_TOO_LARGE))
        subscription.skipping = True
        subscription.skipped_to = self._delivery.skip(subscription.name, self._registry)
