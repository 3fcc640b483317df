"""The cluster broker on a real Redis Cluster (3 masters, a replica each, shared by
the session): what the shared contract cannot show.

One pub/sub connection per master whatever a node subscribes to; every key a script
touches declared in KEYS and every key of a topic in the slot of its first segment;
patterns whose first segment is a wildcard delivered live but never resumed; the
durability setting; listings and counts across nodes.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import ResponseError
from tornado.ioloop import IOLoop

from config.settings import Settings, SettingsError, load_settings
from server.broker.base import BrokerOptions, PresenceChange, PresenceOptions, PublishRequest
from server.broker.redis_cluster import RedisClusterBroker, first_segment, parse_cluster_url
from server.broker.redis_presence import CLUSTER_WIRE
from server.errors import BrokerUnavailable
from server.history import Retention
from tests.test_broker_contract import Received
from tests.test_redis_broker import Gaps
from tests.waiting import eventually

if TYPE_CHECKING:
    from tests.cluster_nodes import LocalCluster

pytest_plugins = ["tests.redis_cluster"]
pytestmark = [pytest.mark.redis, pytest.mark.cluster, pytest.mark.gen_test(timeout=60)]

TIMEOUT = 3.0  # a fresh cluster client's first answers take over 1 s on a loaded machine


@pytest.fixture
def nodes(cluster_url: str, io_loop: IOLoop) -> Iterator[Any]:
    """``await nodes(subscribe=[...], **options)``: a started cluster broker, its events
    and its gaps."""
    made: list[RedisClusterBroker] = []

    async def make(subscribe: tuple[str, ...] | list[str] = (), size: int = 100,
                   max_topics: int = 10_000, **options: Any,
                   ) -> tuple[RedisClusterBroker, Received, Gaps]:
        options.setdefault("timeout", TIMEOUT)
        broker = RedisClusterBroker(cluster_url, BrokerOptions(
            retention=Retention(size=size, max_topics=max_topics), **options))
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

    io_loop.run_sync(close_all, timeout=60)


async def admin(node: Any) -> Redis:
    return Redis(host="127.0.0.1", port=node.port, socket_timeout=5)


# -- names and places -------------------------------------------------------------------

@pytest.mark.parametrize(("name", "segment"), [
    ("orders", "orders"), ("orders.eu.created", "orders"), ("orders.*", "orders"),
    ("orders.>", "orders"), ("user:42.in-box", "user:42"), ("*.created", None),
    (">", None), ("*", None),
])
def test_the_first_segment_decides_the_slot(name, segment):
    assert first_segment(name) == segment


@pytest.mark.parametrize(("url", "seeds", "credentials", "tls"), [
    ("redis+cluster://10.0.0.1:7000", [("10.0.0.1", 7000)], {}, False),
    ("redis+cluster://a:7000,b:7001/", [("a", 7000), ("b", 7001)], {}, False),
    ("rediss+cluster://u:p%40ss@a:7000,b:7001", [("a", 7000), ("b", 7001)],
     {"username": "u", "password": "p@ss"}, True),
    ("redis+cluster://:secret@a:7000", [("a", 7000)], {"password": "secret"}, False),
])
def test_cluster_urls(url, seeds, credentials, tls):
    assert parse_cluster_url(url) == (seeds, credentials, tls)


@pytest.mark.parametrize("url", ["redis+cluster://", "redis+cluster://host",
                                 "redis+cluster://host:port"])
def test_cluster_urls_without_host_and_port_are_refused(url):
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_cluster_url(url)


def test_the_broker_setting_takes_cluster_urls():
    assert load_settings(["--broker", "redis+cluster://a:7000,b:7001"]).broker == (
        "redis+cluster://a:7000,b:7001")
    with pytest.raises(SettingsError, match=r"is no cluster URL: .*HOST:PORT"):
        load_settings(["--broker", "redis+cluster://a,b"])


async def test_every_key_of_a_topic_is_in_the_slot_of_its_first_segment(
        nodes, redis_cluster: LocalCluster):
    broker, _, _ = await nodes()
    topics = ["keys.a", "keys.b.c", "user:7.inbox", "user:8.inbox", "solo"]
    for n, topic in enumerate(topics):
        await broker.publish([PublishRequest(topic, n, f"key {n}")])
    found = 0
    for master in redis_cluster.masters():
        client = await admin(master)
        async with client:
            async for raw in client.scan_iter(match="squall:*stream:*", count=1000):
                key = raw.decode()
                topic = key.split(":stream:", 1)[1]
                assert key_slot(raw) == key_slot(topic.split(".")[0].encode()), key
                found += 1
            async for raw in client.scan_iter(match="squall:*idem:*", count=1000):
                topic = raw.decode().split(":idem:", 1)[1].split(" ")[0]
                assert key_slot(raw) == key_slot(topic.split(".")[0].encode()), raw
    assert found == len(topics)
    slots = {key_slot(topic.split(".")[0].encode()) for topic in topics}
    owners = {redis_cluster.master_of_slot(slot).port for slot in slots}
    assert len(owners) > 1  # first segments spread over the masters


_MONITOR = re.compile(r"\[(\d+) (.*?)\] (.*)")
_ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')


async def test_scripts_touch_only_the_keys_they_are_given(cluster_url, redis_cluster):
    """MONITOR on every master: each command a script runs names only keys that the
    script call declared in KEYS (what Redis Cluster requires of scripts)."""
    broker = RedisClusterBroker(cluster_url, BrokerOptions(
        retention=Retention(max_topics=2), timeout=5.0,
        presence=PresenceOptions(topics=("scripted.>",))))
    await broker.start(Received())
    monitors = []
    try:
        await broker.subscribe("scripted.*")
        for master in redis_cluster.masters():
            client = await admin(master)
            monitor = client.monitor()
            await monitor.connect()
            await monitor.connection.send_command("MONITOR")
            assert await monitor.connection.read_response() in (b"OK", "OK")
            monitors.append((client, monitor))
        for n in range(6):  # past max topics: topics are forgotten, then come back
            await broker.publish([PublishRequest(f"scripted.t{n % 4}", n, f"k{n % 3}"),
                                  PublishRequest(f"other{n}.x", n)])
        await broker.history("scripted.*", None)
        await broker.history("scripted.t1", "nope-1")
        await broker.last_ids(["scripted.t1", "other1.x"])
        await broker.retained_topics()
        entry = b'{"id":"c1","sub":"u1","node":"n","connected_at":1,"info":null}'
        await broker.update_presence([PresenceChange("scripted.t1", "c1", entry),
                                      PresenceChange("scripted.*", "c1", entry)])
        await broker.presence("scripted.t1", 10)
        await broker.update_presence([PresenceChange("scripted.t1", "c1", None)])
    finally:
        await broker.close()
    try:
        commands = [command for _, monitor in monitors
                    for command in await read_monitor(monitor)]
    finally:
        for client, _ in monitors:
            await client.aclose()
    checked = 0
    probe = await admin(redis_cluster.masters()[0])
    async with probe:
        declared: set[str] = set()
        for source, args in commands:
            name = args[0].upper()
            if source != "lua":
                if name in ("EVAL", "EVALSHA"):
                    declared = set(args[3:3 + int(args[2])])
                continue
            try:
                keys = {str(key) for key in await probe.command_getkeys(*args)}
            except ResponseError:
                continue  # a command without keys (TIME, PUBSUB)
            assert keys <= declared, (args, declared)
            checked += 1
    assert checked > 50


async def read_monitor(monitor: Any) -> list[tuple[str, list[str]]]:
    """Every command the monitor saw so far: (client or "lua", its arguments)."""
    seen = []
    while True:
        try:
            response = await asyncio.wait_for(monitor.connection.read_response(), 0.5)
        except TimeoutError:
            return seen
        text = response.decode(errors="replace") if isinstance(response, bytes) else response
        found = _MONITOR.match(text.split(" ", 1)[1])
        if found:
            seen.append((found.group(2), [arg.replace('\\"', '"')
                                          for arg in _ARG.findall(found.group(3))]))


# -- the listener ------------------------------------------------------------------------

async def test_one_listener_connection_per_master_whatever_it_subscribes(
        nodes, redis_cluster: LocalCluster):
    names = [f"many{n}.t" for n in range(30)] + ["many1.*", "many2.>", "*.t"]
    # (33 subscribes, each confirmed by every master a pattern needs)
    _, received, _ = await nodes(subscribe=names, timeout=5.0)
    b, _, _ = await nodes()
    # b subscribes nothing but the control and notices channels of the presence slot
    presence = redis_cluster.master_of_slot(key_slot(CLUSTER_WIRE.control))
    for master in redis_cluster.masters():
        client = await admin(master)
        async with client:
            expected = 2 if master == presence else 1
            assert len(await client.client_list(_type="pubsub")) == expected
    outcomes = await b.publish([PublishRequest(f"many{n}.t", n) for n in range(30)])
    events = await received.wait_for(30)
    await asyncio.sleep(0.2)  # a second copy (the topic, its segment, its slot) would come
    assert sorted(event.id for event in received.events) == sorted(o.id for o in outcomes)
    assert sorted(event.data for event in events) == list(range(30))


async def test_a_pattern_that_spans_slots_is_live_but_never_resumed(nodes, redis_cluster):
    a, received, gaps = await nodes(subscribe=["*.span", "spanned.*"])
    b, _, _ = await nodes()
    topics = [f"s{n}.span" for n in range(8)]
    published = await b.publish([PublishRequest(topic, topic) for topic in topics])
    await received.wait_for(len(topics))
    assert {event.topic for event in received.events} == set(topics)
    since = published[0].id
    assert (await a.history("*.span", since)).recovered is False
    assert (await a.history("*.span", since)).events == []
    everything = await a.history("*.span", None)
    assert (everything.recovered, {event.data for event in everything.events}) == (
        True, set(topics))
    # cut the listener off: the slot-spanning name cannot be caught up, the other can
    for master in redis_cluster.masters():
        client = await admin(master)
        async with client:
            await client.client_kill_filter(_type="pubsub")
    [missed] = await b.publish([PublishRequest("spanned.x", "missed")])
    assert "*.span" in await gaps.wait()
    await received.wait_until(lambda events: any(e.id == missed.id for e in events))
    assert set(gaps.names) == {"*.span"}  # told by each master's session


async def test_a_moved_slot_tells_the_listener_which_resubscribes_where_it_went(
        nodes, redis_cluster: LocalCluster):
    a, received, gaps = await nodes(subscribe=["moving.t", "moving.*"])
    b, _, _ = await nodes()
    slot = key_slot(b"moving")
    source = redis_cluster.master_of_slot(slot)
    target = next(node for node in redis_cluster.masters() if node != source)
    [before] = await b.publish([PublishRequest("moving.t", "before")])
    await received.wait_for(1)
    await move_slot(redis_cluster, slot, source, target)
    try:
        await eventually(lambda: a.ready, what="the listener moved with the slot")
        outcomes = [(await b.publish([PublishRequest("moving.t", n)]))[0] for n in range(5)]
        events = await received.wait_for(6)
        assert [event.id for event in events] == [before.id, *(o.id for o in outcomes)]
        assert gaps.names == []
    finally:
        await move_slot(redis_cluster, slot, target, source)


async def move_slot(cluster: LocalCluster, slot: int, source: Any, target: Any) -> None:
    """Migrate one slot and its keys, as ``redis-cli --cluster reshard`` does."""
    source_id, target_id = cluster.node_id(source), cluster.node_id(target)
    src, dst = await admin(source), await admin(target)
    async with src, dst:
        await dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        await src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while keys := await src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            await src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000,
                                      "KEYS", *keys)
        await dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        await src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    await eventually(lambda: cluster.master_of_slot(slot) == target, what="the slot moved")


# -- durability --------------------------------------------------------------------------

async def test_a_publish_waits_for_its_replicas_or_is_unavailable(nodes):
    waiting, received, _ = await nodes(subscribe=["durable.t"], wait_replicas=1)
    [first] = await waiting.publish([PublishRequest("durable.t", 1, "key-1")])
    too_many, _, _ = await nodes(wait_replicas=2)  # every master has one replica here
    with pytest.raises(BrokerUnavailable):
        await too_many.publish([PublishRequest("durable.t", 2, "key-2")])
    [again] = await waiting.publish([PublishRequest("durable.t", 2, "key-2")])
    assert again.duplicate  # the unconfirmed publish happened: its key answers the retry
    [repeat] = await waiting.publish([PublishRequest("durable.t", 1, "key-1")])
    assert (repeat.duplicate, repeat.id) == (True, first.id)
    events = await received.wait_for(2)
    assert [event.data for event in events] == [1, 2]


# -- listings ----------------------------------------------------------------------------

async def test_counts_retained_topics_and_last_ids_span_the_masters(nodes):
    a, _, _ = await nodes()
    b, _, _ = await nodes()
    local_a = {"list1.x": 2, "list2.*": 1, "list2.z": 1}
    local_b = {"list1.x": 1, "list3.y": 4}
    a.local_counts = lambda names: {name: local_a.get(name, 0) for name in names}
    b.local_counts = lambda names: {name: local_b.get(name, 0) for name in names}
    for name in ("list1.x", "list2.*"):
        await a.subscribe(name)
    for name in ("list1.x", "list3.y"):
        await b.subscribe(name)
    await a._write_counts()
    await b._write_counts()
    assert await a.subscriber_counts(["list1.x", "list2.z"]) == {
        "list1.x": 3, "list2.z": 1, "list3.y": 4}
    outcomes = await b.publish([PublishRequest(f"list{n}.x", n) for n in range(6)])
    assert sorted(await a.retained_topics()) == [f"list{n}.x" for n in range(6)]
    assert await a.last_ids(["list0.x", "list5.x", "list9.x"]) == {
        "list0.x": outcomes[0].id, "list5.x": outcomes[5].id}


@pytest.fixture
def squall_settings(cluster_url: str) -> Settings:
    return Settings(broker=cluster_url, ping_interval=0, broker_timeout=TIMEOUT)


async def test_a_node_on_the_cluster_serves_topics_and_readiness(node, http_client, base_url,
                                                                 ws_connect):
    client = await ws_connect(query="topic=served.t&topic=served.*")
    for _ in range(2):
        await client.recv_type("subscribed")
    ready = await http_client.fetch(f"{base_url}/readyz", raise_error=False)
    assert ready.code == 200
    response = await http_client.fetch(f"{base_url}/v1/topics/served.t/events",
                                       method="POST", body="1",
                                       headers={"Content-Type": "application/json"})
    assert response.code == 202
    event = await client.recv_type("event")
    assert event["data"] == 1
    listed = json.loads((await http_client.fetch(f"{base_url}/v1/topics")).body)
    assert listed == {"topics": [{"topic": "served.t", "subscribers": 1,
                                  "last_id": event["id"]}]}
