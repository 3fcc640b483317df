"""The Redis broker: every node shares topics, ids and history through one Redis.

- Ids: ``<epoch>-<seq>``. ``seq`` is one counter in Redis, taken inside the publish
  script, so ids increase in publish order within a topic and across all topics and
  nodes. The epoch is a random word kept in Redis and made anew when Redis has none
  (first use, or Redis lost its data): a resume from an id of a lost epoch is
  answered ``recovered: false`` with every event retained in the new one, never
  misread.
- Publishing: one Lua script per batch checks each idempotency key, appends the
  event to its topic's stream and PUBLISHes it; Redis runs the script as one step
  that no other command interleaves with.
  ``publish`` returns when Redis ran it, and raises ``BrokerUnavailable`` once
  ``options.timeout`` has passed without an answer: the batch may or may not have
  run, and a retry with the same idempotency key is answered with the first id,
  because the key is checked in the same script.
- History: a stream per topic, trimmed to ``retention.size`` events and expiring
  ``retention.ttl`` after the topic's last publish (older entries are skipped on
  read). At most ``retention.max_topics`` topics are tracked; the least recently
  published are forgotten first, and a ``since`` from before is then unrecoverable.
  ``retention.max_bytes`` is left to Redis's own ``maxmemory`` (use the
  ``noeviction`` policy: an evicted key would be history lost without notice).
- Idempotency keys live in Redis for ``options.dedupe_window``; Redis memory, not
  ``dedupe_max_keys``, bounds how many.
- Delivery: through this process's one pub/sub connection (``Listener``), only for
  the topics and patterns local clients subscribed to; each event once, in order;
  after a lost connection the gap is filled from the streams, or ``on_gap`` is told.
- While Redis is unreachable: connections stay; ``publish``, ``history``,
  ``position`` and ``subscribe`` raise ``BrokerUnavailable`` within
  ``options.timeout`` (a publish counts from its call, even queued behind a grouped
  script call); ``ready`` is False from the first unanswered ping (within about a
  second) until the listener is back and caught up; the listener tries to reconnect
  every 0.1 s at most.
- Persistence is Redis's: with ``appendonly yes`` and ``appendfsync always`` a
  restart keeps the epoch, the streams and the idempotency keys, and every node
  fills its subscribers' gaps from the streams (nothing accepted is lost). With
  ``appendfsync everysec`` up to about a second of accepted events can be lost in a
  crash of the Redis host; with no persistence a restart loses everything: a new
  epoch begins, every subscriber is closed with 4009, and its resume gets
  ``recovered: false`` and every event accepted since.
- Subscriber counts: every node writes its local counts to Redis every few seconds
  (a hash per node, expiring when the node stops writing); ``subscriber_counts``
  adds them up.
- Presence, lifecycle and disconnects: redis_presence.py (scripts in
  redis_presence_lua.py); the listener hands it the control channel's messages and
  the presence messages on the event channels.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import msgpack
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from server.broker.base import (
    Broker,
    BrokerOptions,
    Disconnect,
    EventHandler,
    PresenceChange,
    PresenceList,
    PresenceNotice,
    Published,
    PublishRequest,
)
from server.broker.memory import new_epoch
from server.broker.redis_keys import (
    CHANNEL,
    IDEMPOTENCY,
    META,
    NODES,
    STREAM,
    TOPICS_BY_SEQ,
    TOPICS_BY_TS,
    TOPICS_GONE,
    StreamEntry,
    decode_entry,
    encode_data,
    encode_head,
    node_key,
    stream_key,
)
from server.broker.redis_listener import Listener
from server.broker.redis_lua import POSITION, PUBLISH
from server.broker.redis_presence import RedisPresence
from server.errors import BrokerUnavailable, SquallError
from server.events import Event, EventId
from server.history import Replay, merge_replay, oldest
from server.logs import Throttle
from server.router import Router
from server.tasks import stop, supervise
from server.topics import is_pattern, matches

log = logging.getLogger("squall.broker.redis")

MAX_CONNECTIONS = 64  # command connections per process; publishes beyond wait their turn
COUNTS_INTERVAL = 2.0  # seconds between writes of this node's subscriber counts
COUNTS_TTL = 3 * COUNTS_INTERVAL
_FAILURES = (RedisError, OSError, TimeoutError)
# Events in one call of the publish script at most, when publishes are grouped.
MAX_SCRIPT_EVENTS = 1000
READ_CHUNK = 100  # streams read per round trip by a pattern's history
LOG_EVERY = 10.0  # seconds between log lines about failing calls
_SCRIPT_KEYS = [META, TOPICS_BY_SEQ, TOPICS_BY_TS, TOPICS_GONE]


class _Meta(NamedTuple):
    epoch: str  # "" while Redis has none
    seq: int
    forgotten: int
    now_ms: int


class RedisBroker(Broker):
    """A broker shared by every node that points at the same Redis (see the module)."""

    def __init__(self, url: str, options: BrokerOptions) -> None:
        super().__init__(options)
        self.node_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        connection = {"socket_connect_timeout": options.timeout,
                      "socket_timeout": options.timeout, "retry": Retry(NoBackoff(), 0)}
        self._pool = BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=None, **connection)
        self._listen_pool = ConnectionPool.from_url(url, max_connections=4, **connection)
        self._client = Redis(connection_pool=self._pool)
        self._publish_script = self._client.register_script(PUBLISH)
        self._position_script = self._client.register_script(POSITION)
        self._position_waiters: list[asyncio.Future[EventId]] = []
        self._position_reader: asyncio.Task[None] | None = None
        self._presence = RedisPresence(self._client, self.node_id, options.presence,
                                       options.timeout, self)
        self._listener = Listener(self._listen_pool, self, self._deliver, self._gap,
                                  options.timeout, on_presence=self._heard_presence,
                                  on_control=self._presence.control)
        self._tasks: list[asyncio.Task[None]] = []
        self._failed_at: float | None = None  # a publish failed: not ready until Redis answers
        self._closed = False
        self._waiting: collections.deque[tuple[list[Any], asyncio.Future[list[Any]]]] = (
            collections.deque())
        self._publisher: asyncio.Task[None] | None = None
        self._where = url.rsplit("@", maxsplit=1)[-1]
        self._failures = Throttle(LOG_EVERY)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, on_event: EventHandler) -> None:
        """Start listening; waits up to ``options.timeout`` for Redis, then serves anyway."""
        await super().start(on_event)
        self._tasks = [supervise("redis-listener", self._listener.run),
                       supervise("redis-subscriber-counts", self._report_counts),
                       supervise("redis-presence", self._presence.run)]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.options.timeout):
                await self._listener.first_sync.wait()
        if not self._listener.first_sync.is_set():
            log.warning("redis at %s does not answer yet; not ready until it does",
                        self._where)

    async def close(self) -> None:
        self._closed = True
        for task in [*self._tasks, self._publisher]:
            await stop(task)
        await self._presence.close()
        with contextlib.suppress(*_FAILURES):
            async with asyncio.timeout(min(self.options.timeout, 1.0)):
                await self._client.delete(node_key(self.node_id))
                await self._client.srem(NODES, self.node_id)
        await self._client.aclose()
        await self._pool.disconnect()
        await self._listen_pool.disconnect()

    @property
    def reconnects(self) -> int:
        return self._listener.reconnects

    @property
    def ready(self) -> bool:
        failed_at = self._failed_at
        heard = failed_at is None or self._listener.last_heard > failed_at
        return not self._closed and self._listener.ready and heard

    def _deliver(self, event: Event) -> None:
        self._on_event(event)

    def _gap(self, name: str) -> None:
        self.on_gap(name)

    def _heard_presence(self, name: str, notices: list[PresenceNotice]) -> None:
        self.on_presence(name, notices)

    # -- presence and control (redis_presence.py) -----------------------------------------

    async def update_presence(self, changes: Sequence[PresenceChange]) -> None:
        if self._closed:
            raise BrokerUnavailable("the broker is closed")
        await self._presence.apply(changes)

    async def presence(self, name: str, limit: int) -> PresenceList:
        if self._closed:
            raise BrokerUnavailable("the broker is closed")
        return await self._presence.listing(name, limit)

    async def disconnect(self, request: Disconnect) -> None:
        if self._closed:
            raise BrokerUnavailable("the broker is closed")
        await self._presence.disconnect(request)

    # -- publishing ----------------------------------------------------------------------

    async def publish(self, requests: Sequence[PublishRequest]) -> list[Published]:
        """Publish through the script; concurrent publishes share one script call.

        While a call is under way, later publishes wait and then go together in the
        next one (in arrival order, at most ``MAX_SCRIPT_EVENTS`` events a call), so a
        busy node pays the client's round trip per group, not per request. A publish
        that comes when nothing is under way goes at once. Each publish waits at most
        ``options.timeout`` from its call, queued or not; one that gave up before its
        group was sent is never sent.
        """
        if self._closed:
            raise BrokerUnavailable("the broker is closed")
        if not requests:
            return []
        events = [[request.topic, encode_head(request.topic), _data(index, request.data),
                   request.idempotency_key or ""]
                  for index, request in enumerate(requests)]
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[list[Any]] = loop.create_future()
        entry = (events, waiter)
        self._waiting.append(entry)
        if self._publisher is None:
            self._publisher = loop.create_task(self._publish_waiting())
        try:
            outcomes = await asyncio.wait_for(asyncio.shield(waiter), self.options.timeout)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if entry in self._waiting:  # never sent: it is not published, now or later
                self._waiting.remove(entry)
            if isinstance(exc, TimeoutError):
                raise BrokerUnavailable() from None
            raise
        return [_published(request.topic, outcome)
                for request, outcome in zip(requests, outcomes, strict=True)]

    async def _publish_waiting(self) -> None:
        try:
            while self._waiting:
                group = [self._waiting.popleft()]
                count = len(group[0][0])
                while self._waiting and count + len(self._waiting[0][0]) <= MAX_SCRIPT_EVENTS:
                    group.append(self._waiting.popleft())
                    count += len(group[-1][0])
                await self._publish_group(group)
        finally:  # stopped (closing) or a bug: nobody may wait for a call that never comes
            self._publisher = None
            while self._waiting:
                _, waiter = self._waiting.popleft()
                if not waiter.done():
                    waiter.set_exception(BrokerUnavailable())

    async def _publish_group(self, group: list[tuple[list[Any], asyncio.Future[list[Any]]]],
                             ) -> None:
        events = [event for part, _ in group for event in part]
        try:
            async with asyncio.timeout(self.options.timeout):
                outcomes = await self._publish_script(keys=_SCRIPT_KEYS,
                                                      args=self._script_args(events))
        except BaseException as exc:
            if isinstance(exc, _FAILURES):
                self._failed_at = asyncio.get_running_loop().time()
                self._failed(f"publish: {_describe(exc)}",
                             logging.ERROR if isinstance(exc, ResponseError) else logging.WARNING)
            for _, waiter in group:
                if not waiter.done():
                    waiter.set_exception(BrokerUnavailable())
            if not isinstance(exc, _FAILURES):
                raise
            return
        self._failed_at = None
        at = 0
        for part, waiter in group:
            if not waiter.done():  # its publisher may have gone (cancelled)
                waiter.set_result(outcomes[at:at + len(part)])
            at += len(part)

    def _script_args(self, events: list[Any]) -> list[Any]:
        retention, options = self.options.retention, self.options
        dedupe_ms = _ms(options.dedupe_window) if options.dedupe_max_keys > 0 else 0
        return [new_epoch(), retention.size, _ms(retention.ttl), retention.max_topics,
                dedupe_ms, CHANNEL, STREAM, IDEMPOTENCY,
                # Redis's Lua msgpack reads strings, not the bin type: bytes go as strings
                msgpack.packb(events, use_bin_type=False)]

    # -- history ---------------------------------------------------------------------------

    async def history(self, name: str, since: str | None, limit: int | None = None) -> Replay:
        """See ``Broker.history``. Reads are bounded: each stream by the replay cap, a
        pattern's streams in chunks, and the events kept by ``limit`` or the cap."""
        parsed = EventId.parse(since) if since is not None else None
        async with self._answer("history"):
            if since is not None and parsed is None:
                return Replay([], False, str(await self.position()))
            after = parsed.seq if parsed is not None else 0
            meta, streams = await self._read(name, after, parsed is not None, limit)
            if meta.epoch == "":  # nothing published since Redis lost its data
                meta = meta._replace(epoch=(await self.position()).epoch)
            position = str(EventId(meta.epoch, meta.seq))
            if parsed is not None and parsed.epoch != meta.epoch:
                # that epoch's history is gone: every event retained now came after
                meta, streams = await self._read(name, 0, False, limit)
                return merge_replay(streams, False, position, limit, self._cap, resuming=True)
            if parsed is not None and parsed.seq > meta.seq:
                return Replay([], False, position)  # an id Redis never gave out
            return merge_replay(streams, True, position, limit, self._cap,
                                resuming=parsed is not None)

    async def _read(self, name: str, after: int, check: bool, limit: int | None,
                    ) -> tuple[_Meta, list[list[Event]] | None]:
        """The meta and each matching topic's retained events after seq ``after``, or
        None for the events when ``check`` finds some of them were dropped."""
        if not is_pattern(name):
            return await self._read_topic(name, after, check)
        return await self._read_pattern(name, after, check, limit)

    async def _read_topic(self, topic: str, after: int, check: bool,
                          ) -> tuple[_Meta, list[list[Event]] | None]:
        transaction = self._client.pipeline(transaction=True)
        _read_meta(transaction)
        transaction.xrange(stream_key(topic), min=f"{after + 1}-0", max="+",
                           count=self._cap + 1)
        transaction.zscore(TOPICS_BY_SEQ, topic)
        transaction.zscore(TOPICS_GONE, topic)
        raw_meta, now, entries, last, tombstone = await transaction.execute()
        meta = _meta(raw_meta, now)
        last_seq = int(next((seq for seq in (last, tombstone) if seq is not None),
                            meta.forgotten))
        events = self._after(entries, meta, check, after, last_seq)
        return meta, None if events is None else [events]

    async def _read_pattern(self, pattern: str, after: int, check: bool, limit: int | None,
                            ) -> tuple[_Meta, list[list[Event]] | None]:
        transaction = self._client.pipeline(transaction=True)
        _read_meta(transaction)
        transaction.zrangebyscore(TOPICS_BY_SEQ, after + 1, "+inf", withscores=True)
        transaction.zrangebyscore(TOPICS_GONE, after + 1, "+inf")
        raw_meta, now, rows, gone = await transaction.execute()
        meta = _meta(raw_meta, now)
        if check and (meta.forgotten > after or any(
                matches(pattern, _text(topic)) for topic in gone)):
            return meta, None
        topics = [(topic, int(seq)) for topic, seq in ((_text(t), s) for t, s in rows)
                  if matches(pattern, topic)]
        keep = self._cap + 1 if limit is None else limit
        streams: list[list[Event]] = []
        for at in range(0, len(topics), READ_CHUNK):
            chunk = topics[at:at + READ_CHUNK]
            reads = self._client.pipeline(transaction=False)
            for topic, _ in chunk:
                reads.xrange(stream_key(topic), min=f"{after + 1}-0", max="+", count=keep)
            for (_, last_seq), entries in zip(chunk, await reads.execute(), strict=True):
                events = self._after(entries, meta, check, after, last_seq)
                if events is None:
                    return meta, None
                streams.append(events)
            if sum(map(len, streams)) > keep:  # only the oldest ``keep`` can be returned
                streams = [oldest(streams, keep)]
        return meta, streams

    def _after(self, entries: list[tuple[bytes, dict[bytes, bytes]]], meta: _Meta,
               check: bool, after: int, last_seq: int) -> list[Event] | None:
        """The retained events of one topic after ``after``; None if ``check`` finds
        that some of them were dropped."""
        deadline = meta.now_ms - _ms(self.options.retention.ttl)
        kept = [entry for entry in _entries(entries)
                if not self.options.retention.ttl or entry.event.ts >= deadline]
        if check:
            dropped_upto = kept[0].prev if kept else last_seq
            if dropped_upto > after:
                return None
        return [entry.event for entry in kept]

    @property
    def _cap(self) -> int:
        return self.options.retention.max_replay

    async def position(self) -> EventId:
        """See ``Broker.position``. Calls made while a read is under way share the
        next read, so a storm of subscribes costs a few round trips, not one each."""
        if self._closed:
            raise BrokerUnavailable("the broker is closed")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[EventId] = loop.create_future()
        self._position_waiters.append(waiter)
        if self._position_reader is None:
            self._position_reader = loop.create_task(self._read_positions())
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), self.options.timeout)
        except TimeoutError:
            raise BrokerUnavailable("the broker did not answer (position)") from None

    async def _read_positions(self) -> None:
        try:
            while self._position_waiters:
                waiters, self._position_waiters = self._position_waiters, []
                try:
                    async with asyncio.timeout(self.options.timeout):
                        epoch, seq = await self._position_script(keys=_SCRIPT_KEYS,
                                                                 args=[new_epoch()])
                except _FAILURES as exc:
                    self._failed(f"position: {_describe(exc)}")
                    _settle(waiters, BrokerUnavailable("the broker did not answer (position)"))
                    continue
                _settle(waiters, EventId(_text(epoch), int(seq)))
        finally:
            self._position_reader = None
            _settle(self._position_waiters, BrokerUnavailable())
            self._position_waiters = []

    async def last_ids(self, topics: Sequence[str]) -> dict[str, str]:
        if not topics:
            return {}
        async with self._answer("last ids"):
            transaction = self._client.pipeline(transaction=True)
            _read_meta(transaction)
            transaction.zmscore(TOPICS_BY_SEQ, list(topics))
            transaction.zmscore(TOPICS_BY_TS, list(topics))
            raw_meta, now, seqs, stamps = await transaction.execute()
        meta = _meta(raw_meta, now)
        deadline = meta.now_ms - _ms(self.options.retention.ttl)
        return {topic: str(EventId(meta.epoch, int(seq)))
                for topic, seq, ts in zip(topics, seqs, stamps, strict=True)
                if seq is not None and ts is not None
                and (not self.options.retention.ttl or ts >= deadline)}

    async def retained_topics(self) -> list[str]:
        ttl = _ms(self.options.retention.ttl)
        async with self._answer("retained topics"):
            seconds, micros = await self._client.time()
            deadline = seconds * 1000 + micros // 1000 - ttl if ttl else "-inf"
            topics = await self._client.zrangebyscore(TOPICS_BY_TS, deadline, "+inf")
        return [_text(topic) for topic in topics]

    def _failed(self, what: str, level: int = logging.WARNING) -> None:
        """Log a failed call, at most one line per ``LOG_EVERY`` seconds (an outage
        fails every call that clients keep making)."""
        if self._failures.ready():
            held = self._failures.take_held()
            log.log(level, "redis at %s failed (%s)%s", self._where, what,
                    f"; {held} more failures since the last report" if held else "")

    @contextlib.asynccontextmanager
    async def _answer(self, what: str) -> AsyncIterator[None]:
        """Bound a read by ``options.timeout``; Redis failures become ``BrokerUnavailable``."""
        if self._closed:
            raise BrokerUnavailable("the broker is closed")
        try:
            async with asyncio.timeout(self.options.timeout):
                yield
        except _FAILURES as exc:
            self._failed(f"{what}: {_describe(exc)}")
            raise BrokerUnavailable(f"the broker did not answer ({what})") from None

    # -- subscriptions and counts -----------------------------------------------------------

    async def subscribe(self, name: str) -> None:
        """Subscribe in Redis; returns once Redis confirmed (or the node is offline)."""
        await self._listener.subscribe(name)

    async def unsubscribe(self, name: str) -> None:
        await self._listener.unsubscribe(name)

    async def subscriber_counts(self, topics: Sequence[str]) -> dict[str, int]:
        """This node's counts plus every other live node's, as last written to Redis."""
        totals = dict(self.local_counts(topics))
        async with self._answer("subscriber counts"):
            members = [_text(member) for member in await self._client.smembers(NODES)]
            others = [member for member in members if member != self.node_id]
            reads = self._client.pipeline(transaction=False)
            for member in others:
                reads.hgetall(node_key(member))
            written = await reads.execute() if others else []
        gone = [member for member, counts in zip(others, written, strict=True) if not counts]
        for counts in written:
            _add_counts(totals, topics, {key.decode(): int(value)
                                         for key, value in counts.items()})
        if gone:  # nodes that stopped reporting: forget them
            with contextlib.suppress(*_FAILURES):
                async with asyncio.timeout(self.options.timeout):
                    await self._client.srem(NODES, *gone)
        return totals

    async def _report_counts(self) -> None:
        """Write this node's subscriber counts to Redis, forever (run it supervised)."""
        while True:
            await asyncio.sleep(COUNTS_INTERVAL)
            try:
                async with asyncio.timeout(self.options.timeout):
                    await self._write_counts()
            except _FAILURES as exc:
                log.debug("writing subscriber counts to redis failed: %s", _describe(exc))

    async def _write_counts(self) -> None:
        counts = {name: count
                  for name, count in self.local_counts(self._listener.names()).items() if count}
        key = node_key(self.node_id)
        transaction = self._client.pipeline(transaction=True)
        transaction.delete(key)
        if counts:
            transaction.hset(key, mapping=counts)  # type: ignore[arg-type]
            transaction.pexpire(key, _ms(COUNTS_TTL))
            transaction.sadd(NODES, self.node_id)
        await transaction.execute()


def _add_counts(totals: dict[str, int], topics: Iterable[str], counts: Mapping[str, int]) -> None:
    """Add one other node's counts: its subscribers of each topic, and its named topics.

    A topic the node named carries its own count (the node counted its pattern
    subscribers in already); any other topic gets the sum of the node's patterns that
    match it, found through a router of those patterns (no topics x patterns scan).
    """
    patterns: Router[str] = Router()
    for name in counts:
        if is_pattern(name):
            patterns.add(name, name)
    for topic in {*topics, *(name for name in counts if not is_pattern(name))}:
        if topic in counts:
            found = counts[topic]
        else:
            found = sum(counts[name] for name in patterns.match(topic))
        if found:
            totals[topic] = totals.get(topic, 0) + found


def _read_meta(transaction: Any) -> None:
    transaction.hmget(META, ["epoch", "seq", "forgotten"])
    transaction.time()


def _meta(raw: list[bytes | None], now: tuple[int, int]) -> _Meta:
    epoch, seq, forgotten = raw
    return _Meta(epoch.decode() if epoch else "", int(seq or 0), int(forgotten or 0),
                 now[0] * 1000 + now[1] // 1000)


def _settle(waiters: list[asyncio.Future[EventId]], outcome: EventId | Exception) -> None:
    for waiter in waiters:
        if waiter.done():
            continue
        if isinstance(outcome, Exception):
            waiter.set_exception(outcome)
        else:
            waiter.set_result(outcome)


def _entries(raw: list[tuple[bytes, dict[bytes, bytes]]]) -> list[StreamEntry]:
    entries = []
    for _, fields in raw:
        entry = decode_entry(fields)
        if entry is not None:
            entries.append(entry)
    return entries


def _published(topic: str, outcome: list[Any]) -> Published:
    fresh, text = outcome
    event_id, _, ts = (text.decode() if isinstance(text, bytes) else str(text)).partition(" ")
    return Published(topic, event_id, int(ts), duplicate=not fresh)


def _data(index: int, data: Any) -> bytes:
    try:
        return encode_data(data)
    except ValueError as exc:
        raise SquallError("invalid_body",
                          f"events[{index}]: data cannot be published: {exc}") from None


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000)) if seconds > 0 else 0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
