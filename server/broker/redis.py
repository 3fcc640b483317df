"""The Redis broker: every node shares topics, ids and history through one Redis.

- Ids: ``<epoch>-<seq>``. ``seq`` is one counter in Redis, taken inside the publish
  script, so ids increase in publish order within a topic and across all topics and
  nodes. The epoch is a random word kept in Redis and made anew when Redis has none
  (first use, or Redis lost its data): ids from before are answered
  ``recovered: false``, never misread.
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
- While Redis is unreachable: connections stay, ``publish`` and ``history`` raise
  ``BrokerUnavailable`` within ``options.timeout``, ``ready`` is False, and the
  listener reconnects with capped backoff.
- Subscriber counts: every node writes its local counts to Redis every few seconds
  (a hash per node, expiring when the node stops writing); ``subscriber_counts``
  adds them up.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
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

from server.broker.base import Broker, BrokerOptions, EventHandler, Published, PublishRequest
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
from server.broker.redis_lua import PUBLISH
from server.errors import BrokerUnavailable, SquallError
from server.events import Event, EventId
from server.history import Replay
from server.tasks import stop, supervise
from server.topics import is_pattern, matches

log = logging.getLogger("squall.broker.redis")

MAX_CONNECTIONS = 64  # command connections per process; publishes beyond wait their turn
COUNTS_INTERVAL = 2.0  # seconds between writes of this node's subscriber counts
COUNTS_TTL = 3 * COUNTS_INTERVAL
_FAILURES = (RedisError, OSError, TimeoutError)
# Events in one call of the publish script at most, when publishes are grouped.
MAX_SCRIPT_EVENTS = 1000
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
        self._listener = Listener(self._listen_pool, self, self._deliver, self._gap,
                                  options.timeout)
        self._tasks: list[asyncio.Task[None]] = []
        self._failed_at: float | None = None  # a publish failed: not ready until Redis answers
        self._closed = False
        self._waiting: collections.deque[tuple[list[Any], asyncio.Future[list[Any]]]] = (
            collections.deque())
        self._publisher: asyncio.Task[None] | None = None
        self._where = url.rsplit("@", maxsplit=1)[-1]

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, on_event: EventHandler) -> None:
        """Start listening; waits up to ``options.timeout`` for Redis, then serves anyway."""
        await super().start(on_event)
        self._tasks = [supervise("redis-listener", self._listener.run),
                       supervise("redis-subscriber-counts", self._report_counts)]
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
        with contextlib.suppress(*_FAILURES):
            async with asyncio.timeout(min(self.options.timeout, 1.0)):
                await self._client.delete(node_key(self.node_id))
                await self._client.srem(NODES, self.node_id)
        await self._client.aclose()
        await self._pool.disconnect()
        await self._listen_pool.disconnect()

    @property
    def ready(self) -> bool:
        failed_at = self._failed_at
        heard = failed_at is None or self._listener.last_heard > failed_at
        return not self._closed and self._listener.ready and heard

    def _deliver(self, event: Event) -> None:
        self._on_event(event)

    def _gap(self, name: str) -> None:
        self.on_gap(name)

    # -- publishing ----------------------------------------------------------------------

    async def publish(self, requests: Sequence[PublishRequest]) -> list[Published]:
        """Publish through the script; concurrent publishes share one script call.

        While a call is under way, later publishes wait and then go together in the
        next one (in arrival order, at most ``MAX_SCRIPT_EVENTS`` events a call), so a
        busy node pays the client's round trip per group, not per request. A publish
        that comes when nothing is under way goes at once.
        """
        if self._closed:
            raise BrokerUnavailable("the broker is closed")
        if not requests:
            return []
        events = [[request.topic, encode_head(request.topic), _data(index, request.data),
                   request.idempotency_key or ""]
                  for index, request in enumerate(requests)]
        waiter: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._waiting.append((events, waiter))
        if self._publisher is None:
            self._publisher = asyncio.get_running_loop().create_task(self._publish_waiting())
        outcomes = await waiter
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
                level = logging.ERROR if isinstance(exc, ResponseError) else logging.WARNING
                log.log(level, "publish to redis at %s failed: %s", self._where, _describe(exc))
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
        parsed = EventId.parse(since) if since is not None else None
        if since is not None and parsed is None:
            return Replay([], False)
        after = parsed.seq if parsed is not None else 0
        async with self._answer("history"):
            if is_pattern(name):
                replay = await self._pattern_history(name, parsed, after)
            else:
                replay = await self._topic_history(name, parsed, after)
        return replay._replace(events=replay.events[:limit]) if limit is not None else replay

    async def _topic_history(self, topic: str, since: EventId | None, after: int) -> Replay:
        transaction = self._client.pipeline(transaction=True)
        _read_meta(transaction)
        transaction.xrange(stream_key(topic), min=f"{after + 1}-0", max="+")
        transaction.zscore(TOPICS_BY_SEQ, topic)
        transaction.zscore(TOPICS_GONE, topic)
        raw_meta, now, entries, last, tombstone = await transaction.execute()
        meta = _meta(raw_meta, now)
        if not _known(meta, since):
            return Replay([], False)
        last_seq = int(next((seq for seq in (last, tombstone) if seq is not None),
                            meta.forgotten))
        events = self._after(entries, meta, since, after, last_seq)
        return Replay(events or [], events is not None)

    async def _pattern_history(self, pattern: str, since: EventId | None, after: int) -> Replay:
        transaction = self._client.pipeline(transaction=True)
        _read_meta(transaction)
        transaction.zrangebyscore(TOPICS_BY_SEQ, after + 1, "+inf", withscores=True)
        transaction.zrangebyscore(TOPICS_GONE, after + 1, "+inf")
        raw_meta, now, rows, gone = await transaction.execute()
        meta = _meta(raw_meta, now)
        if not _known(meta, since):
            return Replay([], False)
        if since is not None and (meta.forgotten > after or any(
                matches(pattern, _text(topic)) for topic in gone)):
            return Replay([], False)
        topics = [(_text(topic), int(seq)) for topic, seq in rows]
        topics = [(topic, seq) for topic, seq in topics if matches(pattern, topic)]
        if not topics:
            return Replay([], True)
        reads = self._client.pipeline(transaction=True)
        for topic, _ in topics:
            reads.xrange(stream_key(topic), min=f"{after + 1}-0", max="+")
        streams = []
        for (_, last_seq), entries in zip(topics, await reads.execute(), strict=True):
            events = self._after(entries, meta, since, after, last_seq)
            if events is None:
                return Replay([], False)
            streams.append(events)
        return Replay(list(heapq.merge(*streams, key=lambda event: event.seq)), True)

    def _after(self, entries: list[tuple[bytes, dict[bytes, bytes]]], meta: _Meta,
               since: EventId | None, after: int, last_seq: int) -> list[Event] | None:
        """The retained events of one topic after ``after``; None if some were dropped."""
        deadline = meta.now_ms - _ms(self.options.retention.ttl)
        kept = [entry for entry in _entries(entries)
                if not self.options.retention.ttl or entry.event.ts >= deadline]
        if since is not None:
            dropped_upto = kept[0].prev if kept else last_seq
            if dropped_upto > after:
                return None
        return [entry.event for entry in kept]

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

    async def position(self) -> EventId | None:
        """The newest id Redis gave out, or None when Redis has no epoch (for the listener)."""
        async with self._answer("position"):
            epoch, seq = await self._client.hmget(META, ["epoch", "seq"])
        return EventId(_text(epoch), int(seq or 0)) if epoch else None

    @contextlib.asynccontextmanager
    async def _answer(self, what: str) -> AsyncIterator[None]:
        """Bound a read by ``options.timeout``; Redis failures become ``BrokerUnavailable``."""
        if self._closed:
            raise BrokerUnavailable("the broker is closed")
        try:
            async with asyncio.timeout(self.options.timeout):
                yield
        except _FAILURES as exc:
            log.warning("%s from redis at %s failed: %s", what, self._where, _describe(exc))
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
    """Add one other node's counts: its subscribers of each topic, and its named topics."""
    named = [name for name in counts if not is_pattern(name)]
    for topic in {*topics, *named}:
        if topic in counts:
            found = counts[topic]  # the node counted its pattern subscribers in already
        else:
            found = sum(count for name, count in counts.items()
                        if is_pattern(name) and matches(name, topic))
        if found:
            totals[topic] = totals.get(topic, 0) + found


def _read_meta(transaction: Any) -> None:
    transaction.hmget(META, ["epoch", "seq", "forgotten"])
    transaction.time()


def _meta(raw: list[bytes | None], now: tuple[int, int]) -> _Meta:
    epoch, seq, forgotten = raw
    return _Meta(epoch.decode() if epoch else "", int(seq or 0), int(forgotten or 0),
                 now[0] * 1000 + now[1] // 1000)


def _known(meta: _Meta, since: EventId | None) -> bool:
    """Whether ``since`` is an id of the current epoch that Redis gave out."""
    return since is None or (since.epoch == meta.epoch and since.seq <= meta.seq)


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
