"""The hub: this node's subscribers, and the fan-out of every event to them.

``deliver`` is the broker's ``on_event``: it matches the topic and notes the event
and its subscribers; it never awaits and never raises into the broker. Consecutive
events of one topic form a run. At the next flush each run is fanned out: its frames
(encoded once per wire format by the events, shared by all) are joined once, and every
subscriber's queue gets that one chunk, so the work per subscriber is per flush,
not per event. Whatever changes what a subscriber should see (the end of a replay,
an unsubscribe, a shutdown) fans the pending runs out first.

A subscribe with ``since`` replays history before live events. While a connection
has a replay (or a broker subscribe) under way, its live events are held back
(bounded by its queue limit: one whose other topics fill it before the broker answers
is closed as a slow consumer) and released after it, minus those the replay already
carried and those of a subscription that failed meanwhile: no gap, no duplicate,
whatever the broker's latency, and nothing of a name the client was told it does not
hold (it would resume from such an event, past what it never got).

Presence (server/presence.py): each new subscription is written to the broker's
presence before its ``subscribed`` reply (so a presence query after it finds the
client, and its publishes come after its join), and removed when it ends. The join
and leave frames the broker announces (``deliver_presence``) go to the subscribers of
that very name, in order with the events before them. ``disconnect`` closes the
clients an operator names, found through an index by client id and by ``sub``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from server import signals
from server.broker.base import Broker, Disconnect, PresenceNotice, Publishable, Published
from server.commands import with_ref
from server.connection import CLOSE_SLOW_CONSUMER, Connection, Flusher
from server.errors import SquallError
from server.events import Event
from server.presence import Presence
from server.router import Router
from server.topics import matches
from server.wire import WireFormat

log = logging.getLogger("squall.hub")


class PublishedEvent(NamedTuple):
    """What ``event_published`` receivers get: the event as subscribers see it."""

    topic: str
    id: str
    ts: int
    data: Any


def _ignore(seconds: float) -> None:
    pass


def _retrieved(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


class _Run:
    """Consecutive events of one topic since the last flush, and their subscribers."""

    __slots__ = ("events", "subscribers", "topic", "version")

    def __init__(self, topic: str, version: int, subscribers: tuple[Connection, ...],
                 event: Event) -> None:
        self.topic = topic
        self.version = version
        self.subscribers = subscribers
        self.events = [event]

    def chunk(self, wire: WireFormat) -> bytes:
        """Every event's frame in ``wire``, joined."""
        if len(self.events) == 1:
            return self.events[0].frame(wire)
        return b"".join([event.frame(wire) for event in self.events])


# Events waiting for the flush at most: past this they are fanned out at once.
MAX_PENDING_EVENTS = 512


class _Held(Protocol):
    """What a hold keeps: an event, or one subscriber's presence frames."""

    @property
    def id(self) -> str: ...

    @property
    def topic(self) -> str: ...

    @property
    def size(self) -> int: ...

    def frame(self, wire: WireFormat) -> bytes | memoryview: ...


class _HeldFrames(NamedTuple):
    """Presence frames of one subscriber of exactly ``topic``, kept back with its events."""

    chunk: bytes | memoryview
    topic: str
    id: str = ""  # never an event id: never taken for a replayed event

    @property
    def size(self) -> int:
        return len(self.chunk)

    def frame(self, wire: WireFormat) -> bytes | memoryview:
        return self.chunk


class _Wanted:
    """Whether something held back is still for a connection: a subscribe that failed
    (or an unsubscribe) under way while it was held leaves nothing of that name to
    deliver, since the client was told it is not subscribed."""

    def __init__(self, subscriptions: Collection[str]) -> None:
        self._subscriptions = subscriptions
        self._topics: dict[str, bool] = {}

    def __call__(self, held: _Held) -> bool:
        if isinstance(held, _HeldFrames):  # for the subscribers of exactly that name
            return held.topic in self._subscriptions
        found = self._topics.get(held.topic)
        if found is None:
            found = self._topics[held.topic] = any(
                matches(name, held.topic) for name in self._subscriptions)
        return found


@dataclass
class _Hold:
    """Live events kept back from a connection while replays or subscribes are under way."""

    holders: int = 0  # blocks holding the events back (replays, broker subscribes)
    events: list[_Held] = field(default_factory=list)
    bytes: int = 0
    replayed: set[str] = field(default_factory=set)


class Hub:
    """This node's registry of connections and subscriptions. IOLoop only."""

    def __init__(self, broker: Broker, max_subscriptions: int = 100,
                 observe_publish: Callable[[float], None] = _ignore,
                 observe_fanout: Callable[[float], None] = _ignore,
                 flusher: Flusher | None = None, presence: Presence | None = None,
                 presence_timeout: float = 3.0) -> None:
        self.broker = broker
        self.presence = presence
        self.presence_timeout = presence_timeout
        self.max_subscriptions = max_subscriptions
        self.observe_publish = observe_publish
        self.observe_fanout = observe_fanout
        # plain counters, read by the metrics collector at scrape time
        self.published = 0
        self.dropped = 0
        self.slow_closes = 0
        self.router: Router[Connection] = Router()
        self.flusher = flusher or Flusher()
        self.flusher.before = self.fan_out
        self._runs: list[_Run] = []
        self._pending = 0  # events in self._runs
        self.connections: set[Connection] = set()
        self.delivered = 0
        self._edges: set[asyncio.Task[None]] = set()
        self._subscribing: dict[str, asyncio.Task[None]] = {}  # broker subscribes under way
        self._in_broker: set[str] = set()  # names the broker confirmed
        self._publishing = 0
        self._idle: asyncio.Event | None = None
        self._by_id: dict[str, Connection] = {}
        self._by_sub: dict[str, set[Connection]] = {}

    # -- connections ---------------------------------------------------------

    def attach(self, connection: Connection) -> None:
        self.connections.add(connection)
        connection.on_slow = self._on_slow
        self._index(connection)

    def forget(self, connection: Connection) -> None:
        """Forget a closed connection and every subscription it had."""
        connection.mark_closed()
        if connection in self.connections:
            self.connections.discard(connection)
            self._unindex(connection)
        for name in list(connection.subscriptions):
            self._remove(connection, name)

    def forget_all(self) -> None:
        """Forget every connection (at shutdown, once they were told to close)."""
        for connection in list(self.connections):
            self.forget(connection)

    def identify(self, connection: Connection, info: Any) -> None:
        """``connection`` is now ``info`` (a TCP client authenticated): re-index it and
        write its presence entries again."""
        self._unindex(connection)
        connection.info = info
        self._index(connection)
        joined = [name for name, entry in connection.subscriptions.items() if entry]
        if self.presence is not None and joined:
            self.presence.rewrite(connection, joined)

    def disconnect(self, request: Disconnect) -> int:
        """Close the connections ``request`` names (an operator's disconnect), letting
        their queued frames go first; how many."""
        if request.client is not None:
            found = self._by_id.get(request.client)
            targets = [found] if found is not None else []
        else:
            targets = list(self._by_sub.get(request.sub or "", ()))
        loop = asyncio.get_running_loop()
        for connection in targets:
            connection.close(request.code, request.reason, drain=True)
            loop.call_soon(self.forget, connection)
        return len(targets)

    def _index(self, connection: Connection) -> None:
        info = connection.info
        if info is None:
            return
        self._by_id[info.id] = connection
        if info.sub is not None:
            self._by_sub.setdefault(info.sub, set()).add(connection)

    def _unindex(self, connection: Connection) -> None:
        info = connection.info
        if info is None:
            return
        if self._by_id.get(info.id) is connection:
            del self._by_id[info.id]
        same = self._by_sub.get(info.sub) if info.sub is not None else None
        if same is not None:
            same.discard(connection)
            if not same:
                del self._by_sub[info.sub]

    def close_subscribers(self, name: str, code: int, reason: str) -> None:
        """Close every connection subscribed to ``name`` (that exact topic or pattern).

        Used when the broker lost events of ``name`` that it cannot replay: the
        clients reconnect and resume with ``since``. Each closed connection is
        forgotten on the next loop pass, as after a slow-consumer close.
        """
        loop = asyncio.get_running_loop()
        for connection in [c for c in self.connections if name in c.subscriptions]:
            connection.close(code, reason)
            loop.call_soon(self.forget, connection)

    def close_all(self, code: int, reason: str) -> None:
        """Close every connection (shutdown), letting queued frames go first."""
        self.fan_out()
        for connection in list(self.connections):
            connection.close(code, reason, drain=True)

    async def idle(self, timeout: float) -> bool:
        """Wait until no publish is under way; False if one still is after ``timeout``."""
        if not self._publishing:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # -- publishing and fan-out ---------------------------------------------

    async def publish(self, requests: Sequence[Publishable]) -> list[Published]:
        """Publish through the broker; raises ``SquallError`` (e.g. unavailable)."""
        started = time.perf_counter()
        self._publishing += 1
        try:
            outcomes = await self.broker.publish(requests)
        finally:
            self._publishing -= 1
            if not self._publishing and self._idle is not None:
                self._idle.set()
        self.observe_publish(time.perf_counter() - started)
        self.published += sum(1 for outcome in outcomes if not outcome.duplicate)
        if signals.event_published.has_receivers:
            for request, outcome in zip(requests, outcomes, strict=True):
                if not outcome.duplicate:
                    signals.event_published.send(self, event=PublishedEvent(
                        outcome.topic, outcome.id, outcome.ts, request.data))
        return outcomes

    def deliver(self, event: Event) -> None:
        """Note ``event`` for every matching local connection. O(1) per event in a run."""
        runs = self._runs
        run = runs[-1] if runs else None
        if run is not None and run.topic == event.topic and run.version == self.router.version:
            run.events.append(event)
        else:
            subscribers = self.router.match(event.topic)
            if not subscribers:
                return
            run = _Run(event.topic, self.router.version, tuple(subscribers), event)
            runs.append(run)
            self.flusher.schedule()
        self.delivered += len(run.subscribers)
        self._pending += 1
        if self._pending >= MAX_PENDING_EVENTS:
            self.fan_out()

    def fan_out(self) -> None:
        """Queue the frames of every event delivered so far on its subscribers."""
        runs, self._runs = self._runs, []
        self._pending = 0
        for run in runs:
            started = time.perf_counter()
            try:
                self._fan_out_run(run)
            except Exception:  # a bug here must not cost the other runs their events
                log.exception("fan-out of %d events on %r failed", len(run.events), run.topic)
            self.observe_fanout(time.perf_counter() - started)

    def _fan_out_run(self, run: _Run) -> None:
        chunks: dict[WireFormat, bytes] = {}
        count = len(run.events)
        for connection in run.subscribers:
            if connection.hold is not None:
                for event in run.events:
                    self._hold_back(connection, event)
                continue
            wire = connection.wire
            chunk = chunks.get(wire)
            if chunk is None:
                chunk = chunks[wire] = run.chunk(wire)
            if len(chunk) <= connection.max_queue_bytes // 2:
                connection.enqueue(chunk, count)
            else:  # a burst past half the queue: frame by frame, written as it goes
                for event in run.events:
                    connection.enqueue(event.frame(wire))

    # -- subscriptions -------------------------------------------------------

    async def subscribe(self, connection: Connection, name: str, since: str | None = None,
                        ref: Any = None) -> None:
        """Subscribe and answer: replayed events (with ``since``), then ``subscribed``.

        The reply's ``last_id`` is where the subscription starts: every event after it
        is delivered (replayed or live), so a client that saw none resumes from it.
        Raises ``SquallError`` (``broker_unavailable`` among others) with nothing
        subscribed, unless the client already held ``name``.
        """
        if (name not in connection.subscriptions
                and len(connection.subscriptions) >= self.max_subscriptions):
            raise SquallError("too_many_subscriptions",
                              f"a connection may hold {self.max_subscriptions} subscriptions")
        reply = with_ref({"type": "subscribed", "topic": name}, ref)
        new = name not in connection.subscriptions
        if since is None:
            # read first: whatever comes later is delivered live, so nothing after it is lost
            reply["last_id"] = str(await self.broker.position(name))
            await self._add(connection, name)
            await self._join(connection, name, new)
            connection.send(reply)
        else:
            await self._add_with_replay(connection, name, since, reply, new)
        signals.subscribed.send(self, client=connection.info, topic=name)

    async def unsubscribe(self, connection: Connection, name: str, ref: Any = None) -> None:
        if name not in connection.subscriptions:
            raise SquallError("not_found", f"not subscribed to {name!r}")
        self.fan_out()  # what was published before goes before ``unsubscribed``
        self._remove(connection, name)
        connection.send(with_ref({"type": "unsubscribed", "topic": name}, ref))
        signals.unsubscribed.send(self, client=connection.info, topic=name)

    async def _join(self, connection: Connection, name: str, new: bool) -> None:
        """Write a new subscription's presence entry, before the client is told."""
        presence = self.presence
        if presence is None or not new or connection.closed or (
                name not in connection.subscriptions):
            return
        presence.joined(connection, name)
        connection.subscriptions[name] = True
        await presence.written(connection, name, self.presence_timeout)

    def deliver_presence(self, name: str, notices: list[PresenceNotice]) -> None:
        """Queue the join and leave frames of one broker announcement on the subscribers
        of exactly ``name``, after the events delivered before it. Never raises into
        the broker."""
        subscribers = self.router.exact(name)
        if not subscribers or self.presence is None:
            return
        try:
            self.fan_out()
            for connection, chunk, count in self.presence.frames(name, notices, subscribers):
                if connection.hold is not None:
                    self._hold_back(connection, _HeldFrames(chunk, name))
                else:
                    connection.enqueue(chunk, count)
        except Exception:  # a bug here must not cost the broker its listener
            log.exception("presence frames of %r failed", name)

    def rewrite_presence(self, names: list[str]) -> None:
        """The broker lost this node's entries of ``names``: write them again."""
        if self.presence is None:
            return
        for name in names:
            for connection in self._joined(name):
                self.presence.rewrite(connection, (name,))

    def presence_entries(self) -> dict[str, list[tuple[str, bytes]]]:
        """Every local subscription's presence entry, by name (what a rewrite of this
        node's presence writes)."""
        presence = self.presence
        if presence is None:
            return {}
        return {name: [(connection.info.id, presence.entry_of(connection))
                       for connection in self._joined(name)]
                for name, _ in self.router.names()}

    def _joined(self, name: str) -> list[Connection]:
        """The subscribers of exactly ``name`` whose presence entry was written."""
        return [connection for connection in self.router.exact(name)
                if connection.subscriptions.get(name)]

    def subscriber_counts(self) -> dict[str, int]:
        """Local subscribers per subscribed name (topics and patterns)."""
        return dict(self.router.names())

    async def _add(self, connection: Connection, name: str) -> None:
        """Subscribe locally; returns once the broker delivers ``name``'s events here.

        The broker is subscribed once per name, by whichever client needs it first;
        the others wait for the same confirmation, with their live events held back
        (events of ``name`` may come meanwhile through other names). When it fails,
        every waiting client's subscription is undone (unless it already held the
        name), nothing of it delivered, and the error raised to each.
        """
        held = name in connection.subscriptions
        connection.subscriptions.setdefault(name, False)
        self.router.add(name, connection)
        if name in self._in_broker:
            return
        with self._holding(connection):
            try:
                pending = self._subscribing.get(name)
                if pending is None:
                    pending = self._subscribing[name] = asyncio.get_running_loop().create_task(
                        self._subscribe_broker(name))
                    pending.add_done_callback(_retrieved)  # its waiters may all be gone
                await asyncio.shield(pending)
            except BaseException:
                if not held:
                    connection.subscriptions.pop(name, None)
                    self.router.remove(name, connection)
                raise

    async def _subscribe_broker(self, name: str) -> None:
        try:
            await self.broker.subscribe(name)
            self._in_broker.add(name)
        finally:
            del self._subscribing[name]

    def _remove(self, connection: Connection, name: str) -> None:
        # only a subscription whose entry was written has one to take out: a subscribe
        # that failed (while the broker is away, say) leaves nothing for the writer
        if connection.subscriptions.pop(name, False) and self.presence is not None:
            self.presence.left(connection, name)
        if self.router.remove(name, connection):
            task = asyncio.get_running_loop().create_task(self._unsubscribe_broker(name))
            self._edges.add(task)
            task.add_done_callback(self._edge_done)

    async def _unsubscribe_broker(self, name: str) -> None:
        """The last local subscriber left: unsubscribe the broker, once a subscribe still
        under way has ended, and only if nobody subscribed again meanwhile."""
        pending = self._subscribing.get(name)
        if pending is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(pending)
        if name in self._in_broker and not self.router.subscribers(name):
            self._in_broker.discard(name)
            await self.broker.unsubscribe(name)

    def _edge_done(self, task: asyncio.Task[None]) -> None:
        self._edges.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("broker unsubscribe failed", exc_info=task.exception())

    async def _add_with_replay(self, connection: Connection, name: str, since: str,
                               reply: dict[str, Any], new: bool) -> None:
        with self._holding(connection) as hold:
            await self._add(connection, name)
            try:
                replay = await self.broker.history(name, since)
            except BaseException:
                if new:
                    self._remove(connection, name)  # the client got an error: not subscribed
                raise
            await self._replay(connection, hold, replay.events)
            reply["recovered"] = replay.recovered
            if replay.last_id is not None:
                reply["last_id"] = replay.last_id
            await self._join(connection, name, new)
            connection.send(reply)

    @contextlib.contextmanager
    def _holding(self, connection: Connection) -> Iterator[_Hold]:
        """Hold the connection's live events back until the block (and every other
        block holding them) has ended."""
        hold = connection.hold
        if hold is None:
            hold = connection.hold = _Hold()
        hold.holders += 1
        try:
            yield hold
        finally:
            self._release(connection, hold)

    async def _replay(self, connection: Connection, hold: _Hold, events: list[Event]) -> None:
        """Enqueue a replay paced by the socket, so a long one never overflows the queue."""
        budget = connection.max_queue_bytes // 2
        for event in events:
            hold.replayed.add(event.id)
            connection.enqueue(event.frame(connection.wire))
            if connection.queued_bytes > budget:
                await connection.drained(budget // 2)
                if connection.closed:
                    return

    def _hold_back(self, connection: Connection, event: _Held) -> None:
        if connection.closed:
            return
        hold: _Hold = connection.hold
        hold.events.append(event)
        hold.bytes += event.size
        if hold.bytes > connection.max_queue_bytes:
            connection.dropped_frames = len(hold.events)
            connection.close(CLOSE_SLOW_CONSUMER, "slow consumer")
            self._on_slow(connection)

    def _release(self, connection: Connection, hold: _Hold) -> None:
        self.fan_out()  # events delivered during the replay are held back, not sent twice
        hold.holders -= 1
        if hold.holders:
            return
        connection.hold = None
        wanted = _Wanted(connection.subscriptions)
        for held in hold.events:
            if held.id not in hold.replayed and wanted(held):
                connection.enqueue(held.frame(connection.wire))

    def _on_slow(self, connection: Connection) -> None:
        self.slow_closes += 1
        self.dropped += connection.dropped_frames
        # called from inside the fan-out loop: forget after it, not during it
        asyncio.get_running_loop().call_soon(self.forget, connection)
        signals.slow_consumer_closed.send(self, client=connection.info,
                                          queued_bytes=connection.queued_bytes)

