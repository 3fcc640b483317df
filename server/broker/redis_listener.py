"""The Redis brokers' listener: one pub/sub connection per shard, never one per topic.

A single Redis is one shard; Redis Cluster has one per master. The ``Shards`` the
broker passes in say what to subscribe for each name (channels of a topic, globs or
channels for a pattern), which shard serves each of them now, and in which id space
each name's history lies. Names are subscribed only when local clients want them;
each received event is decoded once, checked against the names behind what it came
on with ``topics.matches`` (a glob or a shared channel is broader than its patterns)
and handed on.

Redis delivers the messages of one connection in publish order, and ids follow
publish order within an id space, so one watermark per space (the last seq handed
on) drops the second copy of an event that reaches the node through two
subscriptions, and says where the node stood when a connection broke. Every session
of a shard, the first included, reads the position of each space it serves before
it subscribes, subscribes, then reads each subscribed name's history after its
space's watermark and hands on what it missed, in order, before any live event:
nothing Redis accepted is lost to a subscription that stayed, and nothing is handed
on twice. A name whose history cannot fill the gap (trimmed, expired, or spread over
several spaces) is reported to ``on_gap``; when a space lost its data (a new epoch,
or a position behind the watermark), every name of it is, before any event of the
space is handed on again, so that subscribers learn of the loss first.

Besides events, two kinds of message come in: presence messages (joins and leaves,
redis_presence.py), on the channels of events on a single Redis, or on the one
``notices`` channel of a cluster, handed to ``on_presence`` once per node, through
the subscription of that very name (or, on the notices channel, when some local
client subscribes the name); and control messages on ``control``, which one session
subscribes whatever else it does, handed to ``on_control``. Neither is replayed
after a lost connection; presence messages that arrive while a session catches up
wait in its backlog with the events, after the events caught up from history (which
may include a few published after them; before, they overtook the whole gap). Control
messages need no order and are handed on at once.

Health: each connection is pinged whenever it has been quiet for ``HEALTH_INTERVAL``;
a pong overdue by ``UNREADY_AFTER`` makes the listener unready (``/readyz`` 503)
until Redis answers, and one overdue by the broker timeout counts as a lost
connection. Reconnects come every ``BACKOFF`` to ``MAX_BACKOFF`` seconds, doubling,
reset after a session that got ready, and are logged at most every ``LOG_EVERY``; the
first lost connection after a healthy session is told to ``on_lost`` (the broker drops
its idle command connections to that shard, which died with it). A
lost connection, or a shard that tells the node it no longer serves a channel (a
slot moved), makes the listener read the shards' map again (``Shards.refresh``, at
most every ``MAP_EVERY``) and move the subscriptions to where they are served now,
each moved name caught up from its watermark.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from redis.asyncio import ConnectionPool
from redis.asyncio.client import PubSub

from server.broker.base import PresenceHandler
from server.broker.redis_keys import FAILURES, closed_as_lost, decode_event, describe
from server.broker.redis_presence import MARK, decode_presence
from server.errors import BrokerUnavailable
from server.events import Event, EventId
from server.history import Replay
from server.logs import Throttle
from server.tasks import stop
from server.topics import matches

log = logging.getLogger("squall.broker.redis")

HEALTH_INTERVAL = 0.2  # seconds of silence before a connection is pinged
UNREADY_AFTER = 0.6  # seconds a pong may be late before the node turns unready
BACKOFF = 0.025
MAX_BACKOFF = 0.1
LOG_EVERY = 10.0  # seconds between log lines about failing reconnects
CATCH_UP_READS = 16  # history reads of one catch-up at a time
MAP_EVERY = 0.1  # seconds between two reads of the shards' map, at least
_FAILURES = (*FAILURES, BrokerUnavailable)

# What a name is subscribed with: (target, kind). Kinds: "channel" (SUBSCRIBE),
# "pattern" (PSUBSCRIBE, a glob), "shard" (SSUBSCRIBE, a cluster's sharded channel).
Target = tuple[bytes, str]
_SUBSCRIBE = {"channel": "SUBSCRIBE", "pattern": "PSUBSCRIBE", "shard": "SSUBSCRIBE"}
_UNSUBSCRIBE = {"channel": "UNSUBSCRIBE", "pattern": "PUNSUBSCRIBE", "shard": "SUNSUBSCRIBE"}
_CONFIRMS = ("subscribe", "psubscribe", "ssubscribe")
Message = dict[str, Any]
Backlog = list[tuple[bytes, bytes]]


class Source(Protocol):
    """Where the listener reads what it missed."""

    async def positions(self, spaces: Sequence[str]) -> dict[str, EventId]:
        """The newest id of each space (making its epoch if it has none)."""

    async def history(self, name: str, since: str | None, limit: int | None = None) -> Replay:
        """Every retained event of ``name`` after ``since``, or ``recovered=False``."""


class Shards(Protocol):
    """The Redis the listener reads from: what to subscribe, and where."""

    fixed_spaces: tuple[str, ...]  # spaces watched with or without subscribed names
    refresh_every: float  # seconds between reads of the map when nothing changed
    control: Target  # the control channel, subscribed whatever else is
    notices: Target | None  # the channel of every name's presence notices; None: each
    # name's notices come on its own channel or glob

    def targets(self, name: str) -> list[Target]:
        """What to subscribe for a topic or pattern."""

    def space(self, name: str) -> str | None:
        """The id space whose history fills ``name``'s gaps; None when it spans several."""

    def space_of(self, topic: str) -> str:
        """The id space of a topic."""

    def shard(self, target: bytes) -> str | None:
        """The shard that serves ``target`` now; None when nobody does."""

    def shard_of_space(self, space: str) -> str | None:
        """The shard that serves a space now; None when nobody does."""

    @property
    def masters(self) -> Sequence[str]:
        """Every shard, as last read."""

    @property
    def covered(self) -> bool:
        """Whether every key has a shard that serves it, as last read."""

    def pool(self, shard: str) -> ConnectionPool:
        """Where a shard's pub/sub connection comes from."""

    async def refresh(self) -> None:
        """Read the map of shards again."""


class _Session:
    """One shard's pub/sub connection and what was asked of it."""

    def __init__(self, shard: str) -> None:
        self.shard = shard
        self.pubsub: PubSub | None = None
        self.wanted: dict[bytes, str] = {}  # targets asked of this connection -> kind
        self.acks: dict[bytes, list[asyncio.Future[None]]] = {}
        self.connected = False  # subscribed and caught up
        self.late = False  # a ping is overdue
        self.last_heard = 0.0
        self.synced = 0  # sessions of this shard that got ready
        self.was_ready = False  # the last session got ready
        self.task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.connected and not self.late


class Listener:
    """Subscriptions, delivery, and recovery after lost connections. IOLoop only."""

    def __init__(self, shards: Shards, source: Source, deliver: Callable[[Event], None],
                 on_gap: Callable[[str], None], timeout: float,
                 on_presence: PresenceHandler | None = None,
                 on_control: Callable[[bytes], None] | None = None,
                 on_lost: Callable[[str], None] | None = None) -> None:
        self._shards = shards
        self._source = source
        self._deliver = deliver
        self._on_gap = on_gap
        self._timeout = timeout
        self._on_presence = on_presence
        self._on_control = on_control
        self._on_lost = on_lost
        self._refs: dict[str, int] = {}
        self._users: dict[bytes, set[str]] = {}  # target -> the names subscribed with it
        self._kinds: dict[bytes, str] = {}
        self._marks: dict[str, EventId] = {}  # space -> the newest id handed on
        self._sessions: dict[str, _Session] = {}
        self._changed = asyncio.Event()
        self.first_sync = asyncio.Event()
        self.reconnects = 0
        self._control = shards.control[0]
        self._notices = shards.notices[0] if shards.notices else None
        for fixed in (shards.control, shards.notices):
            if fixed is not None:  # subscribed by no name, and never unsubscribed
                self._users[fixed[0]], self._kinds[fixed[0]] = set(), fixed[1]

    @property
    def ready(self) -> bool:
        """Every shard subscribed, caught up, and answering."""
        shards = self._shards
        return shards.covered and bool(shards.masters) and all(
            shard in self._sessions and self._sessions[shard].ready for shard in shards.masters)

    @property
    def last_heard(self) -> float:
        """Loop time by which every shard's connection had last been heard from."""
        return min((session.last_heard for session in self._sessions.values()), default=0.0)

    def names(self) -> list[str]:
        """The topics and patterns subscribed in Redis."""
        return list(self._refs)

    # -- subscriptions ---------------------------------------------------------------

    async def subscribe(self, name: str) -> None:
        """Subscribe in Redis; returns once Redis confirmed.

        Raises ``BrokerUnavailable`` (and subscribes nothing) when a shard it needs is
        not connected or Redis does not confirm within the timeout.
        """
        targets = self._shards.targets(name)
        sessions = [self._session_for(target) for target, _ in targets]
        self._refs[name] = self._refs.get(name, 0) + 1
        if self._refs[name] > 1:
            return  # an unsubscribe of this name is still on its way
        try:
            async with asyncio.timeout(self._timeout):
                await self._watch(self._shards.space(name))
                for target, kind in targets:
                    self._users.setdefault(target, set()).add(name)
                    self._kinds[target] = kind
                await self._confirm(name, list(zip(sessions, targets, strict=True)))
        except TimeoutError:
            self._forget(name)
            raise BrokerUnavailable("the broker did not confirm the subscribe") from None
        except BaseException:
            self._forget(name)
            raise

    def _session_for(self, target: bytes) -> _Session:
        shard = self._shards.shard(target)
        session = self._sessions.get(shard) if shard is not None else None
        if session is None or session.pubsub is None or not session.connected:
            raise BrokerUnavailable("the broker is not connected; subscribe again later")
        return session

    async def _watch(self, space: str | None) -> None:
        """Give a space a watermark, read before subscribing: none missed after it."""
        if space is None or space in self._marks:
            return
        position = (await self._source.positions([space]))[space]
        self._marks.setdefault(space, position)

    async def _confirm(self, name: str, planned: list[tuple[_Session, Target]]) -> None:
        loop = asyncio.get_running_loop()
        waits: list[tuple[_Session, bytes, asyncio.Future[None]]] = []
        by_session: dict[_Session, list[Target]] = {}
        for session, (target, kind) in planned:
            ack: asyncio.Future[None] = loop.create_future()
            session.acks.setdefault(target, []).append(ack)
            session.wanted[target] = kind
            waits.append((session, target, ack))
            by_session.setdefault(session, []).append((target, kind))
        try:
            for session, targets in by_session.items():
                assert session.pubsub is not None
                await _send(session.pubsub, [(_SUBSCRIBE[kind], target)
                                             for target, kind in targets])
            await asyncio.gather(*(ack for _, _, ack in waits))
        except _FAILURES as exc:
            log.debug("redis subscribe to %s not confirmed: %s", name, describe(exc))
            raise BrokerUnavailable("the broker did not confirm the subscribe") from None
        finally:
            for session, target, ack in waits:
                waiting = session.acks.get(target, [])
                if ack in waiting:
                    waiting.remove(ack)
                if not waiting:
                    session.acks.pop(target, None)

    async def unsubscribe(self, name: str) -> None:
        """Drop the Redis subscriptions no local subscriber wants any more."""
        dropped = self._forget(name)
        by_session: dict[_Session, list[tuple[str, bytes]]] = {}
        for target, kind in dropped:
            shard = self._shards.shard(target)
            session = self._sessions.get(shard) if shard is not None else None
            if session is not None and session.wanted.pop(target, None) is not None:
                by_session.setdefault(session, []).append((_UNSUBSCRIBE[kind], target))
        for session, commands in by_session.items():
            if session.pubsub is None or not session.connected:
                continue  # its next session does not subscribe them
            try:
                async with asyncio.timeout(self._timeout):
                    await _send(session.pubsub, commands)
            except _FAILURES as exc:
                log.warning("redis unsubscribe from %s failed: %s", name, describe(exc))

    def _forget(self, name: str) -> list[Target]:
        """Count one subscriber of ``name`` out; the targets nobody uses any more, if it
        was the last one."""
        refs = self._refs.get(name, 0) - 1
        if refs > 0:
            self._refs[name] = refs
            return []
        self._refs.pop(name, None)
        dropped = []
        for target, kind in self._shards.targets(name):
            users = self._users.get(target)
            if users is None:
                continue
            users.discard(name)
            if not users:
                del self._users[target]
                self._kinds.pop(target, None)
                dropped.append((target, kind))
        space = self._shards.space(name)
        if (space is not None and space not in self._shards.fixed_spaces
                and not any(self._shards.space(other) == space for other in self._refs)):
            self._marks.pop(space, None)
        return dropped

    def _names_of(self, space: str) -> list[str]:
        return [name for name in self._refs if self._shards.space(name) == space]

    # -- the shards ------------------------------------------------------------------

    async def run(self) -> None:
        """Keep one session per shard, forever (run it supervised)."""
        try:
            while True:
                await self._reconcile()
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), self._shards.refresh_every)
                await asyncio.sleep(MAP_EVERY)
        finally:
            for session in list(self._sessions.values()):
                await stop(session.task)
            self._sessions.clear()

    async def _reconcile(self) -> None:
        """Read the map; one session per shard; a session whose shard now serves what
        it was not asked for starts again (it catches those names up)."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._shards.refresh()
        except _FAILURES as exc:
            log.debug("reading the redis cluster map failed: %s", describe(exc))
        masters = set(self._shards.masters)
        for shard in [shard for shard in self._sessions if shard not in masters]:
            await stop(self._sessions.pop(shard).task)
        for shard in masters:
            session = self._sessions.get(shard)
            if session is None:
                session = self._sessions[shard] = _Session(shard)
                session.task = asyncio.get_running_loop().create_task(self._keep(session))
            elif session.connected and any(target not in session.wanted
                                           for target in self._assigned(shard)):
                await stop(session.task)
                session.task = asyncio.get_running_loop().create_task(self._keep(session))

    def _assigned(self, shard: str) -> dict[bytes, str]:
        return {target: self._kinds[target] for target in self._users
                if self._shards.shard(target) == shard}

    async def _keep(self, session: _Session) -> None:
        """One shard's sessions, reconnecting with capped backoff."""
        delay = BACKOFF
        reports = Throttle(LOG_EVERY)
        while True:
            try:
                with closed_as_lost():
                    await self._session(session)
            except Exception as exc:  # a bug is logged below with its traceback
                if session.was_ready:  # a healthy session ended: start the backoff afresh
                    delay, session.was_ready, reports = BACKOFF, False, Throttle(LOG_EVERY)
                    if self._on_lost is not None and isinstance(exc, _FAILURES):
                        self._on_lost(session.shard)
                if not isinstance(exc, _FAILURES):
                    log.error("redis listener session failed", exc_info=exc)
                elif reports.ready():
                    held = reports.take_held()
                    where = f" from {session.shard}" if session.shard else ""
                    log.warning("redis listener lost its connection%s (%s); reconnecting "
                                "every %.2fs at most%s", where, describe(exc), MAX_BACKOFF,
                                f" ({held} more failed attempts)" if held else "")
            self._changed.set()
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)

    async def _session(self, session: _Session) -> None:
        pubsub = PubSub(self._shards.pool(session.shard), ignore_subscribe_messages=False)
        try:
            async with asyncio.timeout(self._timeout):
                await pubsub.connect()  # type: ignore[no-untyped-call]
                targets = self._assigned(session.shard)
                spaces = self._spaces_on(session.shard)
                # before subscribing: nothing published after these is missed
                starts = await self._source.positions(spaces) if spaces else {}
                session.pubsub, session.wanted = pubsub, dict(targets)
                await _send(pubsub, [(_SUBSCRIBE[kind], target)
                                     for target, kind in targets.items()])
                backlog = await self._sync(session, pubsub)
            await self._catch_up(targets, starts, backlog)
            self._ready(session)
            log.info("redis listener subscribed to %d names%s",
                     len({name for target in targets for name in self._users.get(target, ())}),
                     f" on {session.shard}" if session.shard else "")
            await self._pump(session, pubsub)
        finally:
            session.connected = False
            session.pubsub = None
            _release(session.acks)
            with contextlib.suppress(*_FAILURES):
                async with asyncio.timeout(self._timeout):  # a peer that stopped reading
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _spaces_on(self, shard: str) -> list[str]:
        spaces = {*self._shards.fixed_spaces, *self._marks}
        return [space for space in spaces if self._shards.shard_of_space(space) == shard]

    def _ready(self, session: _Session) -> None:
        if session.synced or self.first_sync.is_set():
            self.reconnects += 1
        session.synced += 1
        session.last_heard = asyncio.get_running_loop().time()
        session.connected, session.late, session.was_ready = True, False, True
        if self.ready:
            self.first_sync.set()

    async def _sync(self, session: _Session, pubsub: PubSub) -> Backlog:
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
            self._handle(session, message, backlog)

    async def _pump(self, session: _Session, pubsub: PubSub) -> None:
        pinged: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            if pinged is None:
                wait = HEALTH_INTERVAL
            elif not session.late:
                wait = pinged + UNREADY_AFTER - loop.time()
            else:
                wait = pinged + self._timeout - loop.time()
            message = await pubsub.get_message(timeout=max(wait, 0.001))
            now = loop.time()
            if message is not None:
                pinged, session.late = None, False
                session.last_heard = now
                self._handle(session, message, None)
            elif pinged is None:
                async with asyncio.timeout(self._timeout):
                    await pubsub.ping()
                pinged = now
            elif now >= pinged + self._timeout:
                raise TimeoutError(f"no answer to a ping within {self._timeout:g}s")
            elif now >= pinged + UNREADY_AFTER and not session.late:
                session.late = True
                log.warning("redis does not answer a ping; not ready until it does")

    # -- messages --------------------------------------------------------------------

    def _handle(self, session: _Session, message: Message, backlog: Backlog | None) -> None:
        kind = message["type"]
        if kind in ("message", "smessage", "pmessage"):
            target = message["pattern"] if kind == "pmessage" else message["channel"]
            if backlog is not None and target != self._control:
                backlog.append((message["data"], target))  # events and presence, in order
            elif not self._other(target, message["data"]):
                self._receive(message["data"], target)
        elif kind in _CONFIRMS:
            for ack in session.acks.pop(message["channel"], []):
                if not ack.done():
                    ack.set_result(None)
        elif kind == "sunsubscribe" and message["channel"] in self._users:
            # not asked for: its slot moved to another shard, which must subscribe it
            session.wanted.pop(message["channel"], None)
            self._changed.set()

    def _other(self, target: bytes, payload: bytes) -> bool:
        """Hand on a control or presence message; False for an event."""
        if target == self._control:
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
        # on a name's own channel or glob (other globs may match its channel too), or
        # on the one channel of every name's notices
        mine = name in self._users.get(target, ()) or (
            target == self._notices and name in self._refs)
        if mine and self._on_presence is not None:
            try:
                self._on_presence(name, notices)
            except Exception:
                log.exception("the presence handler failed for %s", name)
        return True

    def _receive(self, payload: bytes, target: bytes) -> None:
        event = decode_event(payload)
        if event is None:
            log.warning("ignored a malformed message on a squall channel")
            return
        users = self._users.get(target, ())
        if event.topic not in users and not any(matches(name, event.topic) for name in users):
            return  # a glob or a shared channel is broader than the names behind it
        self._accept(event)

    def _accept(self, event: Event) -> None:
        space = self._shards.space_of(event.topic)
        mark = self._marks.get(space)
        if mark is None:  # a space only names that span spaces want: it comes one way
            self._deliver(event)
            return
        epoch = event.id.rpartition("-")[0]
        if epoch == mark.epoch:
            if event.seq <= mark.seq:
                return  # already handed on, through another subscription or a catch-up
        else:  # the space lost its history since the watermark: say so first
            self._report_gaps(self._names_of(space))
        self._marks[space] = EventId(epoch, event.seq)
        self._deliver(event)

    # -- catching up -------------------------------------------------------------------

    async def _catch_up(self, targets: Iterable[bytes], starts: dict[str, EventId],
                        backlog: Backlog) -> None:
        """Hand on what the names of ``targets`` missed since their watermarks, then the
        backlog. ``starts``: the positions read before this session subscribed."""
        names = {name for target in targets for name in self._users.get(target, ())}
        gaps: list[str] = []
        for space, start in starts.items():
            mark = self._marks.get(space)
            if mark is not None and (mark.epoch != start.epoch or start.seq < mark.seq):
                # the space lost what came after the watermark
                gaps.extend(name for name in names if self._shards.space(name) == space)
                mark = None
            if mark is None:
                self._marks[space] = start
        filling = [name for name in names if name not in gaps]
        gaps.extend(name for name in filling if self._shards.space(name) is None)
        filling = [name for name in filling if self._shards.space(name) is not None]
        events, unfilled = await self._missed(filling)
        self._report_gaps([*gaps, *unfilled])
        for event in events:
            self._accept(event)
        for payload, target in backlog:
            if not self._other(target, payload):
                self._receive(payload, target)

    async def _missed(self, names: list[str]) -> tuple[list[Event], list[str]]:
        """The events ``names`` missed since their spaces' watermarks, and the names
        whose gap history cannot fill. Each name's history is read at its own moment:
        a space's events are kept only up to the earliest position its reads saw, so
        that no later one moves the watermark past a live event still on its way (those
        after it came after the subscriptions, and arrive live)."""
        spaces = [self._shards.space(name) for name in names]
        reading = asyncio.Semaphore(CATCH_UP_READS)

        async def read(name: str, space: str) -> Replay:
            async with reading:  # within the client's connections, however many names
                return await self._source.history(name, str(self._marks[space]))

        replays = await asyncio.gather(*(read(name, space)
                                         for name, space in zip(names, spaces, strict=True)
                                         if space is not None),
                                       return_exceptions=True)
        upto: dict[str, int] = {}
        for space, replay in zip(spaces, replays, strict=True):
            if isinstance(replay, BaseException):
                raise replay
            position = EventId.parse(replay.last_id)
            if space is not None and position is not None:
                upto[space] = min(upto.get(space, position.seq), position.seq)
        found: dict[str, Event] = {}
        gaps = []
        for name, space, replay in zip(names, spaces, replays, strict=True):
            assert space is not None and isinstance(replay, Replay)
            if not replay.recovered:
                gaps.append(name)
                continue
            for event in replay.events:
                if event.seq <= upto.get(space, event.seq):
                    found[event.id] = event
        return sorted(found.values(), key=_seq), gaps

    def _report_gaps(self, names: Iterable[str]) -> None:
        for name in names:
            log.warning("events of %s may have been lost while a redis connection was "
                        "down, and its history cannot replay them", name)
            try:
                self._on_gap(name)
            except Exception:
                log.exception("the gap handler failed for %s", name)


async def _send(pubsub: PubSub, commands: Sequence[tuple[str, bytes]]) -> None:
    """Send (un)subscribe commands in one write. They bypass the PubSub's own record of
    subscriptions, so it never subscribes again by itself after a reconnect: every
    session subscribes afresh and catches up."""
    if not commands:
        return
    await pubsub.connect()  # type: ignore[no-untyped-call]
    connection = pubsub.connection
    assert connection is not None
    await connection.send_packed_command(connection.pack_commands(commands))


def _release(acks: dict[bytes, list[asyncio.Future[None]]]) -> None:
    for waiting in acks.values():
        for ack in waiting:
            if not ack.done():
                ack.set_exception(BrokerUnavailable("the redis connection was lost"))
    acks.clear()


def _seq(event: Event) -> int:
    return event.seq
