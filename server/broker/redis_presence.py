"""The Redis broker's presence, lifecycle and control channel.

What it keeps in Redis and how each step stays atomic is in redis_presence_lua.py;
what the broker guarantees is in base.py. Here, the node's side:

- ``apply``: one script call per batch of this node's changes (the node's
  ``PresenceWriter`` batches them): entries written, joins and leaves published on
  each announced name's channel (the topic's own channel, so they keep their order
  with its events; a pattern's channel is its own name, which its glob matches), and
  the lifecycle decided. A name left empty gets a loop timer at the end of its
  debounce; should this node die meanwhile, another finds the name in the
  ``vacating`` index at its next sweep.
- ``run`` (supervised), every ``interval`` (a quarter of ``ttl``): one heartbeat and
  one refresh of every name this node's clients are in, in scripts of at most
  ``REFRESH_CHUNK`` names (not one call per client); then the sweep: nodes whose
  heartbeat lapsed are cleaned up by the one survivor that takes their lock (their
  entries removed, leaves announced, empty names vacated at once), and debounces
  that ended are finished. A node sweeps only after ``ttl`` seconds of unbroken
  contact with Redis, so that after an outage every node has refreshed before any
  takes another for dead. An entry counts as live for ``alive`` = ``ttl`` minus one
  interval after its last refresh; a node killed is therefore out of presence
  within ``ttl``.
- ``listing``: a read of the live nodes' entries of one name, at most ``limit``.
- ``disconnect``: a message on the control channel, which every node's listener
  always subscribes; this node acts on its own request at once and skips its echo.

Where the keys and channels are is the broker's (``PresenceWire``): a single Redis
publishes joins and leaves on each name's channel and control messages with
``PUBLISH``; a cluster keeps every presence key in one slot and sends both on sharded
channels of that slot (``SPUBLISH``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import msgpack
import orjson
from redis.asyncio import Redis

from server.broker.base import (
    OCCUPIED,
    VACATED,
    Disconnect,
    DisconnectHandler,
    LifecycleHandler,
    LocalNames,
    LostHandler,
    PresenceChange,
    PresenceHandler,
    PresenceList,
    PresenceNotice,
    PresenceOptions,
    presence_difference,
)
from server.broker.redis_keys import (
    FAILURES,
    PREFIX,
    SINGLE_SPACE,
    as_text,
    closed_as_lost,
    describe,
    milliseconds,
    run,
)
from server.broker.redis_presence_lua import APPLY, LIST, LIVE, REAP, REFRESH, SWEEP, VACATE

log = logging.getLogger("squall.broker.redis")

CONTROL = (PREFIX + "control").encode()
CHANNEL = SINGLE_SPACE.prefix + "event:"  # + name: the channel of its notices (single Redis)
MARK = b"\x93"  # a presence message is a msgpack array of three; an event, of four
REFRESH_CHUNK = 500  # names per refresh script call
REAP_CHUNK = 200  # names of a dead node per clean-up script call
CHANGES_CHUNK = 1000  # changes per script call of a rewrite, as the node's writer sends them
SWEEP_MOST = 100  # dead nodes and ended debounces read per sweep
_DECISIONS = {"occupied": OCCUPIED, "vacated": VACATED}


class Listeners(Protocol):
    """The broker's callbacks, read at each call (the node sets them after building it)."""

    on_presence: PresenceHandler
    on_lifecycle: LifecycleHandler
    on_disconnect: DisconnectHandler
    local_names: LocalNames
    on_presence_lost: LostHandler


@dataclasses.dataclass(frozen=True)
class PresenceWire:
    """Where one broker keeps presence and sends its messages.

    ``keys``: the prefix of every presence key. ``control``: the channel of disconnect
    requests; ``sharded``: whether it (and ``notices``) is a sharded channel
    (``SPUBLISH``). ``notices``: the one channel of every name's joins and leaves, or
    "" for each name's own channel (``CHANNEL`` + name: a topic's event channel, or a
    pattern's own name under the same prefix, which its glob matches).
    """

    keys: str = PREFIX + "presence:"
    control: bytes = CONTROL
    notices: bytes = b""
    sharded: bool = False

    def name_keys(self, name: str) -> str:
        """The prefix of one name's keys."""
        return f"{self.keys}{{{name}}}:"

    def of(self, name: str, node: str) -> list[str]:
        """A name's keys as the scripts take them: its node's hash, nodes, life."""
        base = self.name_keys(name)
        return [base + "node:" + node, base + "nodes", base + "life"]

    def targets(self) -> tuple[tuple[bytes, str], tuple[bytes, str] | None]:
        """What the listener subscribes for the control channel and the notices."""
        kind = "shard" if self.sharded else "channel"
        return (self.control, kind), ((self.notices, kind) if self.notices else None)


SINGLE_WIRE = PresenceWire()
CLUSTER_KEYS = PREFIX + "{presence}:"
CLUSTER_WIRE = PresenceWire(keys=CLUSTER_KEYS, control=(CLUSTER_KEYS + "control").encode(),
                            notices=(CLUSTER_KEYS + "notices").encode(), sharded=True)


def decode_presence(payload: bytes) -> tuple[str, list[PresenceNotice]] | None:
    """The name and the notices of a presence message, or None when it is not one."""
    try:
        value = msgpack.unpackb(payload, raw=False)
        marker, name, raw = value
        notices = [(kind, orjson.loads(entry)) for kind, entry in raw]
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    if marker != "presence" or not isinstance(name, str) or not all(
            kind in ("join", "leave") and isinstance(entry, dict)
            and isinstance(entry.get("id"), str) for kind, entry in notices):
        return None
    return name, notices


def decode_control(payload: bytes) -> tuple[str, Disconnect] | None:
    """The sender and the request of a control message, or None when it is not one."""
    try:
        value = msgpack.unpackb(payload, raw=False)
        sender, request = value["from"], Disconnect(
            value.get("sub"), value.get("client"), int(value["code"]), str(value["reason"]))
    except (ValueError, TypeError, KeyError, msgpack.UnpackException):
        return None
    if not isinstance(sender, str) or (request.sub is None) == (request.client is None):
        return None
    return sender, request


class RedisPresence:
    """This node's presence in Redis (see the module). IOLoop only."""

    def __init__(self, client: Redis, node_id: str, options: PresenceOptions,
                 timeout: float, listeners: Listeners, wire: PresenceWire,
                 answer: Callable[[str], AbstractAsyncContextManager[None]],
                 failed: Callable[[str], None]) -> None:
        """``answer`` and ``failed`` are the broker's: a call bounded by the timeout,
        its Redis failures as ``BrokerUnavailable``, logged at most so often."""
        self.node_id = node_id
        self.wire = wire
        keys = wire.keys
        self._nodes, self._names = keys + "nodes", keys + "names:" + node_id
        self._vacating = keys + "vacating"
        # a sharded channel a script publishes on is declared with its keys (its slot)
        self._announced = [wire.notices.decode()] if wire.notices else []
        self.options = options
        self.timeout = timeout
        self.interval = max(options.ttl / 4, 0.05)
        self.keep = milliseconds(2 * options.ttl)
        self.alive = milliseconds(options.ttl - self.interval)
        self.debounce = milliseconds(options.debounce)
        self._client = client
        self._listeners = listeners
        self._apply = client.register_script(APPLY)
        self._refresh_script = client.register_script(REFRESH)
        self._sweep_script = client.register_script(SWEEP)
        self._reap_script = client.register_script(REAP)
        self._vacate_script = client.register_script(VACATE)
        self._list = client.register_script(LIST)
        self._live = client.register_script(LIVE)
        self._contact_since: float | None = None
        self._checks: set[asyncio.Task[None]] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}  # name -> its debounce check
        self._answer, self._failed = answer, failed
        self.reaped = 0  # dead nodes this one cleaned up after

    # -- the broker's calls ------------------------------------------------------------

    async def apply(self, changes: Sequence[PresenceChange]) -> None:
        groups: dict[str, list[list[Any]]] = {}
        for change in changes:
            groups.setdefault(change.name, []).append(
                [change.client, change.entry if change.entry is not None else b""])
        packed = msgpack.packb([[name, int(self.options.announces(name)), items]
                                for name, items in groups.items()], use_bin_type=False)
        keys = [self._nodes, self._names, self._vacating]
        for name in groups:
            keys += self.wire.of(name, self.node_id)
        async with self._answer("presence"):
            decided = await self._apply(keys=keys + self._announced, args=[
                self.node_id, self.keep, self.alive, self.debounce, CHANNEL,
                self.wire.notices, packed])
        self._decided(decided)

    async def replace(self, entries: Mapping[str, Sequence[tuple[str, bytes]]]) -> None:
        """This node's entries become exactly ``entries``: the names it has entries in
        (its ``names`` set) and those of ``entries``, ``REAP_CHUNK`` at a time, each
        chunk's hashes read, then the difference applied as ordinary changes (only
        this node writes its hashes, and its writer sends one call at a time)."""
        names = set(entries)
        cursor = 0
        while True:
            async with self._answer("presence"):
                cursor, found = await self._client.sscan(self._names, cursor, count=REAP_CHUNK)
            names.update(as_text(name) for name in found)
            if cursor == 0:
                break
        ordered = sorted(names)
        for at in range(0, len(ordered), REAP_CHUNK):
            chunk = ordered[at:at + REAP_CHUNK]
            async with self._answer("presence"):
                reads = self._client.pipeline(transaction=False)
                for name in chunk:
                    reads.hgetall(self.wire.of(name, self.node_id)[0])
                found_entries = await run(reads)
            held = {name: {as_text(client): entry for client, entry in hash_.items()}
                    for name, hash_ in zip(chunk, found_entries, strict=True)}
            changes = presence_difference(held, {name: entries[name] for name in chunk
                                                 if name in entries})
            for first in range(0, len(changes), CHANGES_CHUNK):  # frames of a bounded size
                await self.apply(changes[first:first + CHANGES_CHUNK])

    async def listing(self, name: str, limit: int) -> PresenceList:
        """The live nodes' entries of ``name``: their nodes, then their hashes (two
        reads: a node that joins between them is left out, as if it came later)."""
        base = self.wire.name_keys(name)
        async with self._answer("presence list"):
            nodes = await self._live(keys=[base + "nodes"])
            count, raw = (await self._list(keys=[base + "node:" + as_text(node) for node in nodes],
                                           args=[limit]) if nodes else (0, []))
        entries = []
        for entry in raw:
            try:  # written by the nodes themselves: orjson alone, without load_json's checks
                entries.append(orjson.loads(entry))
            except orjson.JSONDecodeError:
                log.warning("ignored a malformed presence entry of %s", name)
        return PresenceList(int(count), entries, int(count) > len(entries))

    async def disconnect(self, request: Disconnect) -> None:
        payload = msgpack.packb({"from": self.node_id, "sub": request.sub,
                                 "client": request.client, "code": request.code,
                                 "reason": request.reason})
        async with self._answer("disconnect"):
            if self.wire.sharded:
                await self._client.spublish(self.wire.control, payload)
            else:
                await self._client.publish(self.wire.control, payload)
        self._listeners.on_disconnect(request)

    def control(self, payload: bytes) -> None:
        """A message on the control channel (from the listener)."""
        found = decode_control(payload)
        if found is None:
            log.warning("ignored a malformed message on the control channel")
        elif found[0] != self.node_id:  # this node acted on its own at once
            self._listeners.on_disconnect(found[1])

    async def close(self) -> None:
        """Stop the timers and leave the heartbeats (the node removed its entries)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in list(self._checks):
            task.cancel()
        try:
            async with asyncio.timeout(min(self.timeout, 1.0)):
                await self._client.zrem(self._nodes, self.node_id)
                await self._client.delete(self._names)
        except FAILURES as exc:
            log.debug("leaving the presence heartbeats failed: %s", exc)

    # -- refresh and sweep ---------------------------------------------------------------

    async def run(self) -> None:
        """Refresh and sweep every ``interval``, forever (run it supervised)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                with closed_as_lost():
                    async with asyncio.timeout(max(self.timeout, self.interval)):
                        await self._refresh(list(self._listeners.local_names()))
                    if self._contact_since is None:
                        self._contact_since = loop.time()
                    if loop.time() - self._contact_since >= self.options.ttl:
                        await self._sweep()
            except FAILURES as exc:
                self._contact_since = None
                self._failed(f"presence refresh: {describe(exc)}")
            await asyncio.sleep(self.interval)

    async def _refresh(self, names: list[str]) -> None:
        lost: list[str] = []
        for at in range(0, max(len(names), 1), REFRESH_CHUNK):
            chunk = names[at:at + REFRESH_CHUNK]
            keys = [self._nodes, self._names]
            for name in chunk:
                keys += self.wire.of(name, self.node_id)
            found = await self._refresh_script(keys=keys, args=[self.node_id, self.keep,
                                                                self.alive, *chunk])
            lost += [as_text(name) for name in found]
        if lost:
            log.info("presence entries of %d names were gone from redis; writing them again",
                     len(lost))
            self._listeners.on_presence_lost(lost)

    async def _sweep(self) -> None:
        async with asyncio.timeout(self.timeout):
            dead, due = await self._sweep_script(keys=[self._nodes, self._vacating],
                                                 args=[SWEEP_MOST])
        for node in (as_text(node) for node in dead):
            if node != self.node_id:
                await self._reap(node)
        if due:
            await self._vacate([as_text(name) for name in due])

    async def _reap(self, node: str) -> None:
        """Clean up after a dead node, if this one takes its lock first."""
        async with asyncio.timeout(self.timeout):
            taken = await self._client.set(self.wire.keys + "reap:" + node, self.node_id, nx=True,
                                           px=max(self.keep, 10_000))
        if not taken:
            return
        log.warning("node %s stopped refreshing its presence; taking its clients out", node)
        names_key = self.wire.keys + "names:" + node
        cursor = 0
        while True:
            async with asyncio.timeout(self.timeout):
                cursor, found = await self._client.sscan(names_key, cursor, count=REAP_CHUNK)
                names = [as_text(name) for name in found]
                if names:
                    packed = msgpack.packb([[name, int(self.options.announces(name))]
                                            for name in names], use_bin_type=False)
                    keys = [names_key, self._vacating]
                    for name in names:
                        keys += self.wire.of(name, node)
                    self._decided(await self._reap_script(keys=keys + self._announced, args=[
                        node, self.keep, CHANNEL, self.wire.notices, packed]))
            if cursor == 0:
                break
        async with asyncio.timeout(self.timeout):
            await self._client.zrem(self._nodes, node)
            await self._client.delete(names_key)
        self.reaped += 1

    async def _vacate(self, names: Iterable[str]) -> None:
        names = list(names)
        async with asyncio.timeout(self.timeout):
            keys = [self._vacating]
            for name in names:
                keys += self.wire.of(name, self.node_id)[1:]
            vacated, waiting = await self._vacate_script(keys=keys, args=[self.keep, *names])
        for name in vacated:
            self._listeners.on_lifecycle(as_text(name), VACATED)
        for name, left in zip(waiting[::2], waiting[1::2], strict=True):
            self._check_later(as_text(name), int(left) / 1000)

    # -- lifecycle timers ------------------------------------------------------------------

    def _decided(self, decided: list[Any]) -> None:
        for raw_name, raw_decision in zip(decided[::2], decided[1::2], strict=True):
            name, decision = as_text(raw_name), as_text(raw_decision)
            if decision == "vacating":
                self._check_later(name, self.options.debounce)
            else:
                self._listeners.on_lifecycle(name, _DECISIONS[decision])

    def _check_later(self, name: str, delay: float) -> None:
        """Finish ``name``'s debounce once it ended (one timer per name at most)."""
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._timers[name] = loop.call_later(delay + 0.005, self._check_now, name)

    def _check_now(self, name: str) -> None:
        self._timers.pop(name, None)
        task = asyncio.get_running_loop().create_task(self._vacate([name]))
        self._checks.add(task)
        task.add_done_callback(self._checked)

    def _checked(self, task: asyncio.Task[None]) -> None:
        self._checks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, FAILURES):  # the sweep finishes it
            self._failed(f"presence debounce: {describe(exc)}")
        elif exc is not None:
            log.error("a presence debounce check failed", exc_info=exc)
