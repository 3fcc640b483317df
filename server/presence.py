"""Presence on this node: what its clients' subscriptions add to the broker's presence,
and the join and leave frames it hands its own subscribers.

Every subscription of a client to a name (a topic or a pattern, exactly as subscribed)
is an entry ``{"id", "sub", "node", "connected_at", "info"}`` in the broker
(server/broker/base.py states what the broker guarantees). ``PresenceWriter`` sends
this node's changes in batches: whatever changed while one batch was under way goes
in the next, in order, at most ``max_batch`` changes a call, so a storm of subscribes
costs a few broker calls, not one per client. A join and a leave of one client and
name that were never sent cancel out; a batch that failed goes again (the broker's
updates are idempotent) after ``retry`` seconds. Changes wait for a broker that does
not answer up to ``max_pending`` of them: past that they are dropped, and once the
broker answers the node's whole presence is written as it is then (``snapshot``,
``Broker.replace_presence``), which also takes out every entry the dropped changes
would have removed. Memory stays bounded however long the outage and its churn.

Join and leave frames (names matching ``presence_topics``)::

    {"type": "join", "topic": "chat.room1", "client": {"id", "sub", "info"}}
    {"type": "leave", "topic": "chat.room1", "client": {"id", "sub", "info"}}

go to the clients subscribed to that very name, in the order the broker applied the
changes. A client gets those that come after its own join: when it subscribes, the
frames the broker applied before its join are not sent to it (its presence query
shows their outcome), and its own join never is. Should its own join not come back
within ``ECHO_GRACE`` seconds of being written (a lost broker connection), it gets
every frame from then on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from server.broker.base import Broker, PresenceChange, PresenceNotice, PresenceOptions
from server.codec import dump_json
from server.connection import Connection
from server.errors import BrokerUnavailable
from server.signals import ClientInfo
from server.tasks import stop, supervise
from server.wire import WireFormat

log = logging.getLogger("squall.presence")

MAX_BATCH = 1000  # changes per broker call at most
MAX_PENDING = 50_000  # changes waiting at most; past it, one rewrite of everything instead
RETRY = 0.5  # seconds before a failed batch goes again
ECHO_GRACE = 1.0  # seconds a written join may take to come back before frames flow anyway
MAX_LIST = 1000  # entries a presence query returns at most (docs/protocol.md)


def entry(client: ClientInfo, node: str) -> bytes:
    """A client's presence entry, as the broker keeps it (JSON)."""
    return dump_json({"id": client.id, "sub": client.sub, "node": node,
                      "connected_at": client.connected_at, "info": client.info})


class _Pending(NamedTuple):
    remove_first: bool  # an entry the broker may have is removed first (a leave)
    entry: bytes | None  # then this one is added, or replaces the one there
    fresh: bool  # an add the broker has never been sent
    seq: int


class PresenceWriter:
    """This node's presence changes on their way to the broker (see the module)."""

    def __init__(self, broker: Broker, max_batch: int = MAX_BATCH, retry: float = RETRY,
                 max_pending: int = MAX_PENDING) -> None:
        self.broker = broker
        self.max_batch = max_batch
        self.retry = retry
        self.max_pending = max_pending
        # every entry of this node, name -> (client id, entry) pairs (the hub's, set late)
        self.snapshot: Callable[[], Mapping[str, Sequence[tuple[str, bytes]]]] | None = None
        self.batches = 0  # broker calls made, for metrics
        self.failures = 0
        self.rewrites = 0  # times the changes overflowed and everything was written anew
        self._rewrite = False  # the next call writes everything anew (see the module)
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._seq = 0  # of the latest change
        self._attempted = 0  # every change up to this seq has been sent once
        self._flying = False  # a batch is with the broker
        self._waiters: list[tuple[int, asyncio.Future[bool]]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        if self._task is None:
            self._task = supervise("presence-writer", self._run)

    def add(self, name: str, client: str, entry: bytes, fresh: bool = True) -> None:
        """``client`` is subscribed to ``name`` with ``entry``; ``fresh`` when it was not
        before (a new subscription), else the entry replaces the one there."""
        old = self._pending.pop((name, client), None)
        if old is not None:
            self._put(name, client, old.remove_first, entry, old.fresh and fresh)
        else:
            self._put(name, client, False, entry, fresh)

    def remove(self, name: str, client: str) -> None:
        """``client`` is no longer subscribed to ``name``."""
        old = self._pending.pop((name, client), None)
        if old is not None and old.fresh and not old.remove_first:
            if not self._pending and not self._flying:  # never sent: nothing to undo
                self._settle(self._seq, True)
            return
        self._put(name, client, True, None, False)

    async def written(self, timeout: float) -> bool:
        """Wait until every change made so far has been sent once: True if the broker
        applied it, False if that failed (it goes again) or ``timeout`` passed."""
        seq = self._seq
        if self._attempted >= seq or not (self._pending or self._rewrite or self._flying):
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append((seq, waiter))
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            return False

    async def close(self, timeout: float) -> int:
        """Send what is pending, for up to ``timeout``; stop; return the changes left (a
        rewrite still due counts as one)."""
        if (self._pending or self._rewrite) and self._task is not None:
            await self.written(timeout)
        await stop(self._task)
        self._task = None
        left = len(self._pending) or int(self._rewrite)
        self._settle(self._seq, False)
        return left

    def _put(self, name: str, client: str, remove_first: bool, entry: bytes | None,
             fresh: bool) -> None:
        self._seq += 1
        self._wakeup.set()
        if self._rewrite:
            return  # the rewrite's snapshot, taken when it is sent, has this change
        self._pending[(name, client)] = _Pending(remove_first, entry, fresh, self._seq)
        self._bound()

    def _bound(self) -> None:
        if len(self._pending) <= self.max_pending or self.snapshot is None:
            return
        log.warning("%d presence changes are waiting for the broker: dropped; this node's "
                    "whole presence is written anew once the broker answers",
                    len(self._pending))
        self._rewrite_again()
        self.rewrites += 1

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending or self._rewrite:
                written = await (self._write_all() if self._rewrite else self._write_batch())
                if not written:
                    await asyncio.sleep(self.retry)

    async def _write_all(self) -> bool:
        """Write this node's whole presence as it is now (``snapshot``)."""
        assert self.snapshot is not None
        upto = self._seq
        entries = self.snapshot()
        self._rewrite = False  # changes from now on come after this snapshot
        return await self._write(self.broker.replace_presence(entries), upto,
                                 self._rewrite_again, "rewriting this node's presence")

    def _rewrite_again(self) -> None:
        self._pending.clear()  # the next snapshot has them
        self._rewrite = True

    async def _write_batch(self) -> bool:
        batch = self._take()
        upto = max(pending.seq for pending in batch.values())
        changes = [change for (name, client), pending in batch.items()
                   for change in _changes(name, client, pending)]
        return await self._write(self.broker.update_presence(changes), upto,
                                 lambda: self._put_back(batch),
                                 f"a presence batch of {len(changes)} changes")

    async def _write(self, call: Awaitable[None], upto: int, undo: Callable[[], None],
                     what: str) -> bool:
        """Send one broker call carrying the changes up to seq ``upto``; if it fails,
        ``undo`` keeps them for the next (a bug or a stop: the supervisor logs it)."""
        self.batches += 1
        self._flying = True
        try:
            await call
        except (BrokerUnavailable, TimeoutError) as exc:
            self.failures += 1
            log.debug("%s failed: %s", what, exc)
            undo()
            self._settle(upto, False)
            return False
        except BaseException:
            undo()
            raise
        finally:
            self._flying = False
        self._settle(upto if self._pending or self._rewrite else self._seq, True)
        return True

    def _take(self) -> dict[tuple[str, str], _Pending]:
        """The oldest ``max_batch`` pending changes (the dict keeps the order of change)."""
        if len(self._pending) <= self.max_batch:
            batch, self._pending = self._pending, {}
            return batch
        batch = {}
        for key in list(self._pending)[:self.max_batch]:
            batch[key] = self._pending.pop(key)
        return batch

    def _put_back(self, batch: dict[tuple[str, str], _Pending]) -> None:
        """A batch that failed goes before what changed since; a later change of the same
        client and name comes after it (so a leave that may not have been applied is
        sent again before a later add). While a rewrite is due, nothing: its snapshot,
        taken when it is sent, covers the batch, which must not be sent after it."""
        if self._rewrite:
            return
        merged: dict[tuple[str, str], _Pending] = {}
        for key, failed in batch.items():
            later = self._pending.pop(key, None)
            if later is None:
                merged[key] = failed._replace(fresh=False)
            else:
                merged[key] = later._replace(remove_first=failed.remove_first
                                             or later.remove_first, fresh=False)
        merged.update(self._pending)
        self._pending = merged
        self._bound()

    def _settle(self, upto: int, applied: bool) -> None:
        self._attempted = max(self._attempted, upto)
        waiting = []
        for seq, waiter in self._waiters:
            if seq <= upto:
                if not waiter.done():
                    waiter.set_result(applied)
            else:
                waiting.append((seq, waiter))
        self._waiters = waiting


def presence_metrics(writer: PresenceWriter) -> Iterator[Metric]:
    """The writer's counters: broker calls made, those that failed, changes waiting."""
    yield CounterMetricFamily("squall_presence_writes", "Presence batches sent to the broker",
                              value=writer.batches)
    yield CounterMetricFamily("squall_presence_write_failures", "Presence batches the broker "
                              "did not confirm (sent again)", value=writer.failures)
    yield GaugeMetricFamily("squall_presence_pending", "Presence changes waiting for the "
                            "broker", value=len(writer))
    yield CounterMetricFamily("squall_presence_rewrites", "Times the presence changes "
                              "waiting for the broker passed their bound and the node's "
                              "whole presence was written anew", value=writer.rewrites)


def _changes(name: str, client: str, pending: _Pending) -> Iterator[PresenceChange]:
    if pending.remove_first:
        yield PresenceChange(name, client, None)
    if pending.entry is not None:
        yield PresenceChange(name, client, pending.entry)


class Frames(NamedTuple):
    """What one subscriber gets of a presence message: joined frames, and how many."""

    connection: Connection
    chunk: bytes | memoryview
    frame_count: int


class PresenceFrames:
    """The join and leave frames of one presence message, encoded once per wire format
    and cut per subscriber (without its own join, or only what follows it)."""

    def __init__(self, name: str, notices: list[PresenceNotice]) -> None:
        self.messages = [{"type": kind, "topic": name, "client": _client(entry)}
                         for kind, entry in notices]
        self.joins = {entry.get("id"): index for index, (kind, entry) in enumerate(notices)
                      if kind == "join"}
        self._encoded: dict[WireFormat, tuple[bytes, list[int]]] = {}

    def cut(self, wire: WireFormat, own: int | None, after_own: bool,
            ) -> tuple[bytes | memoryview, int]:
        """The frames in ``wire``: all of them, or without the one at ``own``, or (with
        ``after_own``) only those after it, as a view of the shared bytes (in a storm
        of joins each joiner gets the rest of one batch: one buffer, not one each)."""
        data, starts = self._encode(wire)
        count = len(self.messages)
        if own is None:
            return data, count
        if after_own:
            return memoryview(data)[starts[own + 1]:], count - own - 1
        return data[:starts[own]] + data[starts[own + 1]:], count - 1

    def _encode(self, wire: WireFormat) -> tuple[bytes, list[int]]:
        found = self._encoded.get(wire)
        if found is None:
            frames = [wire.frame(message) for message in self.messages]
            starts = [0]
            for frame in frames:
                starts.append(starts[-1] + len(frame))
            found = self._encoded[wire] = (b"".join(frames), starts)
        return found


def _client(entry: dict[str, Any]) -> dict[str, Any]:
    return {"id": entry.get("id"), "sub": entry.get("sub"), "info": entry.get("info")}


class Presence:
    """This node's side of presence: the hub tells it of subscriptions and it writes
    them (``writer``), and it cuts the join and leave frames for the hub's subscribers
    (see the module)."""

    def __init__(self, writer: PresenceWriter, node: str, options: PresenceOptions,
                 echo_grace: float = ECHO_GRACE) -> None:
        self.writer = writer
        self.node = node
        self.options = options
        self.echo_grace = echo_grace
        # subscriptions whose own join has not come back yet: they get no frames before it
        self._awaiting: dict[str, set[Connection]] = {}

    def joined(self, connection: Connection, name: str) -> None:
        """``connection`` has just subscribed to ``name``."""
        info: ClientInfo = connection.info
        self.writer.add(name, info.id, entry(info, self.node))
        if self.options.announces(name):
            self._awaiting.setdefault(name, set()).add(connection)

    def left(self, connection: Connection, name: str) -> None:
        """``connection`` is no longer subscribed to ``name`` (unsubscribed or gone)."""
        self.writer.remove(name, connection.info.id)
        self._stop_awaiting(name, connection)

    def entry_of(self, connection: Connection) -> bytes:
        """``connection``'s presence entry."""
        return entry(connection.info, self.node)

    def rewrite(self, connection: Connection, names: Collection[str]) -> None:
        """Write ``connection``'s entries of ``names`` again: its identity changed, or
        the broker lost them."""
        record = self.entry_of(connection)
        for name in names:
            self.writer.add(name, connection.info.id, record, fresh=False)

    async def written(self, connection: Connection, name: str, timeout: float) -> None:
        """Wait (up to ``timeout``) until the join of ``connection`` to ``name`` is
        written, then give its echo ``echo_grace`` more seconds to come back."""
        await self.writer.written(timeout)
        if connection in self._awaiting.get(name, ()):
            asyncio.get_running_loop().call_later(self.echo_grace, self._stop_awaiting,
                                                  name, connection)

    def frames(self, name: str, notices: list[PresenceNotice],
               subscribers: Collection[Connection]) -> Iterator[Frames]:
        """What each of ``subscribers`` (of exactly ``name``) gets of a presence message."""
        message = PresenceFrames(name, notices)
        awaiting = self._awaiting.get(name, ())
        for connection in subscribers:
            own = message.joins.get(connection.info.id)
            waits = connection in awaiting
            if waits:
                if own is None:
                    continue  # applied before its own join
                self._stop_awaiting(name, connection)
            chunk, count = message.cut(connection.wire, own, after_own=waits)
            if count:
                yield Frames(connection, chunk, count)

    def _stop_awaiting(self, name: str, connection: Connection) -> None:
        awaiting = self._awaiting.get(name)
        if awaiting is not None:
            awaiting.discard(connection)
            if not awaiting:
                del self._awaiting[name]
