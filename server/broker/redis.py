"""The Redis broker: every node shares topics, ids and history through one Redis.

- Ids: ``<epoch>-<seq>``. ``seq`` is one counter in Redis, taken inside the publish
  script, so ids increase in publish order within a topic and across all topics and
  nodes (the whole Redis is one id space, redis_keys.Space). The epoch is a random
  word kept in Redis and made anew when Redis has none (first use, or Redis lost its
  data): a resume from an id of a lost epoch is answered ``recovered: false`` with
  every event retained in the new one, never misread.
- Publishing: one Lua script per batch checks each idempotency key, appends the
  event to its topic's stream and PUBLISHes it; Redis runs the script as one step
  that no other command interleaves with. Concurrent publishes share script calls
  (redis_publish.Batches). ``publish`` returns when Redis ran it, and raises
  ``BrokerUnavailable`` once ``options.timeout`` has passed without an answer: the
  batch may or may not have run, and a retry with the same idempotency key is
  answered with the first id, because the key is checked in the same script. With
  ``options.wait_replicas`` N above 0, a publish also waits for N replicas to
  acknowledge it (``WAIT``) and is unavailable when fewer did in time.
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

The cluster broker (redis_cluster.py) is this broker with one id space per hash tag:
it overrides the hooks in the "id spaces" section and the client it talks through.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Coroutine, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import msgpack
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    ResponseError,
    TryAgainError,
)

from server.broker.base import (
    Broker,
    BrokerOptions,
    Disconnect,
    EventHandler,
    PresenceChange,
    PresenceList,
    PresenceNotice,
    Publishable,
    Published,
)
from server.broker.memory import new_epoch
from server.broker.redis_keys import (
    FAILURES,
    PREFIX,
    SINGLE_SPACE,
    Space,
    StreamEntry,
    as_text,
    channel,
    closed_as_lost,
    decode_entry,
    describe,
    disconnect_idle,
    encode_data,
    encode_head,
    glob,
    milliseconds,
    node_key,
    run,
)
from server.broker.redis_listener import Listener, Shards, Target
from server.broker.redis_lua import (
    COUNTS,
    FORGET,
    POSITION,
    PUBLISH,
    READ_LAST,
    READ_TOPIC,
    READ_TOPICS,
    RETAINED,
)
from server.broker.redis_presence import SINGLE_WIRE, RedisPresence
from server.broker.redis_publish import Batches
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
# RedisClusterException (no master known for a slot, no node answers) is no RedisError


_PASSING = (ClusterDownError, TryAgainError)  # what a cluster answers while it fails over
# Events in one call of the publish script at most, when publishes are grouped.
MAX_SCRIPT_EVENTS = 1000
READ_CHUNK = 100  # streams read per round trip by a pattern's history
LOG_EVERY = 10.0  # seconds between log lines about failing calls
LAST_CHUNK = 500  # topics per script call of last_ids
# Where a name whose events span id spaces stands: ``since`` it is never recovered.
SPANNING = EventId("spanning", 0)


class _Meta(NamedTuple):
    epoch: str  # "" while the space has none
    seq: int
    forgotten: int
    now_ms: int


class SingleShards:
    """The listener's view of a single Redis: one shard, one id space, channels for
    topics and globs for patterns."""

    fixed_spaces: tuple[str, ...] = ("",)
    refresh_every: float = 3600.0
    masters: tuple[str, ...] = ("",)
    covered = True
    control, notices = SINGLE_WIRE.targets()

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    def targets(self, name: str) -> list[Target]:
        return [(glob(name), "pattern")] if is_pattern(name) else [(channel(name), "channel")]

    def space(self, name: str) -> str | None:
        return ""

    def space_of(self, topic: str) -> str:
        return ""

    def shard(self, target: bytes) -> str | None:
        return ""

    def shard_of_space(self, space: str) -> str | None:
        return ""

    def pool(self, shard: str) -> ConnectionPool:
        return self._pool

    async def refresh(self) -> None:
        pass


class RedisBroker(Broker):
    """A broker shared by every node that points at the same Redis (see the module)."""

    clocked = False  # seqs from a counter (see redis_lua.py)
    sharded = False  # channels published with PUBLISH, subscribed with (P)SUBSCRIBE
    idle_ms = 0  # topics are forgotten past max_topics only, never for being idle
    nodes_prefix = PREFIX  # where nodes write their subscriber counts
    presence_wire = SINGLE_WIRE  # where presence lives (redis_presence.py)

    def __init__(self, url: str, options: BrokerOptions) -> None:
        super().__init__(options)
        self.node_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._client, shards = self._connect(url)
        self._where = url.rsplit("@", maxsplit=1)[-1]
        self._publish_script = self._client.register_script(PUBLISH)
        self._presence = RedisPresence(self._client, self.node_id, options.presence,
                                       options.timeout, self, self.presence_wire,
                                       self._answer, self._failed)
        self._listener = Listener(shards, self, self._deliver, self._gap, options.timeout,
                                  on_presence=self._heard_presence,
                                  on_control=self._presence.control, on_lost=self._lost)
        self._batches = Batches(self._send, self.options.timeout, MAX_SCRIPT_EVENTS)
        self._position_waiters: dict[str, list[asyncio.Future[EventId]]] = {}
        self._position_readers: dict[str, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._chores: set[asyncio.Task[None]] = set()  # see _chore
        self._failed_at: float | None = None  # a publish failed: not ready until Redis answers
        self._failures = Throttle(LOG_EVERY)
        self._closed = False
        self._nodes = self.nodes_prefix + "nodes"

    def _connect(self, url: str) -> tuple[Any, Shards]:
        """The command client, and the shards the listener reads from."""
        connection = {"socket_connect_timeout": self.options.timeout,
                      "socket_timeout": self.options.timeout, "retry": Retry(NoBackoff(), 0)}
        self._pool = BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=None, **connection)
        # pub/sub reads wait as long as the listener says, not the socket's timeout
        self._listen_pool = ConnectionPool.from_url(url, max_connections=4,
                                                    **{**connection, "socket_timeout": None})
        return Redis(connection_pool=self._pool), SingleShards(self._listen_pool)

    # -- id spaces: what the cluster broker overrides ---------------------------------

    def _space(self, name: str) -> Space | None:
        """The id space of a topic or pattern; None when its events span several."""
        return SINGLE_SPACE

    def _space_of(self, topic: str) -> Space:
        return SINGLE_SPACE

    def _space_named(self, name: str) -> Space:
        return SINGLE_SPACE

    def _channels(self, space: Space, topic: str) -> list[bytes]:
        """The channels a topic's events go out on."""
        return [space.channel(topic)]

    async def _listed_spaces(self) -> list[Space]:
        """Every space that may hold retained history."""
        return [SINGLE_SPACE]

    def _new_epoch(self, space: Space) -> str:
        """The epoch a space starts when it has none (it lost its data, or is new)."""
        return new_epoch()

    def _sibling(self, epoch: str, space: Space, current: str) -> bool:
        """Whether ``epoch`` is that of another space that shares ``space``'s clock, so
        that its seqs may be compared with the space's own (see redis_cluster.py)."""
        return False

    async def _run_publish(self, space: Space, keys: list[Any], args: list[Any]) -> Any:
        """One call of the publish script; with ``wait_replicas``, and its WAIT on the
        same connection."""
        if not self.options.wait_replicas:
            return await self._publish_script(keys=keys, args=args)
        for _ in range(2):
            pipe = self._client.pipeline(transaction=False)
            pipe.evalsha(self._publish_script.sha, len(keys), *keys, *args)
            pipe.execute_command("WAIT", self.options.wait_replicas,
                                 self.wait_ms)
            outcome, acked = await run(pipe, raise_on_error=False)
            if not isinstance(outcome, NoScriptError):
                return self._confirmed(outcome, acked)
            await self._client.script_load(PUBLISH)
        raise NoScriptError("the publish script could not be loaded")

    @property
    def wait_ms(self) -> int:
        """How long a WAIT may take: within the publish's timeout, with room for the
        script before it and the answer after, so that too few replicas are told as
        such (a 503 saying so) rather than by the timeout."""
        return milliseconds(self.options.timeout * 0.8)

    def _confirmed(self, outcome: Any, acked: Any) -> Any:
        """The script's outcome, once enough replicas acknowledged it."""
        for answer in (outcome, acked):
            if isinstance(answer, BaseException):
                raise answer
        if int(acked) < self.options.wait_replicas:
            raise TimeoutError(f"{acked} of {self.options.wait_replicas} replicas "
                               "acknowledged the publish in time")
        return outcome

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
        for task in [*self._tasks, *self._chores]:
            await stop(task)
        await self._batches.close()
        await self._presence.close()
        with contextlib.suppress(*FAILURES):
            async with asyncio.timeout(min(self.options.timeout, 1.0)):
                await self._client.delete(node_key(self.node_id, self.nodes_prefix))
                await self._client.srem(self._nodes, self.node_id)
        for step in (self._client.aclose, self._disconnect):
            with contextlib.suppress(*FAILURES):  # bounded: a peer may have stopped reading
                async with asyncio.timeout(self.options.timeout):
                    await step()

    async def _disconnect(self) -> None:
        await self._pool.disconnect()
        await self._listen_pool.disconnect()

    def _lost(self, shard: str) -> None:
        """The listener lost its connection to ``shard``: the idle command connections to
        it are most likely dead too, and redis-py takes a reset one for a live one until
        a command fails on it (a needless 503 after Redis is back). Drop them."""
        self._chore(self._drop_idle(shard))

    async def _drop_idle(self, shard: str) -> None:
        await disconnect_idle(self._pool)

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

    async def replace_presence(self, entries: Mapping[str, Sequence[tuple[str, bytes]]],
                               ) -> None:
        if self._closed:
            raise BrokerUnavailable("the broker is closed")
        await self._presence.replace(entries)

    async def presence(self, name: str, limit: int) -> PresenceList:
        if self._closed:
            raise BrokerUnavailable("the broker is closed")
        return await self._presence.listing(name, limit)

    async def disconnect(self, request: Disconnect) -> None:
        if self._closed:
            raise BrokerUnavailable("the broker is closed")
        await self._presence.disconnect(request)

    # -- publishing ----------------------------------------------------------------------

    async def publish(self, requests: Sequence[Publishable]) -> list[Published]:
        """Publish through the script; concurrent publishes share script calls, one
        call at a time per id space (redis_publish.Batches)."""
        if self._closed:
            raise BrokerUnavailable("the broker is closed")
        if not requests:
            return []
        parts: dict[str, tuple[Space, list[int], list[Any]]] = {}
        heads: dict[str, tuple[Space, bytes]] = {}  # a batch is mostly a few topics
        for index, request in enumerate(requests):
            topic = request.topic
            found = heads.get(topic)
            if found is None:
                found = heads[topic] = (self._space_of(topic), encode_head(topic))
            space, head = found
            part = parts.setdefault(space.name, (space, [], []))
            part[1].append(index)
            part[2].append((topic, head, _data(index, request.data),
                            request.idempotency_key or ""))
        answers = await self._batches.publish([(space, events)
                                               for space, _, events in parts.values()])
        outcomes: list[Any] = [None] * len(requests)
        for (_, indexes, _), answer in zip(parts.values(), answers, strict=True):
            for index, outcome in zip(indexes, answer, strict=True):
                outcomes[index] = outcome
        return [_published(request.topic, outcome)
                for request, outcome in zip(requests, outcomes, strict=True)]

    async def _send(self, space: Space, events: list[Any]) -> list[Any]:
        """One script call for a group of events of one space; ``BrokerUnavailable``
        when it failed or took longer than the timeout."""
        keys, args = self._script_input(space, events)
        try:
            async with asyncio.timeout(self.options.timeout):
                with closed_as_lost():
                    outcomes, forgotten = await self._run_publish(space, keys, args)
        except FAILURES as exc:
            self._failed_at = asyncio.get_running_loop().time()
            unexpected = isinstance(exc, ResponseError) and not isinstance(exc, _PASSING)
            self._failed(f"publish: {describe(exc)}",
                         logging.ERROR if unexpected else logging.WARNING)
            raise BrokerUnavailable() from None
        self._failed_at = None
        if forgotten:  # after the answer: the publish is done, the streams expire anyway
            self._chore(self._forget(space, [as_text(topic) for topic in forgotten]))
        return as_text(outcomes).split("\n")

    def _chore(self, work: Coroutine[Any, Any, None]) -> None:
        """Run housekeeping that no answer waits for (it bounds and logs its failures)."""
        task = asyncio.get_running_loop().create_task(work)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    def _script_input(self, space: Space, events: list[Any]) -> tuple[list[Any], list[Any]]:
        """KEYS (every key the call touches) and ARGV of the publish script."""
        keys: list[Any] = space.indexes
        at: dict[Any, int] = {}

        def index(key: Any) -> int:
            found = at.get(key)
            if found is None:
                keys.append(key)
                found = at[key] = len(keys)
            return found

        topics: dict[str, tuple[int, list[int]]] = {}  # topic -> its stream's and channels'

        def of_topic(topic: str) -> tuple[int, list[int]]:
            found = topics.get(topic)
            if found is None:
                found = topics[topic] = (index(space.stream(topic)), [
                    index(channel) for channel in self._channels(space, topic)])
            return found

        keyed = self.options.dedupe_max_keys > 0 and self.options.dedupe_window > 0
        rows = [[topic, head, data, stream,
                 index(space.idempotency(topic, key)) if key and keyed else 0, channels]
                for topic, head, data, key in events
                for stream, channels in (of_topic(topic),)]
        retention, options = self.options.retention, self.options
        args = [self._new_epoch(space), retention.size, milliseconds(retention.ttl),
                retention.max_topics,
                milliseconds(options.dedupe_window) if keyed else 0, int(self.clocked),
                int(self.sharded), self.idle_ms, int(options.wait_replicas > 0),
                # Redis's Lua msgpack reads strings, not the bin type: bytes go as strings
                msgpack.packb(rows, use_bin_type=False)]
        return keys, args

    async def _forget(self, space: Space, topics: list[str]) -> None:
        """Delete the streams of topics the publish script forgot (past max topics)."""
        try:
            async with asyncio.timeout(self.options.timeout):
                await self._client.eval(FORGET, len(topics) + 1, space.gone,
                                        *map(space.stream, topics), *topics)
        except FAILURES as exc:  # they expire with the history ttl
            self._failed(f"deleting the history of forgotten topics: {describe(exc)}")

    # -- history ---------------------------------------------------------------------------

    async def history(self, name: str, since: str | None, limit: int | None = None) -> Replay:
        """See ``Broker.history``. Reads are bounded: each stream by the replay cap, a
        pattern's streams in chunks, and the events kept by ``limit`` or the cap."""
        parsed = EventId.parse(since) if since is not None else None
        space = self._space(name)
        async with self._answer("history"):
            if space is None:
                return await self._history_across(name, since, limit)
            if since is not None and parsed is None:
                return Replay([], False, str(await self._position_of(space)))
            after = parsed.seq if parsed is not None else 0
            meta, streams = await self._read(space, name, after, parsed is not None, limit)
            if meta.epoch == "":  # nothing published since the space lost its data
                meta = meta._replace(epoch=(await self._position_of(space)).epoch)
            position = str(EventId(meta.epoch, meta.seq))
            sibling = parsed is not None and self._sibling(parsed.epoch, space, meta.epoch)
            if parsed is not None and parsed.epoch != meta.epoch and not sibling:
                # that epoch's history is gone: every event retained now came after
                meta, streams = await self._read(space, name, 0, False, limit)
                return merge_replay(streams, False, position, limit, self._cap, resuming=True)
            # an id Redis never gave out (or lost with a failover), in this space's terms
            newest = 1000 * meta.now_ms + 999 if sibling else meta.seq
            if parsed is not None and parsed.seq > newest:
                return Replay([], False, position)
            return merge_replay(streams, True, position, limit, self._cap,
                                resuming=parsed is not None)

    async def _history_across(self, pattern: str, since: str | None, limit: int | None,
                              ) -> Replay:
        """A pattern whose topics lie in several id spaces: no id says where such a
        subscription stood, so a ``since`` is never recovered; without one, the
        retained events of every space, merged."""
        position = str(SPANNING)
        if since is not None:
            return Replay([], False, position)
        keep = self._cap + 1 if limit is None else limit
        spaces = await self._listed_spaces()
        reads = self._client.pipeline(transaction=False)
        for space in spaces:
            reads.eval(READ_TOPICS, 3, space.meta, space.by_seq, space.gone, 1)
        wanted = [(space, _meta(raw_meta, now), as_text(topic)) for space, (raw_meta, now, rows, _)
                  in zip(spaces, await run(reads), strict=True)
                  for topic in rows[::2] if matches(pattern, as_text(topic))]
        streams: list[list[Event]] = []
        for at in range(0, len(wanted), READ_CHUNK):
            chunk = wanted[at:at + READ_CHUNK]
            reads = self._client.pipeline(transaction=False)
            for space, _, topic in chunk:
                reads.xrange(space.stream(topic), min="-", max="+", count=keep)
            for (_, meta, _), entries in zip(chunk, await run(reads), strict=True):
                streams.append(self._after(_entries(entries), meta, False, 0, 0) or [])
            if sum(map(len, streams)) > keep:
                streams = [oldest(streams, keep)]
        return merge_replay(streams, True, position, limit, self._cap, resuming=False)

    async def _read(self, space: Space, name: str, after: int, check: bool,
                    limit: int | None) -> tuple[_Meta, list[list[Event]] | None]:
        """The meta and each matching topic's retained events after seq ``after``, or
        None for the events when ``check`` finds some of them were dropped."""
        if not is_pattern(name):
            return await self._read_topic(space, name, after, check)
        return await self._read_pattern(space, name, after, check, limit)

    async def _read_topic(self, space: Space, topic: str, after: int, check: bool,
                          ) -> tuple[_Meta, list[list[Event]] | None]:
        raw_meta, now, entries, last, tombstone = await self._client.eval(
            READ_TOPIC, 4, space.meta, space.by_seq, space.gone, space.stream(topic),
            topic, f"{after + 1}-0", self._cap + 1)
        meta = _meta(raw_meta, now)
        last_seq = int(float(next((seq for seq in (last, tombstone) if seq is not None),
                                  meta.forgotten)))
        events = self._after(_script_entries(entries), meta, check, after, last_seq)
        return meta, None if events is None else [events]

    async def _read_pattern(self, space: Space, pattern: str, after: int, check: bool,
                            limit: int | None) -> tuple[_Meta, list[list[Event]] | None]:
        raw_meta, now, rows, gone = await self._client.eval(
            READ_TOPICS, 3, space.meta, space.by_seq, space.gone, after + 1)
        meta = _meta(raw_meta, now)
        if check and (meta.forgotten > after or any(
                matches(pattern, as_text(topic)) for topic in gone)):
            return meta, None
        pairs = zip(rows[::2], rows[1::2], strict=True)
        topics = [(topic, int(float(seq))) for topic, seq in ((as_text(t), s) for t, s in pairs)
                  if matches(pattern, topic)]
        keep = self._cap + 1 if limit is None else limit
        streams: list[list[Event]] = []
        for at in range(0, len(topics), READ_CHUNK):
            chunk = topics[at:at + READ_CHUNK]
            reads = self._client.pipeline(transaction=False)
            for topic, _ in chunk:
                reads.xrange(space.stream(topic), min=f"{after + 1}-0", max="+", count=keep)
            for (_, last_seq), entries in zip(chunk, await run(reads), strict=True):
                events = self._after(_entries(entries), meta, check, after, last_seq)
                if events is None:
                    return meta, None
                streams.append(events)
            if sum(map(len, streams)) > keep:  # only the oldest ``keep`` can be returned
                streams = [oldest(streams, keep)]
        return meta, streams

    def _after(self, entries: list[StreamEntry], meta: _Meta, check: bool, after: int,
               last_seq: int) -> list[Event] | None:
        """The retained events of one topic after ``after``; None if ``check`` finds
        that some of them were dropped."""
        deadline = meta.now_ms - milliseconds(self.options.retention.ttl)
        kept = [entry for entry in entries
                if not self.options.retention.ttl or entry.event.ts >= deadline]
        if check:
            dropped_upto = kept[0].prev if kept else last_seq
            if dropped_upto > after:
                return None
        return [entry.event for entry in kept]

    @property
    def _cap(self) -> int:
        return self.options.retention.max_replay

    # -- positions -------------------------------------------------------------------------

    async def position(self, name: str) -> EventId:
        """See ``Broker.position``: the newest id of ``name``'s space. Calls made while a
        read of that space is under way share the next read, so a storm of subscribes
        costs a few round trips, not one each."""
        if self._closed:
            raise BrokerUnavailable("the broker is closed")
        space = self._space(name)
        if space is None:
            return SPANNING
        return await self._position_of(space)

    async def _position_of(self, space: Space) -> EventId:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[EventId] = loop.create_future()
        self._position_waiters.setdefault(space.name, []).append(waiter)
        if space.name not in self._position_readers:
            self._position_readers[space.name] = loop.create_task(self._read_position(space))
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), self.options.timeout)
        except TimeoutError:
            raise BrokerUnavailable("the broker did not answer (position)") from None

    async def _read_position(self, space: Space) -> None:
        try:
            while self._position_waiters.get(space.name):
                waiters = self._position_waiters.pop(space.name)
                try:
                    async with asyncio.timeout(self.options.timeout):
                        found = (await self._read_positions([space]))[space.name]
                except FAILURES as exc:
                    self._failed(f"position: {describe(exc)}")
                    _settle(waiters, BrokerUnavailable("the broker did not answer (position)"))
                    continue
                _settle(waiters, found)
        finally:
            del self._position_readers[space.name]
            _settle(self._position_waiters.pop(space.name, []), BrokerUnavailable())

    async def positions(self, spaces: Sequence[str]) -> dict[str, EventId]:
        """The newest id of each named space, in one round trip per shard (for the
        listener, which reads them before it subscribes); ``BrokerUnavailable``."""
        async with self._answer("position"):
            return await self._read_positions([self._space_named(name) for name in spaces])

    async def _read_positions(self, spaces: Sequence[Space]) -> dict[str, EventId]:
        reads = self._client.pipeline(transaction=False)
        for space in spaces:
            reads.eval(POSITION, 4, *space.indexes, self._new_epoch(space))
        found = await run(reads)
        return {space.name: EventId(as_text(epoch), int(seq))
                for space, (epoch, seq) in zip(spaces, found, strict=True)}

    # -- listings --------------------------------------------------------------------------

    async def last_ids(self, topics: Sequence[str]) -> dict[str, str]:
        by_space: dict[str, tuple[Space, list[str]]] = {}
        for topic in topics:
            space = self._space_of(topic)
            by_space.setdefault(space.name, (space, []))[1].append(topic)
        chunks = [(space, names[at:at + LAST_CHUNK]) for space, names in by_space.values()
                  for at in range(0, len(names), LAST_CHUNK)]
        if not chunks:
            return {}
        async with self._answer("last ids"):
            reads = self._client.pipeline(transaction=False)
            for space, names in chunks:
                reads.eval(READ_LAST, 3, space.meta, space.by_seq, space.by_ts, *names)
            found = await run(reads)
        ttl = milliseconds(self.options.retention.ttl)
        last: dict[str, str] = {}
        for (_, names), (raw_meta, now, seqs, stamps) in zip(chunks, found, strict=True):
            meta = _meta(raw_meta, now)
            for topic, seq, ts in zip(names, seqs, stamps, strict=True):
                if seq is not None and ts is not None and (
                        not ttl or float(ts) >= meta.now_ms - ttl):
                    last[topic] = str(EventId(meta.epoch, int(float(seq))))
        return last

    async def retained_topics(self) -> list[str]:
        ttl = milliseconds(self.options.retention.ttl)
        async with self._answer("retained topics"):
            reads = self._client.pipeline(transaction=False)
            for space in await self._listed_spaces():
                reads.eval(RETAINED, 1, space.by_ts, ttl)
            found = await run(reads)
        return [as_text(topic) for topics in found for topic in topics]

    @contextlib.asynccontextmanager
    async def _answer(self, what: str) -> AsyncIterator[None]:
        """Bound a read by ``options.timeout``; Redis failures become ``BrokerUnavailable``."""
        if self._closed:
            raise BrokerUnavailable("the broker is closed")
        try:
            async with asyncio.timeout(self.options.timeout):
                with closed_as_lost():
                    yield
        except FAILURES as exc:
            self._failed(f"{what}: {describe(exc)}")
            raise BrokerUnavailable(f"the broker did not answer ({what})") from None

    def _failed(self, what: str, level: int = logging.WARNING) -> None:
        """Log a failed call, at most one line per ``LOG_EVERY`` seconds (an outage
        fails every call that clients keep making)."""
        if self._failures.ready():
            held = self._failures.take_held()
            log.log(level, "redis at %s failed (%s)%s", self._where, what,
                    f"; {held} more failures since the last report" if held else "")

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
            members = [as_text(member) for member in await self._client.smembers(self._nodes)]
            others = [member for member in members if member != self.node_id]
            reads = self._client.pipeline(transaction=False)
            for member in others:
                reads.hgetall(node_key(member, self.nodes_prefix))
            written = await run(reads) if others else []
        gone = [member for member, counts in zip(others, written, strict=True) if not counts]
        for counts in written:
            _add_counts(totals, topics, {key.decode(): int(value)
                                         for key, value in counts.items()})
        if gone:  # nodes that stopped reporting: forget them
            with contextlib.suppress(*FAILURES):
                async with asyncio.timeout(self.options.timeout):
                    await self._client.srem(self._nodes, *gone)
        return totals

    async def _report_counts(self) -> None:
        """Write this node's subscriber counts to Redis, forever (run it supervised)."""
        while True:
            await asyncio.sleep(COUNTS_INTERVAL)
            try:
                async with asyncio.timeout(self.options.timeout):
                    await self._write_counts()
            except FAILURES as exc:
                log.debug("writing subscriber counts to redis failed: %s", describe(exc))

    async def _write_counts(self) -> None:
        counts = {name: count
                  for name, count in self.local_counts(self._listener.names()).items() if count}
        pairs = [part for name, count in counts.items() for part in (name, count)]
        await self._client.eval(COUNTS, 2, node_key(self.node_id, self.nodes_prefix),
                                self._nodes, self.node_id, milliseconds(COUNTS_TTL), *pairs)


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


def _meta(raw: list[bytes | None], now_ms: int) -> _Meta:
    epoch, seq, forgotten = raw
    return _Meta(epoch.decode() if epoch else "", int(seq or 0), int(forgotten or 0),
                 int(now_ms))


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


def _script_entries(raw: list[list[Any]]) -> list[StreamEntry]:
    """Stream entries as a script returns them: ``[id, [field, value, ...]]``."""
    return _entries([(entry_id, dict(zip(fields[::2], fields[1::2], strict=True)))
                     for entry_id, fields in raw])


def _published(topic: str, answer: str) -> Published:
    """One line of the publish script's answers: ``1<id> <ts>`` (new), ``0<id> <ts>``."""
    flagged_id, _, ts = answer.partition(" ")
    return tuple.__new__(Published, (topic, flagged_id[1:], int(ts), flagged_id[0] == "0"))


def _data(index: int, data: Any) -> bytes:
    try:
        return encode_data(data)
    except ValueError as exc:
        raise SquallError("invalid_body",
                          f"events[{index}]: data cannot be published: {exc}") from None
