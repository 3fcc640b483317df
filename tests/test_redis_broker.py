"""The Redis broker on a real redis-server: several brokers in one process act as nodes.

What the shared contract cannot show: delivery only of what a node subscribed to,
pattern globs that never over-match, one pub/sub connection per node, and recovery
from Redis faults (killed connections, a frozen server, a restart that lost data).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from tornado.ioloop import IOLoop

from config.settings import Settings
from server.broker.base import BrokerOptions, PublishRequest
from server.broker.redis import RedisBroker
from server.broker.redis_keys import FAILURES, channel, closed_as_lost, glob
from server.errors import BrokerUnavailable, SquallError
from server.history import Retention
from server.topics import matches
from tests.test_broker_contract import Received
from tests.waiting import eventually

pytest_plugins = ["tests.redis_server"]
pytestmark = [pytest.mark.redis, pytest.mark.gen_test(timeout=60)]

TIMEOUT = 1.0


class Gaps:
    """An ``on_gap`` that records names and lets a test wait for one."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._arrived = asyncio.Event()

    def __call__(self, name: str) -> None:
        self.names.append(name)
        self._arrived.set()

    async def wait(self, timeout: float = 10.0) -> list[str]:
        async with asyncio.timeout(timeout):
            while not self.names:
                await self._arrived.wait()
        return self.names


@pytest.fixture
def nodes(redis_url: str, io_loop: IOLoop) -> Iterator[Any]:
    """``await nodes(subscribe=[...], size=..)``: a started RedisBroker and its events."""
    made: list[RedisBroker] = []

    async def make(subscribe: tuple[str, ...] | list[str] = (), size: int = 100,
                   timeout: float = TIMEOUT) -> tuple[RedisBroker, Received, Gaps]:
        options = BrokerOptions(retention=Retention(size=size), timeout=timeout)
        broker = RedisBroker(redis_url, options)
        made.append(broker)
        received, gaps = Received(), Gaps()
        broker.on_gap = gaps
        await broker.start(received)
        for name in subscribe:
            await broker.subscribe(name)
        return broker, received, gaps

    yield make

    async def close_all() -> None:
        for broker in made:
            await broker.close()

    io_loop.run_sync(close_all)


# -- globs ------------------------------------------------------------------------------

@pytest.mark.parametrize(("pattern", "expected"), [
    ("orders.*", rb"squall:event:orders.*"),
    ("orders.>", rb"squall:event:orders.*"),
    ("*.created", rb"squall:event:*.created"),
    ("user:42.*.in-box", rb"squall:event:user\:42.*.in\-box"),
    ("a_b.c@d.>", rb"squall:event:a\_b.c\@d.*"),
])
def test_patterns_become_escaped_globs(pattern, expected):
    assert glob(pattern) == expected


TOPICS = ["orders", "orders.eu", "orders.eu.created", "orders.us.created.late",
          "user:42.inbox", "user:42.in-box", "user:4.inbox", "user:42x.inbox", "a-b.c",
          "a.b-c", "x@y.z", "x@y", "ordersX.eu", "*.x", "a.b.c.d"]
PATTERNS = ["orders.*", "orders.>", "orders.*.created", "*.inbox", "user:42.>", "a-b.*",
            "*.b-c", "x@y.*", "*", ">", "*.*.*.*"]


async def test_pattern_subscribers_get_exactly_the_matching_topics(nodes):
    publisher, _, _ = await nodes()
    listeners = [await nodes(subscribe=[pattern, f"sentinel.{i}.a.b.c"])
                 for i, pattern in enumerate(PATTERNS)]
    valid = [topic for topic in TOPICS if "*" not in topic]
    await publisher.publish([PublishRequest(topic, topic) for topic in valid])
    # each listener's own sentinel comes after everything published before it
    await publisher.publish([PublishRequest(f"sentinel.{i}.a.b.c", f"sentinel {i}")
                             for i in range(len(PATTERNS))])
    for i, (pattern, (_, received, _)) in enumerate(zip(PATTERNS, listeners, strict=True)):
        await received.wait_until(lambda events, i=i: any(
            event.data == f"sentinel {i}" for event in events))
        found = [event.data for event in received.events
                 if not str(event.data).startswith("sentinel")]
        assert found == [topic for topic in valid if matches(pattern, topic)], pattern


# -- delivery between nodes ---------------------------------------------------------------

async def test_a_node_gets_only_what_its_clients_subscribed_to(nodes, redis_server):
    a, received_a, _ = await nodes(subscribe=["n.a", "n.p.*"])
    b, received_b, _ = await nodes()
    await b.publish([PublishRequest("n.b", "not wanted"), PublishRequest("n.a", 1),
                     PublishRequest("n.p.x", 2), PublishRequest("n.p.x.y", "too deep")])
    await b.subscribe("n.end")
    await a.publish([PublishRequest("n.end", "end")])
    assert [event.data for event in await received_b.wait_for(1)] == ["end"]
    assert [event.data for event in await received_a.wait_for(2)] == [1, 2]
    with redis_server.client() as admin:
        assert set(admin.pubsub_channels("squall:event:*")) == {channel("n.a"), channel("n.end")}
        assert admin.pubsub_numpat() == 1
        assert len(admin.client_list(_type="pubsub")) == 2  # one per node
    await a.unsubscribe("n.a")
    await a.unsubscribe("n.p.*")
    await b.publish([PublishRequest("n.a", "after"), PublishRequest("n.end", "end 2")])
    await received_b.wait_for(2)
    with redis_server.client() as admin:
        assert set(admin.pubsub_channels("squall:event:*")) == {channel("n.end")}
        assert admin.pubsub_numpat() == 0
    assert [event.data for event in received_a.events] == [1, 2]


async def test_overlapping_subscriptions_deliver_each_event_once(nodes):
    _, received, _ = await nodes(subscribe=["o.x", "o.*", "o.>", "*.x"])
    b, _, _ = await nodes()
    outcomes = []
    for n in range(30):
        outcomes += await b.publish([PublishRequest("o.x", n)])
    events = await received.wait_for(30)
    await b.publish([PublishRequest("o.y", "end")])
    events = await received.wait_for(31)
    assert [event.id for event in events[:30]] == [outcome.id for outcome in outcomes]
    assert [event.data for event in events] == [*range(30), "end"]


async def test_a_subscription_is_live_when_subscribe_returns(nodes):
    a, received, _ = await nodes()
    b, _, _ = await nodes()
    for n in range(20):
        name = f"live.{n}" if n % 2 else f"live{n}.*"
        await a.subscribe(name)
        [outcome] = await b.publish([PublishRequest(f"live.{n}" if n % 2 else f"live{n}.x", n)])
        [event] = (await received.wait_for(n + 1))[n:]
        assert event.id == outcome.id


async def test_subscriber_counts_add_up_every_node(nodes):
    a, _, _ = await nodes()
    b, _, _ = await nodes()
    # a: two connections on c.x, one of them also on c.*; b: one on c.x, four on c.y
    local_a = {"c.x": 2, "c.*": 1, "c.y": 1, "c.z": 1}
    local_b = {"c.x": 1, "c.y": 4}
    a.local_counts = lambda names: {name: local_a.get(name, 0) for name in names}
    b.local_counts = lambda names: {name: local_b.get(name, 0) for name in names}
    for name in ("c.x", "c.*"):
        await a.subscribe(name)
    for name in ("c.x", "c.y"):
        await b.subscribe(name)
    await a._write_counts()
    await b._write_counts()
    assert await a.subscriber_counts(["c.x", "c.z"]) == {"c.x": 3, "c.z": 1, "c.y": 4}
    assert await b.subscriber_counts(["c.x", "c.y", "c.z"]) == {"c.x": 3, "c.y": 5, "c.z": 1}


async def test_data_msgpack_cannot_carry_is_a_client_error(nodes):
    broker, _, _ = await nodes()
    with pytest.raises(SquallError) as raised:
        await broker.publish([PublishRequest("big", 1), PublishRequest("big", 2**70)])
    assert (raised.value.code, raised.value.status) == ("invalid_body", 400)
    assert "events[1]" in raised.value.message
    nothing = await broker.history("big", None)  # nothing of the batch went out
    assert (nothing.events, nothing.recovered) == ([], True)


async def test_concurrent_publishes_share_script_calls_and_keep_their_order(
        nodes, redis_server):
    broker, received, _ = await nodes(subscribe=["group.*"])
    with redis_server.client() as admin:
        admin.config_resetstat()
    publishes = [broker.publish([PublishRequest(f"group.{n % 3}", n)]) for n in range(200)]
    publishes.append(broker.publish([PublishRequest("group.0", "dup", "key")] * 2))
    outcomes = await asyncio.gather(*publishes)
    seqs = [int(outcome.id.rsplit("-", 1)[1]) for [outcome] in outcomes[:200]]
    assert seqs == sorted(seqs) and len(set(seqs)) == 200  # in the order they came
    first, again = outcomes[200]
    assert (first.duplicate, again.duplicate, again.id) == (False, True, first.id)
    events = await received.wait_for(201)
    assert [event.data for event in events] == [*range(200), "dup"]
    with redis_server.client() as admin:
        calls = admin.info("commandstats")["cmdstat_evalsha"]["calls"]
    assert calls < 50  # grouped: 201 publishes, far fewer script calls


# -- faults -----------------------------------------------------------------------------

async def test_events_published_while_the_listener_was_cut_off_arrive_in_order_once(
        nodes, redis_server, caplog):
    _, received, gaps = await nodes(subscribe=["cut.x", "cut.*"])
    b, _, _ = await nodes()
    outcomes = []
    for n in range(5):
        outcomes += await b.publish([PublishRequest("cut.x", n)])
    await received.wait_for(5)
    with redis_server.client() as admin:
        assert admin.client_kill_filter(_type="pubsub") == 2  # both: the control channel
    for n in range(5, 25):  # while the listeners wait to reconnect
        outcomes += await b.publish([PublishRequest("cut.x" if n % 2 else "cut.y", n)])
    events = await received.wait_for(25)
    await b.publish([PublishRequest("cut.end", "end")])
    events = await received.wait_for(26)
    assert [event.id for event in events[:25]] == [outcome.id for outcome in outcomes]
    assert [event.data for event in events] == [*range(25), "end"]
    assert gaps.names == []
    assert "redis listener lost its connection" in caplog.text


async def test_a_gap_the_history_cannot_fill_is_reported(nodes, redis_server):
    _, received, gaps = await nodes(subscribe=["lost.t", "kept.t"], size=3)
    b, _, _ = await nodes(size=3)
    await b.publish([PublishRequest("lost.t", 0)])
    await received.wait_for(1)
    with redis_server.client() as admin:
        admin.client_kill_filter(_type="pubsub")
    await b.publish([PublishRequest("lost.t", n) for n in range(1, 6)]
                    + [PublishRequest("kept.t", "kept")])
    assert await gaps.wait() == ["lost.t"]
    events = await received.wait_for(2)
    assert [event.data for event in events] == [0, "kept"]


async def test_a_frozen_redis_makes_publishes_fail_in_time_then_recovers(nodes, redis_server):
    a, received, _ = await nodes(subscribe=["frozen"])
    b, _, _ = await nodes()
    await eventually(lambda: a.ready and b.ready, what="ready")
    redis_server.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await b.publish([PublishRequest("frozen", "lost?", "key-1")])
        assert time.monotonic() - started < TIMEOUT + 0.5
        assert not b.ready
        with pytest.raises(BrokerUnavailable):
            await a.history("frozen", None)
        await eventually(lambda: not a.ready, timeout=5 * TIMEOUT, what="a not ready")
    finally:
        redis_server.thaw()
    await eventually(lambda: a.ready and b.ready, timeout=10, what="ready again")
    [retry] = await b.publish([PublishRequest("frozen", "lost?", "key-1")])
    [after] = await b.publish([PublishRequest("frozen", "after")])
    events = await received.wait_for(2)
    assert [event.data for event in events] == ["lost?", "after"]
    assert [event.id for event in events] == [retry.id, after.id]


async def test_redis_losing_its_data_starts_a_new_epoch(nodes, redis_server):
    a, received, gaps = await nodes(subscribe=["epoch.t"])
    b, _, _ = await nodes()
    [old] = await b.publish([PublishRequest("epoch.t", "old")])
    await received.wait_for(1)
    redis_server.kill()
    redis_server.start()
    assert await gaps.wait() == ["epoch.t"]  # what Redis took with it cannot be replayed
    [new] = await b.publish([PublishRequest("epoch.t", "new")])
    assert new.id.rpartition("-")[0] != old.id.rpartition("-")[0]
    resumed = await b.history("epoch.t", old.id)  # everything since the loss, and the loss
    assert (resumed.recovered, [event.data for event in resumed.events]) == (False, ["new"])
    assert [event.data for event in (await b.history("epoch.t", None)).events] == ["new"]
    await eventually(lambda: a.ready, what="a ready")
    [later] = await b.publish([PublishRequest("epoch.t", "later")])
    events = await received.wait_for(3)
    assert [event.id for event in events] == [old.id, new.id, later.id]


async def test_once_ready_after_a_restart_no_command_fails_on_a_dead_connection(
        nodes, redis_server):
    """Idle command connections died with Redis; redis-py cannot tell a reset one from
    a live one until a command fails on it. Once the node is ready again, none is left."""
    broker, _, _ = await nodes(subscribe=["dead.t"])
    for _ in range(3):  # a pool of several connections, idle when Redis goes
        await asyncio.gather(*(broker.publish([PublishRequest("dead.t", n)]) for n in range(8)))
    redis_server.kill()
    await eventually(lambda: not broker.ready, what="unready")
    redis_server.start()
    await eventually(lambda: broker.ready, timeout=10, what="ready again")
    outcomes = await asyncio.gather(*(broker.history("dead.t", None) for _ in range(8)),
                                    *(broker.publish([PublishRequest("dead.t", n)])
                                      for n in range(8)), return_exceptions=True)
    assert [outcome for outcome in outcomes if isinstance(outcome, BaseException)] == []


async def test_a_broker_that_cannot_reach_redis_starts_unready_and_recovers(
        redis_server, redis_url, io_loop):
    redis_server.kill()
    broker = RedisBroker(redis_url, BrokerOptions(timeout=0.3))
    received = Received()
    await broker.start(received)
    try:
        assert not broker.ready
        with pytest.raises(BrokerUnavailable):
            await broker.publish([PublishRequest("down", 1)])
        with pytest.raises(BrokerUnavailable):
            await broker.subscribe("down")  # nothing can be promised: the client retries
        redis_server.start()
        await eventually(lambda: broker.ready, what="ready")
        await broker.subscribe("down")
        [outcome] = await broker.publish([PublishRequest("down", 2)])
        assert (await received.wait_for(1))[0].id == outcome.id
    finally:
        await broker.close()


# -- the node: subscribers that lost events are closed with 4009 ---------------------------

@pytest.fixture
def squall_settings(redis_url: str) -> Settings:
    return Settings(broker=redis_url, ping_interval=0, history_size=3, broker_timeout=TIMEOUT)


async def test_subscribers_that_lost_events_are_closed_with_4009(
        node, ws_connect, redis_server, caplog):
    caplog.set_level(logging.WARNING)
    lost = await ws_connect(query="topic=ws.lost")
    kept = await ws_connect(query="topic=ws.kept")
    await lost.recv_type("subscribed")
    await kept.recv_type("subscribed")
    with redis_server.client() as admin:
        admin.client_kill_filter(_type="pubsub")
    other = RedisBroker(redis_server.url(), BrokerOptions(retention=Retention(size=3)))
    try:
        await other.publish([PublishRequest("ws.lost", n) for n in range(5)]
                            + [PublishRequest("ws.kept", "kept")])
    finally:
        await other.close()
    assert await lost.closed_with() == 4009
    event = await kept.recv_type("event")
    assert event["data"] == "kept"
    assert node.hub.router.subscribers("ws.lost") == 0


async def test_broker_reconnects_are_counted_in_the_metrics(node, ws_connect, redis_server,
                                                           http_client, base_url):
    client = await ws_connect(query="topic=counted")
    await client.recv_type("subscribed")

    async def reconnects() -> float:
        response = await http_client.fetch(f"{base_url}/metrics")
        line = next(line for line in response.body.decode().splitlines()
                    if line.startswith("squall_broker_reconnects_total"))
        return float(line.split()[1])

    assert await reconnects() == 0
    for expected in (1, 2):
        with redis_server.client() as admin:
            assert admin.client_kill_filter(_type="pubsub") == 1
        await eventually(lambda expected=expected: node.broker.reconnects == expected
                         and node.broker.ready, what="the listener back")
        assert await reconnects() == expected


async def test_a_write_to_a_connection_closed_under_it_is_a_lost_connection():
    """uvloop (the default loop) raises RuntimeError for a write to a transport that
    closed under it, where asyncio's own loop drops the write; through redis-py that
    reached the broker as a bug with a traceback. It is a lost connection."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
    transport.close()
    await asyncio.sleep(0)
    try:
        with pytest.raises(FAILURES), closed_as_lost():
            try:
                transport.write(b"PING\r\n")
            except RuntimeError:
                raise  # uvloop: what redis-py passed on
            else:  # asyncio's own loop dropped the write: what uvloop says, by hand
                raise RuntimeError("unable to perform operation on <TCPTransport "
                                   "closed=True>; the handler is closed")
        with pytest.raises(RuntimeError, match="another bug"), closed_as_lost():
            raise RuntimeError("another bug")
    finally:
        server.close()


def test_the_private_names_of_redis_py_the_brokers_use_are_there():
    """Dropping idle connections without racing a command (redis_keys.disconnect_idle)
    reads redis-py's free lists: an upgrade that renames them must fail here."""
    from redis.asyncio import BlockingConnectionPool
    from redis.asyncio.cluster import ClusterNode

    pool = BlockingConnectionPool.from_url("redis://127.0.0.1:1/0")
    assert isinstance(pool._available_connections, list)
    node = ClusterNode("127.0.0.1", 1)
    assert len(node._free) == 0 and hasattr(node._free, "popleft")
