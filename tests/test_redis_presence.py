"""Presence on the Redis broker, several brokers in one process acting as nodes: what
the shared contract cannot show. A node that wrote its presence and was never started
is a node that died at once: it never refreshes. Real processes and ``kill -9``:
tests/test_presence_nodes.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from tornado.ioloop import IOLoop

from config.settings import Settings
from server.broker.base import OCCUPIED, VACATED, BrokerOptions, Disconnect, PresenceOptions
from server.broker.redis import RedisBroker
from tests.test_broker_contract import Heard, Received, add, gone
from tests.waiting import eventually

pytest_plugins = ["tests.redis_server"]
pytestmark = [pytest.mark.redis, pytest.mark.gen_test(timeout=30)]

TTL = 1.0


@pytest.fixture
def brokers(redis_url: str, io_loop: IOLoop) -> Iterator[Any]:
    """``await brokers(start=True, subscribe=[...])``: a RedisBroker and its callbacks."""
    made: list[RedisBroker] = []

    async def make(start: bool = True, subscribe: tuple[str, ...] = (), ttl: float = TTL,
                   debounce: float = 0.3) -> tuple[RedisBroker, Heard]:
        options = BrokerOptions(timeout=1.0, presence=PresenceOptions(
            topics=("room.>",), ttl=ttl, debounce=debounce))
        broker = RedisBroker(redis_url, options)
        made.append(broker)
        heard = Heard(broker)
        if start:
            await broker.start(Received())
            for name in subscribe:
                await broker.subscribe(name)
        return broker, heard

    yield make

    async def close_all() -> None:
        for broker in made:
            await broker.close()

    io_loop.run_sync(close_all)


async def test_presence_spans_nodes_and_joins_reach_every_node_in_one_order(brokers):
    a, heard_a = await brokers(subscribe=("room.x",))
    b, heard_b = await brokers(subscribe=("room.x",))
    await a.update_presence([add("room.x", "a1")])
    await b.update_presence([add("room.x", "b1"), add("room.x", "b2")])
    await a.update_presence([gone("room.x", "a1")])
    await b.update_presence([gone("room.x", "b1")])
    for heard in (heard_a, heard_b):
        await heard.until(lambda heard=heard: len(heard.notices) == 5)
        assert heard.notices == [("room.x", "join", "a1"), ("room.x", "join", "b1"),
                                 ("room.x", "join", "b2"), ("room.x", "leave", "a1"),
                                 ("room.x", "leave", "b1")]
    for broker in (a, b):
        listed = await broker.presence("room.x", 10)
        assert (listed.count, [entry["id"] for entry in listed.entries]) == (1, ["b2"])
    assert heard_a.lifecycle + heard_b.lifecycle == [("room.x", OCCUPIED)]


async def test_a_pattern_name_is_announced_once_to_each_node_that_holds_it(brokers):
    _, heard_a = await brokers(subscribe=("room.*", "room.>", ">"))
    b, _ = await brokers()
    await b.update_presence([add("room.*", "p1"), add("room.>", "p2")])
    await heard_a.until(lambda: len(heard_a.notices) == 2)
    await b.update_presence([add(">", "p3")])  # not announced: ">" is no presence topic
    await b.update_presence([add("room.*", "p4")])
    await heard_a.until(lambda: len(heard_a.notices) == 3)
    assert heard_a.notices == [("room.*", "join", "p1"), ("room.>", "join", "p2"),
                               ("room.*", "join", "p4")]


async def test_a_disconnect_reaches_every_node_once(brokers):
    a, heard_a = await brokers()
    b, heard_b = await brokers()
    request = Disconnect(None, "c-42", 4321, "bye")
    await a.disconnect(request)
    await heard_b.until(lambda: bool(heard_b.disconnects))
    await b.disconnect(Disconnect("bob", None, 4010, ""))
    await heard_a.until(lambda: len(heard_a.disconnects) == 2)
    assert heard_a.disconnects == [request, Disconnect("bob", None, 4010, "")]
    assert heard_b.disconnects == [request, Disconnect("bob", None, 4010, "")]


async def test_the_survivors_take_a_dead_nodes_clients_out_within_the_ttl(brokers,
                                                                        redis_server):
    survivor, heard = await brokers(subscribe=("room.d",))
    survivor.local_names = lambda: ["room.d"]  # what the node's router would say
    dead, _ = await brokers(start=False)  # writes once, never refreshes: as if killed
    await survivor.update_presence([add("room.d", "s1")])
    await dead.update_presence([add("room.d", "d1"), add("room.d", "d2"), add("alone", "d3")])
    await heard.until(lambda: len(heard.notices) == 3)
    started = asyncio.get_running_loop().time()
    # the survivor sweeps after TTL of contact; the dead node's entries lapse in TTL
    await heard.until(lambda: len(heard.notices) == 5, timeout=3 * TTL + 2)
    assert sorted(heard.notices[3:]) == [("room.d", "leave", "d1"), ("room.d", "leave", "d2")]
    await heard.until(lambda: ("alone", VACATED) in heard.lifecycle)
    assert asyncio.get_running_loop().time() - started < 2 * TTL + 1
    assert ("room.d", VACATED) not in heard.lifecycle
    assert [entry["id"] for entry in (await survivor.presence("room.d", 10)).entries] == ["s1"]
    with redis_server.client() as admin:
        assert not [key for key in admin.keys("squall:presence:*") if b"node:" in key
                    and dead.node_id.encode() in key]


async def test_entries_of_a_dead_node_stop_counting_before_they_are_removed(brokers):
    dead, _ = await brokers(start=False, ttl=TTL)
    await dead.update_presence([add("room.l", "d1")])
    assert (await dead.presence("room.l", 10)).count == 1
    await eventually(lambda: _empty(dead, "room.l"), timeout=2 * TTL,
                     what="the entries of a node that stopped refreshing stop counting")


async def _empty(broker: RedisBroker, name: str) -> bool:
    return (await broker.presence(name, 10)).count == 0


async def test_a_node_whose_entries_were_lost_writes_them_again(brokers, redis_server):
    node, _ = await brokers()
    lost: list[list[str]] = []
    node.local_names = lambda: ["room.w"]
    node.on_presence_lost = lost.append
    await node.update_presence([add("room.w", "c1")])
    with redis_server.client() as admin:  # as a survivor that took the node for dead would
        admin.delete(f"squall:presence:{{room.w}}:node:{node.node_id}")
    await eventually(lambda: lost, timeout=2 * TTL, what="the refresh noticing the loss")
    assert lost[0] == ["room.w"]


async def test_presence_state_expires_on_its_own(brokers, redis_server):
    dead, _ = await brokers(start=False, debounce=5.0)
    await dead.update_presence([add("room.e", "c1"), add("room.f", "c2")])
    await dead.update_presence([gone("room.f", "c2")])  # room.f: vacating for 5 s
    keep = 2 * TTL * 1000
    with redis_server.client() as admin:
        keys = admin.keys("squall:presence:*")
        assert {b"squall:presence:nodes", b"squall:presence:vacating"} <= set(keys)
        for key in keys:
            assert 0 < admin.pttl(key) <= keep + 5000, key


# -- a node's changes past their bound while Redis does not answer ------------------------


@pytest.fixture
def squall_settings(redis_url: str) -> Settings:
    return Settings(broker=redis_url, ping_interval=0, broker_timeout=0.5,
                    presence_topics=("room.>",))


async def test_changes_past_their_bound_become_one_rewrite_that_misses_nothing(
        node, ws_connect, redis_server, http_client, base_url):
    """Redis frozen while clients leave: past ``max_pending`` the writer drops its
    changes and, once Redis answers, writes the node's whole presence anew, so that the
    entries of those who left are removed (and their leaves announced) all the same."""
    writer = node.presence
    writer.max_pending = 2
    watcher = await ws_connect()
    await watcher.subscribe("room.q")
    ghosts = [await ws_connect() for _ in range(3)]
    for ghost in ghosts:
        await ghost.subscribe("room.q")
    joins = [await watcher.recv_type("join") for _ in ghosts]
    redis_server.freeze()
    try:
        for ghost in ghosts:
            await ghost.socket.close()
        await eventually(lambda: writer.rewrites == 1, what="the changes dropped")
        assert len(writer) == 0
    finally:
        redis_server.thaw()
    leaves = [await watcher.recv_type("leave", timeout=10) for _ in ghosts]
    assert sorted(leave["client"]["id"] for leave in leaves) == sorted(
        join["client"]["id"] for join in joins)
    response = await http_client.fetch(f"{base_url}/v1/topics/room.q/presence")
    listed = json.loads(response.body)
    assert (listed["count"], len(listed["clients"])) == (1, 1)
    assert writer.rewrites == 1 and len(writer) == 0
