"""The Redis Cluster broker: the Redis broker with one id space per slot.

``redis+cluster://host:7000[,host:7001...]`` (``rediss+cluster://`` for TLS; any
reachable node seeds the map of slots). Everything redis.py says holds, per id space,
with these differences:

- Hash tags: a topic's first segment decides its slot (``orders.eu.created`` lives
  in the slot of ``orders``), and every key of the topic carries that slot's tag, so
  all of a first segment's topics share one slot and one script call per group of
  publishes. The choice, against the whole topic as the tag: a pattern whose first
  segment is literal (``orders.*``, ``orders.>``, ``orders.*.created``) lies in one
  slot, so it resumes gap-free and is caught up after a reconnect exactly like a
  topic; with whole-topic tags no pattern could. The price: the first segment is the
  unit of sharding (``user:42.inbox`` spreads over the cluster, ``app.user42`` all
  lands on one shard).
- Id spaces: one per slot (16384 at most, whatever the number of first segments),
  each with its epoch, seq counter and topic indexes; ids increase in publish order
  within a slot. A pattern whose first segment is a wildcard (``*.created``, ``>``)
  spans slots: it is delivered live, but no id says where it stood, so a ``since`` on
  it is answered ``recovered: false`` with nothing replayed, and after a lost
  connection its subscribers are closed with 4009 (never a silent gap).
- Epochs: ``<family>.<slot>``. The first node to find the cluster without any Squall
  data gives every slot the same new family; a slot that later finds itself without
  data (its shard lost it) starts a family of its own. An id of another slot of the
  same family shares the slot's clock, so a ``since`` from another topic is read as
  a time in this slot, as on a single Redis; any other epoch is a lost one.
- Seqs are clocked (redis_lua.py): a replica promoted after a failover gives out seqs
  past those the old master may have given out before it died, not the same again;
  topics idle for ``idle_ms`` are forgotten (a ``since`` from before is unrecoverable).
- Channels: sharded pub/sub (``SPUBLISH``/``SSUBSCRIBE``). Each event goes out on its
  topic's channel, its first segment's channel (patterns with a literal first
  segment) and its slot's channel (patterns with a wildcard first segment, which
  subscribe all 16384), each only while some node subscribes it. The listener holds
  one pub/sub connection per master, never one per topic, and moves subscriptions
  when slots move.
- Durability: ``options.wait_replicas`` N makes every publish wait for N replicas'
  acknowledgement (``WAIT``, on the connection that ran the script) before it is
  accepted. With N = 0 a publish is accepted once its master ran it; a master that
  dies before its replicas received the last events loses them (the events of the
  last moments before the kill: tests/test_cluster_faults.py measures how many).
- ``MOVED`` and ``ASK`` (failovers, resharding) are followed by redis-py's cluster
  client; a script call that meets a slot being migrated is retried (``TRYAGAIN``).
- Readiness: ``ready`` is False while any slot has no master, or any master's
  listener connection is down or late.
- ``history_max_topics`` bounds the topics of each slot.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any
from urllib.parse import unquote

from redis.asyncio import ConnectionPool, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import (
    AskError,
    MovedError,
    NoScriptError,
    RedisError,
    TryAgainError,
)

from server.broker.base import BrokerOptions, EventHandler
from server.broker.memory import new_epoch
from server.broker.redis import MAX_CONNECTIONS, RedisBroker
from server.broker.redis_keys import (
    FAILURES,
    PREFIX,
    Space,
    as_text,
    describe,
    disconnect_idle,
    run,
)
from server.broker.redis_listener import Shards, Target
from server.broker.redis_lua import POSITION, PUBLISH
from server.broker.redis_presence import CLUSTER_WIRE
from server.topics import SINGLE, TAIL, is_pattern

log = logging.getLogger("squall.broker.redis")

FAMILY = PREFIX + "{family}:epoch"  # the epoch family every slot started with
LISTED = PREFIX + "{family}:listed"  # zset: slot -> ms of a publish to it (see _listed)
LIST_EVERY = 60.0  # seconds between two notes of one slot by one node, at least
MAP_REFRESH = 1.0  # seconds between reads of the slot map when nothing changed
REDIRECTS = 8  # redirections one publish call with WAIT follows at most


def first_segment(name: str) -> str | None:
    """What decides the slot of a topic or pattern: its first segment, unless a wildcard."""
    head = name.split(".", 1)[0]
    return None if head in (SINGLE, TAIL) else head


@functools.lru_cache(maxsize=1 << 16)
def slot_of(segment: str) -> int:
    """The slot of a first segment (remembered: every received event asks)."""
    return key_slot(segment.encode())


@functools.cache
def slot_spaces() -> tuple[Space, ...]:
    """One id space per slot, in slot order, each under a tag that hashes to its slot."""
    tags: dict[int, str] = {}
    candidate = 0
    while len(tags) < REDIS_CLUSTER_HASH_SLOTS:
        tag = f"s{candidate:x}"
        tags.setdefault(slot_of(tag), tag)
        candidate += 1
    return tuple(Space.tagged(tags[slot], str(slot)) for slot in range(REDIS_CLUSTER_HASH_SLOTS))


@functools.cache
def slot_channels() -> dict[bytes, int]:
    """Each slot's channel (every event of the slot), and the slot."""
    return {slot_channel(space): slot for slot, space in enumerate(slot_spaces())}


def slot_channel(space: Space) -> bytes:
    return (space.prefix + "slot").encode()


def segment_channel(space: Space, segment: str) -> bytes:
    """Every event of one first segment, for patterns that name it."""
    return (space.prefix + "all:" + segment).encode()


def space_of(topic: str) -> Space:
    return slot_spaces()[slot_of(topic.split(".", 1)[0])]


class ClusterShards:
    """The listener's view of a cluster: one shard per master, read from redis-py's
    map of slots; every subscription a sharded channel."""

    fixed_spaces: tuple[str, ...] = ()
    refresh_every: float = MAP_REFRESH
    control, notices = CLUSTER_WIRE.targets()

    def __init__(self, cluster: RedisCluster, connection: dict[str, Any]) -> None:
        self._cluster = cluster
        self._connection = connection
        self._pools: dict[str, ConnectionPool] = {}
        self._primaries: list[str | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        self.masters: tuple[str, ...] = ()
        self.covered = False

    def targets(self, name: str) -> list[Target]:
        segment = first_segment(name)
        if segment is None:
            return [(channel, "shard") for channel in slot_channels()]
        space = space_of(name)
        if is_pattern(name):
            return [(segment_channel(space, segment), "shard")]
        return [(space.channel(name), "shard")]

    def space(self, name: str) -> str | None:
        return None if first_segment(name) is None else space_of(name).name

    def space_of(self, topic: str) -> str:
        return space_of(topic).name

    def shard(self, target: bytes) -> str | None:
        slot = slot_channels().get(target)
        return self._primaries[key_slot(target) if slot is None else slot]

    def shard_of_space(self, space: str) -> str | None:
        return self._primaries[int(space)]

    def pool(self, shard: str) -> ConnectionPool:
        pool = self._pools.get(shard)
        if pool is None:
            host, _, port = shard.rpartition(":")
            pool = self._pools[shard] = ConnectionPool(host=host, port=int(port),
                                                       max_connections=4, **self._connection)
        return pool

    async def refresh(self) -> None:
        """Read the slot map again (from any node that answers)."""
        await self._cluster.nodes_manager.initialize()
        slots = self._cluster.nodes_manager.slots_cache
        self._primaries = [slots[slot][0].name if slots.get(slot) else None
                           for slot in range(REDIS_CLUSTER_HASH_SLOTS)]
        self.covered = all(self._primaries)
        self.masters = tuple(sorted({name for name in self._primaries if name}))

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.disconnect()


class RedisClusterBroker(RedisBroker):
    """The Redis broker on Redis Cluster (see the module)."""

    clocked = True
    sharded = True
    nodes_prefix = PREFIX + "{nodes}:"
    presence_wire = CLUSTER_WIRE

    def __init__(self, url: str, options: BrokerOptions) -> None:
        retention = options.retention
        self.idle_ms = (0 if not retention.ttl else
                        int(1000 * max(2 * retention.ttl, options.dedupe_window, 3600.0)))
        self._listed = [-LIST_EVERY] * REDIS_CLUSTER_HASH_SLOTS  # when this node noted each
        super().__init__(url, options)

    def _connect(self, url: str) -> tuple[Any, Shards]:
        seeds, credentials, tls = parse_cluster_url(url)
        connection: dict[str, Any] = {"socket_connect_timeout": self.options.timeout,
                                      "retry": Retry(NoBackoff(), 0), **credentials}
        self._cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in seeds],
            require_full_coverage=False, max_connections=2 * MAX_CONNECTIONS,
            socket_timeout=self.options.timeout, ssl=tls, **connection)
        # pub/sub reads wait as long as the listener says, not the socket's timeout
        self._cluster_shards = ClusterShards(self._cluster, {
            **connection, "socket_timeout": None,
            "connection_class": SSLConnection if tls else Connection})
        return self._cluster, self._cluster_shards

    # -- id spaces ---------------------------------------------------------------------

    def _space(self, name: str) -> Space | None:
        return None if first_segment(name) is None else space_of(name)

    def _space_of(self, topic: str) -> Space:
        return space_of(topic)

    def _space_named(self, name: str) -> Space:
        return slot_spaces()[int(name)]

    async def _listed_spaces(self) -> list[Space]:
        """The slots some node published to within the history ttl (and a margin): a
        node notes a slot in LISTED before it answers its first publish there, and
        again at most every LIST_EVERY seconds, so no slot with retained events is
        missing (and listings need not read all 16384)."""
        ttl = self.options.retention.ttl
        oldest = "-inf" if not ttl else 1000 * (time.time() - ttl - 2 * LIST_EVERY)
        slots = await self._cluster.zrangebyscore(LISTED, oldest, "+inf")
        return [slot_spaces()[int(as_text(slot))] for slot in slots]

    async def _send(self, space: Space, events: list[Any]) -> list[Any]:
        """The group's outcomes, the slot noted in LISTED meanwhile (see _listed_spaces)."""
        outcomes: list[Any]
        outcomes, _ = await asyncio.gather(super()._send(space, events), self._list(space))
        return outcomes

    async def _list(self, space: Space) -> None:
        now = time.monotonic()
        if now - self._listed[int(space.name)] < LIST_EVERY:
            return
        try:
            async with asyncio.timeout(self.options.timeout):
                await self._cluster.zadd(LISTED, {space.name: int(time.time() * 1000)})
        except FAILURES as exc:  # again next time
            log.warning("noting a published slot failed: %s", exc)
            return
        self._listed[int(space.name)] = now

    def _channels(self, space: Space, topic: str) -> list[bytes]:
        return [space.channel(topic), segment_channel(space, topic.split(".", 1)[0]),
                slot_channel(space)]

    def _new_epoch(self, space: Space) -> str:
        return f"{new_epoch()}.{int(space.name):x}"

    def _sibling(self, epoch: str, space: Space, current: str) -> bool:
        family, _, slot = epoch.partition(".")
        return (epoch != current and bool(slot) and family == current.partition(".")[0]
                and all(c in "0123456789abcdef" for c in slot))

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, on_event: EventHandler) -> None:
        """Give every slot its epoch when the cluster has no Squall data, then listen."""
        try:
            async with asyncio.timeout(self.options.timeout):
                await self._give_epochs()
        except FAILURES as exc:
            log.warning("redis cluster at %s did not answer in time (%s); slots without "
                        "an epoch start their own", self._where, describe(exc))
        await super().start(on_event)

    async def _give_epochs(self) -> None:
        """One epoch family for every slot, when none has an epoch (a new cluster, or
        one that lost everything): a slot that has one keeps it, so a slot that lost
        its data and started a family of its own is never mistaken for a sibling."""
        if await self._cluster.exists(FAMILY):
            return  # given already (or the cluster was found with data)
        spaces = slot_spaces()
        if await self._cluster.dbsize():  # not empty: does any slot have an epoch?
            reads = self._cluster.pipeline(transaction=False)
            for space in spaces:
                reads.exists(space.meta)
            if any(await run(reads)):
                await self._cluster.set(FAMILY, "", nx=True)  # each slot keeps its own
                return
        await self._cluster.set(FAMILY, new_epoch(), nx=True)  # one family, if two start
        family = as_text(await self._cluster.get(FAMILY) or "")
        if not family:
            return
        sha = await self._cluster.script_load(POSITION)
        writes = self._cluster.pipeline(transaction=False)
        for slot, space in enumerate(spaces):
            writes.execute_command("EVALSHA", sha, 4, *space.indexes, f"{family}.{slot:x}")
        await run(writes)

    async def _disconnect(self) -> None:
        await self._cluster_shards.close()

    async def _drop_idle(self, shard: str) -> None:
        node = self._cluster.get_node(node_name=shard)
        if node is not None:
            await disconnect_idle(node)

    # -- publishing --------------------------------------------------------------------

    async def _run_publish(self, space: Space, keys: list[Any], args: list[Any]) -> Any:
        """The script through the cluster client, which follows MOVED and ASK; with
        ``wait_replicas``, the script and its WAIT on one connection of the master that
        runs it, following redirections here (the WAIT must go where the script ran)."""
        if not self.options.wait_replicas:
            return await self._publish_script(keys=keys, args=args)
        asking: ClusterNode | None = None
        for _ in range(REDIRECTS):
            node = asking or self._cluster.get_node_from_key(keys[0])
            pipe = self._cluster.pipeline()
            if asking is not None:
                pipe.execute_command("ASKING", target_nodes=node)
            pipe.execute_command("EVALSHA", self._publish_script.sha, len(keys), *keys, *args,
                                 target_nodes=node)
            pipe.execute_command("WAIT", self.options.wait_replicas,
                                 self.wait_ms, target_nodes=node)
            outcome, acked = (await run(pipe, raise_on_error=False,
                                        allow_redirections=False))[-2:]
            asking = None
            if isinstance(outcome, AskError):
                asking = self._cluster.get_node(host=outcome.host, port=outcome.port)
            elif isinstance(outcome, MovedError):
                await self._cluster.nodes_manager.initialize()
            elif isinstance(outcome, TryAgainError):
                await asyncio.sleep(0.05)
            elif isinstance(outcome, NoScriptError):
                await self._cluster.script_load(PUBLISH)
            else:
                return self._confirmed(outcome, acked)
        raise RedisError(f"the publish was redirected more than {REDIRECTS} times")


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, str], bool]:
    """Seed nodes, credentials and whether to use TLS from a ``redis+cluster://`` URL."""
    scheme, _, rest = url.partition("://")
    location = rest.split("/", 1)[0].split("?", 1)[0]
    userinfo, _, hosts = location.rpartition("@")
    credentials: dict[str, str] = {}
    if userinfo:
        user, has_password, password = userinfo.partition(":")
        if has_password:
            credentials["password"] = unquote(password)
            if user:
                credentials["username"] = unquote(user)
        else:
            credentials["password"] = unquote(user)
    seeds = []
    for host_port in filter(None, hosts.split(",")):
        host, _, port = host_port.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"broker URL {scheme}://...{host_port}: give every node as "
                             "HOST:PORT, e.g. redis+cluster://10.0.0.1:7000,10.0.0.2:7000")
        seeds.append((host.strip("[]"), int(port)))
    if not seeds:
        raise ValueError("a redis+cluster:// broker URL needs at least one HOST:PORT")
    return seeds, credentials, scheme.lower().startswith("rediss")

