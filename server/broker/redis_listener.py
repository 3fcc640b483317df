"""The Redis broker's listener: this process's one pub/sub connection.

It subscribes in Redis only to what local clients want: one channel per subscribed
topic, one glob per subscribed pattern (several patterns may share a glob). Each
received event is decoded once, checked against the patterns behind its glob with
``topics.matches`` (a glob is broader than its patterns) and handed on.

Redis delivers the messages of one connection in publish order, and ids follow
publish order, so one watermark (the last seq handed on) drops the second copy of
an event that reaches the node through two subscriptions, and says where the node
stood when the connection broke. Every session, the first included, reads Redis's
position before it subscribes, subscribes, then reads each subscribed name's history
after the watermark and hands on what it missed, in order, before any live event:
nothing Redis accepted is lost to a subscription that stayed, and nothing is handed
on twice. A name whose history cannot fill the gap (trimmed, expired) is reported to
``on_gap``; when Redis lost its data (a new epoch), every name is, before any event
of the new epoch is handed on, so that subscribers learn of the loss first.

Besides events, two kinds of message come in: presence messages (joins and leaves,
redis_presence.py) on the channels of events, handed to ``on_presence`` once per
node, through the subscription of that very name; and control messages on
``CONTROL``, which every session subscribes to whatever else it does, handed to
``on_control``. Neither is replayed after a lost connection.

Health: the connection is pinged whenever it has been quiet for ``HEALTH_INTERVAL``;
a pong overdue by ``UNREADY_AFTER`` makes the listener unready (``/readyz`` 503)
until Redis answers, and one overdue by the broker timeout counts as a lost
connection. Reconnects come every ``BACKOFF`` to ``MAX_BACKOFF`` seconds, doubling,
reset after a session that got ready, and are logged at most every ``LOG_EVERY``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any, Protocol

from redis.asyncio import ConnectionPool
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from server.broker.base import PresenceHandler
from server.broker.redis_keys import channel, decode_event, glob
from server.broker.redis_presence import CONTROL, MARK, decode_presence
from server.errors import BrokerUnavailable
from server.events import Event, EventId
from server.history import Replay
from server.logs import Throttle
from server.topics import is_pattern, matches

log = logging.getLogger("squall.broker.redis")

HEALTH_INTERVAL = 0.2  # seconds of silence before the connection is pinged
UNREADY_AFTER = 0.6  # seconds a pong may be late before the node turns unready
BACKOFF = 0.025
MAX_BACKOFF = 0.1
LOG_EVERY = 10.0  # seconds between log lines about failing reconnects
_FAILURES = (RedisError, OSError, TimeoutError, BrokerUnavailable)

Message = dict[str, Any]
Backlog = list[tuple[bytes, bytes | None]]


class Source(Protocol):
    """Where the listener reads what it missed."""

    async def position(self) -> EventId:
        """The newest id Redis has given out (making its epoch if it has none)."""

    async def history(self, name: str, since: str | None, limit: int | None = None) -> Replay:
        """Every retained event of ``name`` after ``since``, or ``recovered=False``."""


class Listener:
    """Subscriptions, delivery, and recovery after lost connections. IOLoop only."""

    def __init__(self, pool: ConnectionPool, source: Source, deliver: Callable[[Event], None],
                 on_gap: Callable[[str], None], timeout: float,
                 on_presence: PresenceHandler | None = None,
                 on_control: Callable[[bytes], None] | None = None) -> None:
        self._pool = pool
        self._source = source
        self._deliver = deliver
        self._on_gap = on_gap
        self._timeout = timeout
        self._on_presence = on_presence
        self._on_control = on_control
        self._refs: dict[str, int] = {}
        self._globs: dict[bytes, set[str]] = {}
        self._acks: dict[bytes, list[asyncio.Future[None]]] = {}
        self._pubsub: PubSub | None = None
        self._epoch: str | None = None  # None until the first session read a position
        self._seen = 0
        self._connected = False  # subscribed and caught up
        self._late = False  # a ping is overdue
        self.first_sync = asyncio.Event()
        self.last_heard = 0.0  # loop time of the last message from Redis
        self.reconnects = 0
        self._sessions = 0
        self._was_ready = False

    @property
    def ready(self) -> bool:
        """Subscribed, caught up, and Redis answers."""
        return self._connected and not self._late

    def names(self) -> list[str]:
        """The topics and patterns subscribed in Redis."""
        return list(self._refs)

    # -- subscriptions ---------------------------------------------------------------

    async def subscribe(self, name: str) -> None:
        """Subscribe in Redis; returns once Redis confirmed.

        Raises ``BrokerUnavailable`` (and subscribes nothing) when the listener is not
        connected or Redis does not confirm within the timeout.
        """
        pubsub = self._pubsub
        if pubsub is None or not self._connected:
            raise BrokerUnavailable("the broker is not connected; subscribe again later")
        self._refs[name] = self._refs.get(name, 0) + 1
        if self._refs[name] > 1:
            return  # an unsubscribe of this name is still on its way
        target = self._target(name)
        if is_pattern(name):
            self._globs.setdefault(target, set()).add(name)
        try:
            await self._confirm(pubsub, name, target)
        except BaseException:
            self._forget(name)
            raise

    async def unsubscribe(self, name: str) -> None:
        """Drop the Redis subscription when no local subscriber wants ``name``."""
        target = self._forget(name)
        pubsub = self._pubsub
        if target is None or pubsub is None:
            return
        try:
            async with asyncio.timeout(self._timeout):
                if is_pattern(name):
                    await pubsub.punsubscribe(target)
                else:
                    await pubsub.unsubscribe(target)
        except _FAILURES as exc:
            log.warning("redis unsubscribe from %s failed: %s", name, _describe(exc))

    def _forget(self, name: str) -> bytes | None:
        """Count one subscriber of ``name`` out; the Redis target to drop, if it was
        the last one (and no other pattern shares its glob)."""
        refs = self._refs.get(name, 0) - 1
        if refs > 0:
            self._refs[name] = refs
            return None
        self._refs.pop(name, None)
        target = self._target(name)
        if is_pattern(name):
            patterns = self._globs.get(target, set())
            patterns.discard(name)
            if patterns:
                return None
            self._globs.pop(target, None)
        return target

    @staticmethod
    def _target(name: str) -> bytes:
        return glob(name) if is_pattern(name) else channel(name)

    async def _confirm(self, pubsub: PubSub, name: str, target: bytes) -> None:
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._acks.setdefault(target, []).append(ack)
        try:
            async with asyncio.timeout(self._timeout):
                if is_pattern(name):
                    await pubsub.psubscribe(target)
                else:
                    await pubsub.subscribe(target)
                await ack
        except _FAILURES as exc:
            log.debug("redis subscribe to %s not confirmed: %s", name, _describe(exc))
            raise BrokerUnavailable("the broker did not confirm the subscribe") from None
        finally:
            waiting = self._acks.get(target, [])
            if ack in waiting:
                waiting.remove(ack)
            if not waiting:
                self._acks.pop(target, None)

    # -- the connection --------------------------------------------------------------

    async def run(self) -> None:
        """Listen forever, reconnecting with capped backoff (run it supervised)."""
        delay = BACKOFF
        reports = Throttle(LOG_EVERY)
        while True:
            try:
                await self._session()
            except _FAILURES as exc:
                if self._was_ready:  # a healthy session ended: start the backoff afresh
                    delay, self._was_ready, reports = BACKOFF, False, Throttle(LOG_EVERY)
                if reports.ready():
                    held = reports.take_held()
                    log.warning("redis listener lost its connection (%s); reconnecting every "
                                "%.2fs at most%s", _describe(exc), MAX_BACKOFF,
                                f" ({held} more failed attempts)" if held else "")
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)

    async def _session(self) -> None:
        pubsub = PubSub(self._pool, ignore_subscribe_messages=False)
        try:
            async with asyncio.timeout(self._timeout):
                await pubsub.connect()  # type: ignore[no-untyped-call]
                start = await self._source.position()  # before subscribing: none missed
                self._pubsub = pubsub
                await self._subscribe_all(pubsub)
                backlog = await self._sync(pubsub)
            await self._catch_up(start, backlog)
            self._sessions += 1
            if self._sessions > 1:
                self.reconnects += 1
            self.last_heard = asyncio.get_running_loop().time()
            self._connected = self._was_ready = True
            self._late = False
            self.first_sync.set()
            log.info("redis listener subscribed to %d names", len(self._refs))
            await self._pump(pubsub)
        finally:
            self._connected = False
            self._pubsub = None
            self._release_acks()
            with contextlib.suppress(*_FAILURES):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _subscribe_all(self, pubsub: PubSub) -> None:
        channels = [channel(name) for name in self._refs if not is_pattern(name)]
        await pubsub.subscribe(CONTROL, *channels)
        if self._globs:
            await pubsub.psubscribe(*self._globs)

    async def _sync(self, pubsub: PubSub) -> Backlog:
        """Wait until Redis has taken every subscription; keep the events read meanwhile."""
        token = os.urandom(8).hex().encode()
        await pubsub.ping(token)
        backlog: Backlog = []
        while True:
            message = await pubsub.get_message(timeout=self._timeout)
            if message is None:
                continue  # the caller's timeout decides
            if message["type"] == "pong" and message["data"] == token:
                return backlog
            self._handle(message, backlog)

    async def _pump(self, pubsub: PubSub) -> None:
        pinged: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            if pinged is None:
                wait = HEALTH_INTERVAL
            elif not self._late:
                wait = pinged + UNREADY_AFTER - loop.time()
            else:
                wait = pinged + self._timeout - loop.time()
            message = await pubsub.get_message(timeout=max(wait, 0.001))
            now = loop.time()
            if message is not None:
                pinged, self._late = None, False
                self.last_heard = now
                self._handle(message, None)
            elif pinged is None:
                async with asyncio.timeout(self._timeout):
                    await pubsub.ping()
                pinged = now
            elif now >= pinged + self._timeout:
                raise TimeoutError(f"no answer to a ping within {self._timeout:g}s")
            elif now >= pinged + UNREADY_AFTER and not self._late:
                self._late = True
                log.warning("redis does not answer a ping; not ready until it does")

    def _release_acks(self) -> None:
        for waiting in self._acks.values():
            for ack in waiting:
                if not ack.done():
                    ack.set_exception(BrokerUnavailable("the redis connection was lost"))
        self._acks.clear()

    # -- messages --------------------------------------------------------------------

    def _handle(self, message: Message, backlog: Backlog | None) -> None:
        kind = message["type"]
        if kind in ("message", "pmessage"):
            if self._other(message):
                return
            if backlog is not None:
                backlog.append((message["data"], message["pattern"]))
            else:
                self._receive(message["data"], message["pattern"])
        elif kind in ("subscribe", "psubscribe"):
            for ack in self._acks.pop(message["channel"], []):
                if not ack.done():
                    ack.set_result(None)

    def _other(self, message: Message) -> bool:
        """Hand on a control or presence message; False for an event."""
        payload: bytes = message["data"]
        if message["channel"] == CONTROL:
            if self._on_control is not None:
                self._on_control(payload)
            return True
        if payload[:1] != MARK:
            return False
        found = decode_presence(payload)
        if found is None:
            log.warning("ignored a malformed presence message")
            return True
        name, notices = found
        pattern = message["pattern"]
        if pattern is None:  # a topic's own channel
            mine = not is_pattern(name) and message["channel"] == channel(name)
        else:  # the glob of that very pattern (other globs may match its channel too)
            mine = is_pattern(name) and pattern == glob(name) and name in self._globs.get(
                pattern, ())
        if mine and self._on_presence is not None:
            try:
                self._on_presence(name, notices)
            except Exception:
                log.exception("the presence handler failed for %s", name)
        return True

    def _receive(self, payload: bytes, pattern: bytes | None) -> None:
        event = decode_event(payload)
        if event is None:
            log.warning("ignored a malformed message on a squall channel")
            return
        if pattern is not None and not any(
                matches(name, event.topic) for name in self._globs.get(pattern, ())):
            return  # the glob is broader than the patterns behind it
        self._accept(event)

    def _accept(self, event: Event) -> None:
        epoch = event.id.rpartition("-")[0]
        if epoch == self._epoch and event.seq <= self._seen:
            return  # already handed on, through another subscription or a catch-up
        self._epoch, self._seen = epoch, event.seq
        self._deliver(event)

    # -- catching up -------------------------------------------------------------------

    async def _catch_up(self, start: EventId, backlog: Backlog) -> None:
        """Hand on what the subscribed names missed since the watermark, then the
        backlog. ``start`` is Redis's position read before this session subscribed."""
        if self._epoch is None:
            self._epoch, self._seen = start.epoch, start.seq  # first session
        elif self._epoch != start.epoch:
            for name in list(self._refs):  # Redis lost what came after our watermark
                self._report_gap(name)
            self._epoch, self._seen = start.epoch, start.seq
        if self._refs:
            events, gaps = await self._missed(list(self._refs),
                                              str(EventId(self._epoch, self._seen)))
            for name in gaps:
                self._report_gap(name)
            for event in events:
                self._accept(event)
        for payload, pattern in backlog:
            self._receive(payload, pattern)

    async def _missed(self, names: list[str], since: str) -> tuple[list[Event], list[str]]:
        replays = await asyncio.gather(*(self._source.history(name, since) for name in names),
                                       return_exceptions=True)
        found: dict[int, Event] = {}
        gaps = []
        for name, replay in zip(names, replays, strict=True):
            if isinstance(replay, BaseException):
                raise replay
            if not replay.recovered:
                gaps.append(name)
                continue
            for event in replay.events:
                found[event.seq] = event
        return [found[seq] for seq in sorted(found)], gaps

    def _report_gap(self, name: str) -> None:
        log.warning("events of %s were lost while the redis connection was down and are "
                    "no longer in its history", name)
        try:
            self._on_gap(name)
        except Exception:
            log.exception("the gap handler failed for %s", name)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
