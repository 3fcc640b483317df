"""The Broker contract (server/broker/base.py), one suite run on every broker.

Each test gets brokers from ``make_broker``, parametrized over the memory broker, the
Redis broker on a real redis-server and the cluster broker on a real Redis Cluster
(tests/redis_cluster.py). Events are waited for with timeouts; the
only sleeps are the few that let a ttl or a dedupe window pass.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import pytest
from tornado.ioloop import IOLoop

from server.broker.base import (
    OCCUPIED,
    VACATED,
    Broker,
    BrokerOptions,
    Disconnect,
    PresenceChange,
    PresenceOptions,
    Published,
    PublishRequest,
    create_broker,
)
from server.errors import BrokerUnavailable
from server.events import Event, EventId
from server.history import Replay, Retention

pytest_plugins = ["tests.redis_server", "tests.redis_cluster"]
pytestmark = pytest.mark.gen_test(timeout=30)

WAIT = 5.0


class Received:
    """An ``on_event`` that records events and lets a test wait for them."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._arrived = asyncio.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        self._arrived.set()

    async def wait_until(self, condition: Callable[[list[Event]], bool],
                         timeout: float = WAIT) -> list[Event]:
        async with asyncio.timeout(timeout):
            while not condition(self.events):
                self._arrived.clear()
                await self._arrived.wait()
        return self.events

    async def wait_for(self, count: int, timeout: float = WAIT) -> list[Event]:
        return await self.wait_until(lambda events: len(events) >= count, timeout)


MakeBroker = Callable[..., Awaitable[tuple[Broker, Received]]]


URLS = {"memory": None, "redis": "redis_url", "cluster": "cluster_url"}


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis),
                        pytest.param("cluster", marks=[pytest.mark.redis, pytest.mark.cluster])])
def make_broker(request: pytest.FixtureRequest, io_loop: IOLoop) -> Iterator[MakeBroker]:
    """``await make_broker(subscribe=[names], size=.., ttl=.., ...)``: a started broker."""
    made: list[Broker] = []
    fixture = URLS[request.param]
    url = request.getfixturevalue(fixture) if fixture else "memory://"

    async def make(subscribe: Sequence[str] = (), size: int = 100, ttl: float = 300.0,
                   max_topics: int = 10_000, dedupe_window: float = 300.0,
                   max_replay: int = 10_000, **options: Any) -> tuple[Broker, Received]:
        retention = Retention(size=size, ttl=ttl, max_topics=max_topics,
                              max_replay=max_replay)
        broker = create_broker(url, BrokerOptions(retention=retention,
                                                  dedupe_window=dedupe_window, **options))
        made.append(broker)
        received = Received()
        await broker.start(received)
        for name in subscribe:
            await broker.subscribe(name)
        return broker, received

    yield make

    async def close_all() -> None:
        for broker in made:
            await broker.close()

    io_loop.run_sync(close_all)


async def publish_each(broker: Broker, topic: str, values: Sequence[Any]) -> list[Published]:
    return [(await broker.publish([PublishRequest(topic, value)]))[0] for value in values]


def found(replay: Replay) -> tuple[list[Event], bool]:
    """A replay's events and whether it recovered (without its position)."""
    return replay.events, replay.recovered


def seq(event_id: str) -> int:
    parsed = EventId.parse(event_id)
    assert parsed is not None, event_id
    return parsed.seq


# -- delivery and ids -------------------------------------------------------------------


async def test_events_reach_on_event_in_publish_order_each_once(make_broker):
    broker, received = await make_broker(subscribe=["c.a", "c.b", "c.*", "c.>"])
    published = []
    for n in range(20):
        published += await broker.publish([PublishRequest("c.a" if n % 2 else "c.b", n)])
    published += await broker.publish([PublishRequest("c.b", n) for n in range(20, 30)])
    events = await received.wait_for(30)
    assert [event.id for event in events] == [outcome.id for outcome in published]
    assert [event.data for event in events] == list(range(30))
    assert [(event.topic, event.ts) for event in events] == [
        (outcome.topic, outcome.ts) for outcome in published]
    await broker.publish([PublishRequest("c.end", "end")])
    assert [event.data for event in await received.wait_for(31)][30:] == ["end"]


async def test_ids_increase_within_and_across_topics(make_broker):
    broker, _ = await make_broker()
    outcomes = []
    for n in range(10):
        outcomes += await broker.publish([PublishRequest(f"ids.t{n % 3}", n),
                                          PublishRequest("ids.other", n)])
    seqs = [seq(outcome.id) for outcome in outcomes]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert len({outcome.id.rpartition("-")[0] for outcome in outcomes}) == 1


async def test_data_comes_back_exactly_as_published(make_broker):
    broker, received = await make_broker(subscribe=["data"])
    values = [None, True, 0, -1, 2**63 - 1, 1.5, "héllo", [], {}, [1, [2, {"a": None}]],
              {"nested": {"list": [1, 2.5, "x"]}}, b"\x00bytes"]
    await publish_each(broker, "data", values)
    assert [event.data for event in await received.wait_for(len(values))] == values
    replay = await broker.history("data", None)
    assert [event.data for event in replay.events] == values


# -- history ----------------------------------------------------------------------------


async def test_history_since_returns_every_retained_event_after_it(make_broker):
    broker, _ = await make_broker(size=50)
    outcomes = await publish_each(broker, "h.a", list(range(10)))
    await publish_each(broker, "h.b", ["other"])
    everything = await broker.history("h.a", None)
    assert everything.recovered
    assert [event.id for event in everything.events] == [outcome.id for outcome in outcomes]
    after = await broker.history("h.a", outcomes[3].id)
    assert after.recovered and [event.data for event in after.events] == list(range(4, 10))
    limited = await broker.history("h.a", outcomes[3].id, limit=2)
    assert limited.recovered and [event.data for event in limited.events] == [4, 5]
    newest = await broker.history("h.a", outcomes[-1].id)
    assert found(newest) == ([], True)


async def test_history_since_an_id_of_another_topic(make_broker):
    broker, _ = await make_broker()
    [first] = await publish_each(broker, "x.one", ["a"])
    await publish_each(broker, "x.two", ["b", "c"])
    replay = await broker.history("x.two", first.id)
    assert replay.recovered and [event.data for event in replay.events] == ["b", "c"]
    quiet = await broker.history("x.never", first.id)
    assert quiet.recovered and quiet.events == []


@pytest.mark.parametrize("since", ["", "nope", "abc", "-1", "k3x9-", "k3x9-1x", "a-b-c",
                                   "x" * 100, "zz-1\u00b2", "zz-\u0661"])
async def test_history_malformed_or_unknown_ids_are_not_recovered(make_broker, since):
    broker, _ = await make_broker()
    await publish_each(broker, "bad.since", [1, 2])
    assert found(await broker.history("bad.since", since)) == ([], False)
    assert found(await broker.history("bad.*", since)) == ([], False)


async def test_history_since_an_id_spelled_with_a_leading_zero_is_not_recovered(make_broker):
    """No broker gives out ``<epoch>-01``: it is not ``<epoch>-1`` (a client that made it
    up must not be told it resumed)."""
    broker, _ = await make_broker()
    first, _ = await publish_each(broker, "zero.t", [1, 2])
    epoch, number = first.id.rpartition("-")[0], seq(first.id)
    for since in (f"{epoch}-0{number}", f"{epoch}-00"):
        assert found(await broker.history("zero.t", since)) == ([], False), since
    replay = await broker.history("zero.t", f"{epoch}-{number}")
    assert replay.recovered and [event.data for event in replay.events] == [2]


async def test_history_of_an_id_from_the_future_is_not_recovered(make_broker):
    broker, _ = await make_broker()
    [outcome] = await publish_each(broker, "future", [1])
    epoch = outcome.id.rpartition("-")[0]
    future = f"{epoch}-{seq(outcome.id) + 1000}"
    assert found(await broker.history("future", future)) == ([], False)
    # seqs no broker gives out, up to past a Redis stream id's 64 bits
    for huge in (2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**40):
        assert found(await broker.history("future", f"{epoch}-{huge}")) == ([], False)
        assert found(await broker.history("*", f"{epoch}-{huge}")) == ([], False)


async def test_history_trimmed_past_since_is_not_recovered(make_broker):
    broker, _ = await make_broker(size=3)
    outcomes = await publish_each(broker, "trim", list(range(6)))
    assert found(await broker.history("trim", outcomes[0].id)) == ([], False)
    assert found(await broker.history("trim", outcomes[1].id)) == ([], False)
    kept = await broker.history("trim", outcomes[2].id)
    assert kept.recovered and [event.data for event in kept.events] == [3, 4, 5]
    assert [event.data for event in (await broker.history("trim", None)).events] == [3, 4, 5]




async def test_one_call_past_the_history_size_keeps_each_topics_newest(make_broker):
    broker, _ = await make_broker(size=3)
    requests = [PublishRequest(f"trim.{'ab'[n % 2]}", n) for n in range(14)]
    outcomes = await broker.publish(requests)  # one call: Redis trims once per topic
    assert [event.data for event in (await broker.history("trim.a", None)).events] == [
        8, 10, 12]
    assert [event.data for event in (await broker.history("trim.b", None)).events] == [
        9, 11, 13]
    assert found(await broker.history("trim.a", outcomes[4].id)) == ([], False)
    kept = await broker.history("trim.b", outcomes[7].id)
    assert kept.recovered and [event.data for event in kept.events] == [9, 11, 13]
    # a duplicate in a later call adds nothing, and the trimmed history stays as it was
    again = await broker.publish([PublishRequest("trim.a", 12, idempotency_key="k"),
                                  PublishRequest("trim.a", 12, idempotency_key="k")])
    assert [outcome.duplicate for outcome in again] == [False, True]
    assert again[0].id == again[1].id
    assert [event.data for event in (await broker.history("trim.a", None)).events] == [
        10, 12, 12]
async def test_history_older_than_the_ttl_is_dropped(make_broker):
    broker, _ = await make_broker(ttl=0.3)
    old = await publish_each(broker, "ttl.a", ["old"])
    await publish_each(broker, "ttl.gone", ["old"])
    await asyncio.sleep(0.5)
    fresh = await publish_each(broker, "ttl.a", ["fresh"])
    assert [event.data for event in (await broker.history("ttl.a", None)).events] == ["fresh"]
    since_old = await broker.history("ttl.a", old[0].id)
    assert since_old.recovered and [event.data for event in since_old.events] == ["fresh"]
    assert found(await broker.history("ttl.a", fresh[0].id)) == ([], True)
    # "old" on ttl.a was dropped after the since below: the gap cannot be filled
    before = EventId(old[0].id.rpartition("-")[0], seq(old[0].id) - 1)
    assert found(await broker.history("ttl.a", str(before))) == ([], False)
    assert found(await broker.history("ttl.gone", str(before))) == ([], False)
    assert await broker.retained_topics() == ["ttl.a"]
    assert await broker.last_ids(["ttl.a", "ttl.gone"]) == {"ttl.a": fresh[0].id}


async def test_an_id_of_a_forgotten_epoch_gets_everything_retained_now(make_broker):
    broker, _ = await make_broker()
    outcomes = await publish_each(broker, "lost.a", [1, 2])
    await publish_each(broker, "lost.b", [3])
    epoch = outcomes[0].id.rpartition("-")[0]
    forgotten = ("z" if epoch[0] != "z" else "y") + epoch[1:] + "-1"
    topic = await broker.history("lost.a", forgotten)
    assert (topic.recovered, [event.data for event in topic.events]) == (False, [1, 2])
    pattern = await broker.history("lost.*", forgotten)
    assert (pattern.recovered, [event.data for event in pattern.events]) == (False, [1, 2, 3])
    assert found(await broker.history("lost.none", forgotten)) == ([], False)


async def test_position_is_where_the_next_event_starts(make_broker):
    broker, _ = await make_broker()
    start = await broker.position("pos.t")
    assert found(await broker.history("pos.t", str(start))) == ([], True)
    [first] = await publish_each(broker, "pos.t", ["a"])
    assert seq(first.id) > start.seq and first.id.rpartition("-")[0] == start.epoch
    assert str(await broker.position("pos.t")) == first.id
    replay = await broker.history("pos.t", str(start))
    assert [event.id for event in replay.events] == [first.id]
    assert replay.last_id == first.id
    assert (await broker.history("pos.*", None)).last_id == first.id


async def test_a_resume_longer_than_the_replay_cap_is_not_recovered(make_broker):
    broker, _ = await make_broker(max_replay=5)
    start = await broker.position("cap.*")
    for n in range(4):
        await publish_each(broker, f"cap.{n}", [n, n + 10])
    assert found(await broker.history("cap.*", str(start))) == ([], False)
    paged = await broker.history("cap.*", str(start), limit=3)
    assert paged.recovered and [event.data for event in paged.events] == [0, 10, 1]
    oldest = await broker.history("cap.*", None)
    assert oldest.recovered and [event.data for event in oldest.events] == [0, 10, 1, 11, 2]
    middle = await broker.history("cap.*", paged.events[-1].id)
    assert middle.recovered and [event.data for event in middle.events] == [11, 2, 12, 3, 13]


async def test_history_size_zero_keeps_nothing_but_knows_what_was_lost(make_broker):
    broker, _ = await make_broker(size=0)
    [first, _] = await publish_each(broker, "none", [1, 2])
    assert found(await broker.history("none", None)) == ([], True)
    assert found(await broker.history("none", first.id)) == ([], False)
    assert await broker.retained_topics() == []


async def test_least_recently_published_topics_are_forgotten_past_max_topics(make_broker):
    broker, _ = await make_broker(max_topics=3)
    [first] = await publish_each(broker, "many.0", ["first"])
    before = str(EventId(first.id.rpartition("-")[0], seq(first.id) - 1))
    outcomes = [(await publish_each(broker, f"many.{n}", [n]))[0] for n in range(1, 5)]
    assert sorted(await broker.retained_topics()) == ["many.2", "many.3", "many.4"]
    assert found(await broker.history("many.0", before)) == ([], False)
    assert found(await broker.history("many.*", before)) == ([], False)
    assert found(await broker.history("many.0", first.id)) == ([], True)  # nothing came after it
    assert [event.data for event in (await broker.history("many.4", before)).events] == [4]
    assert found(await broker.history("many.>", first.id)) == ([], False)  # many.1's event is gone
    after_gone = await broker.history("many.>", outcomes[0].id)
    assert after_gone.recovered and [event.data for event in after_gone.events] == [2, 3, 4]


async def test_pattern_history_merges_matching_topics_in_id_order(make_broker):
    broker, _ = await make_broker()
    [start] = await publish_each(broker, "p.start", ["s"])
    for n in range(9):
        await broker.publish([PublishRequest(f"p.t{n % 3}", n),
                              PublishRequest(f"q.t{n % 3}", -n)])
    replay = await broker.history("p.*", start.id)
    assert replay.recovered
    assert [event.data for event in replay.events] == list(range(9))
    assert [event.topic for event in replay.events][:3] == ["p.t0", "p.t1", "p.t2"]
    tail = await broker.history("p.>", replay.events[4].id, limit=2)
    assert tail.recovered and [event.data for event in tail.events] == [5, 6]
    everything = await broker.history("p.*", None)
    assert [event.data for event in everything.events] == ["s", *range(9)]
    assert found(await broker.history("nothing.*", start.id)) == ([], True)


async def test_pattern_history_with_one_topic_trimmed_is_not_recovered(make_broker):
    broker, _ = await make_broker(size=2)
    [start] = await publish_each(broker, "pt.start", ["s"])
    await publish_each(broker, "pt.busy", [1, 2, 3])
    await publish_each(broker, "pt.calm", [1])
    assert found(await broker.history("pt.*", start.id)) == ([], False)
    later = await broker.history("pt.*", (await broker.history("pt.busy", None)).events[0].id)
    assert later.recovered and [event.data for event in later.events] == [3, 1]


# -- idempotency ------------------------------------------------------------------------


async def test_idempotency_key_answers_a_retry_with_the_first_id(make_broker):
    broker, received = await make_broker(subscribe=["idem.a", "idem.b"])
    [first] = await broker.publish([PublishRequest("idem.a", 1, "key-1")])
    [again] = await broker.publish([PublishRequest("idem.a", 2, "key-1")])
    assert not first.duplicate and again.duplicate
    assert (again.id, again.ts, again.topic) == (first.id, first.ts, first.topic)
    [other_topic] = await broker.publish([PublishRequest("idem.b", 3, "key-1")])
    assert not other_topic.duplicate and other_topic.id != first.id
    batch = await broker.publish([PublishRequest("idem.a", 4, "key-2"),
                                  PublishRequest("idem.a", 5, "key-2"),
                                  PublishRequest("idem.a", 6, "key-1")])
    assert [outcome.duplicate for outcome in batch] == [False, True, True]
    assert batch[1].id == batch[0].id and batch[2].id == first.id
    events = await received.wait_for(3)
    await broker.publish([PublishRequest("idem.b", "end")])
    events = await received.wait_for(4)
    assert [event.data for event in events] == [1, 3, 4, "end"]
    assert [event.data for event in (await broker.history("idem.a", None)).events] == [1, 4]


async def test_idempotency_keys_are_forgotten_after_the_window(make_broker):
    broker, _ = await make_broker(dedupe_window=0.3)
    [first] = await broker.publish([PublishRequest("window", 1, "k")])
    await asyncio.sleep(0.5)
    [later] = await broker.publish([PublishRequest("window", 2, "k")])
    assert not later.duplicate and later.id != first.id


# -- listings -----------------------------------------------------------------------------


async def test_last_ids_and_retained_topics(make_broker):
    broker, _ = await make_broker()
    assert await broker.retained_topics() == []
    assert await broker.last_ids(["l.a"]) == {}
    await publish_each(broker, "l.a", [1, 2])
    [last_b] = await publish_each(broker, "l.b", [1])
    [last_a] = await publish_each(broker, "l.a", [3])
    assert sorted(await broker.retained_topics()) == ["l.a", "l.b"]
    assert await broker.last_ids(["l.a", "l.b", "l.none"]) == {"l.a": last_a.id,
                                                                "l.b": last_b.id}


async def test_subscriber_counts_include_this_nodes_local_counts(make_broker):
    broker, _ = await make_broker()
    local = {"s.a": 2, "s.b": 0}
    broker.local_counts = lambda names: {name: local.get(name, 0) for name in names}
    counts = await broker.subscriber_counts(["s.a", "s.b"])
    assert counts.get("s.a") == 2 and counts.get("s.b", 0) == 0


async def test_a_closed_broker_is_not_ready_and_refuses_to_publish(make_broker):
    broker, _ = await make_broker()
    assert broker.ready
    await broker.close()
    assert not broker.ready
    with pytest.raises(BrokerUnavailable):
        await broker.publish([PublishRequest("closed", 1)])


# -- presence, lifecycle and control -------------------------------------------------------


class Heard:
    """A broker's presence callbacks, recorded, with a way to wait for them."""

    def __init__(self, broker: Broker) -> None:
        self.notices: list[tuple[str, str, str]] = []  # (name, kind, client id)
        self.lifecycle: list[tuple[str, str]] = []
        self.disconnects: list[Disconnect] = []
        self._changed = asyncio.Event()
        broker.on_presence = self._presence
        broker.on_lifecycle = self._lifecycle
        broker.on_disconnect = self._disconnect

    def _presence(self, name: str, notices: list[tuple[str, dict[str, Any]]]) -> None:
        self.notices += [(name, kind, entry["id"]) for kind, entry in notices]
        self._changed.set()

    def _lifecycle(self, name: str, signal: str) -> None:
        self.lifecycle.append((name, signal))
        self._changed.set()

    def _disconnect(self, request: Disconnect) -> None:
        self.disconnects.append(request)
        self._changed.set()

    async def until(self, condition: Callable[[], bool], timeout: float = WAIT) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


def entry(client: str, sub: str | None = None, **fields: Any) -> bytes:
    return json.dumps({"id": client, "sub": sub, "node": "n1", "connected_at": 1,
                       "info": None, **fields}).encode()


def add(name: str, client: str, **fields: Any) -> PresenceChange:
    return PresenceChange(name, client, entry(client, **fields))


def gone(name: str, client: str) -> PresenceChange:
    return PresenceChange(name, client, None)


def presence_options(debounce: float = 0.3, ttl: float = 30.0) -> PresenceOptions:
    return PresenceOptions(topics=("room.>",), ttl=ttl, debounce=debounce)


async def test_presence_lists_and_counts_the_entries_of_a_name(make_broker):
    broker, _ = await make_broker(presence=presence_options())
    await broker.update_presence([add("room.a", "c1", sub="alice"), add("room.a", "c2"),
                                  add("room.*", "c1"), add("quiet", "c3")])
    listed = await broker.presence("room.a", 10)
    assert (listed.count, listed.truncated) == (2, False)
    assert sorted(found["id"] for found in listed.entries) == ["c1", "c2"]
    assert {found["id"]: found["sub"] for found in listed.entries}["c1"] == "alice"
    assert [found["id"] for found in (await broker.presence("room.*", 10)).entries] == ["c1"]
    cut = await broker.presence("room.a", 1)
    assert (cut.count, len(cut.entries), cut.truncated) == (2, 1, True)
    await broker.update_presence([add("room.a", "c2", sub="bob"), gone("room.a", "c1")])
    listed = await broker.presence("room.a", 10)
    assert [(found["id"], found["sub"]) for found in listed.entries] == [("c2", "bob")]
    nobody = await broker.presence("room.none", 10)
    assert (nobody.count, nobody.entries, nobody.truncated) == (0, [], False)


async def test_joins_and_leaves_of_announced_names_reach_on_presence_in_order(make_broker):
    broker, _ = await make_broker(subscribe=["room.a", "quiet"], presence=presence_options())
    heard = Heard(broker)
    await broker.update_presence([add("room.a", "c1"), add("room.a", "c2"), gone("room.a", "c1"),
                                  add("quiet", "c3")])
    await broker.update_presence([add("room.a", "c2", sub="renamed"), gone("room.a", "c9"),
                                  add("room.a", "c1")])
    await heard.until(lambda: len(heard.notices) >= 4)
    await broker.update_presence([gone("room.a", "c2")])
    await heard.until(lambda: len(heard.notices) >= 5)
    assert heard.notices == [("room.a", "join", "c1"), ("room.a", "join", "c2"),
                             ("room.a", "leave", "c1"), ("room.a", "join", "c1"),
                             ("room.a", "leave", "c2")]


async def test_replacing_a_nodes_presence_announces_and_weighs_only_the_difference(
        make_broker):
    broker, _ = await make_broker(subscribe=["room.a", "room.b"],
                                  presence=presence_options(debounce=0))
    heard = Heard(broker)
    await broker.update_presence([add("room.a", "c1"), add("room.a", "c2"), add("room.b", "c3")])
    await heard.until(lambda: len(heard.notices) == 3)
    await broker.replace_presence({"room.a": [("c1", entry("c1")), ("c4", entry("c4"))],
                                   "quiet.c": [("c5", entry("c5"))]})
    await heard.until(lambda: len(heard.notices) == 6 and len(heard.lifecycle) == 4)
    assert heard.notices[3:] == [("room.a", "leave", "c2"), ("room.a", "join", "c4"),
                                 ("room.b", "leave", "c3")]  # c1 unchanged: nothing said
    assert sorted(heard.lifecycle) == sorted([("room.a", OCCUPIED), ("room.b", OCCUPIED),
                                              ("room.b", VACATED), ("quiet.c", OCCUPIED)])
    listed = {name: sorted(found["id"] for found in (await broker.presence(name, 10)).entries)
              for name in ("room.a", "room.b", "quiet.c")}
    assert listed == {"room.a": ["c1", "c4"], "room.b": [], "quiet.c": ["c5"]}
    await broker.replace_presence({})
    for name in ("room.a", "quiet.c"):
        assert (await broker.presence(name, 10)).count == 0


async def test_a_presence_change_applied_twice_counts_once(make_broker):
    broker, _ = await make_broker(subscribe=["room.b"], presence=presence_options())
    heard = Heard(broker)
    await broker.update_presence([add("room.b", "c2")])
    batch = [add("room.b", "c1"), gone("room.b", "c2"), gone("room.b", "c3")]
    await broker.update_presence(batch)
    await broker.update_presence(batch)
    await broker.update_presence([add("room.b", "end")])
    await heard.until(lambda: ("room.b", "join", "end") in heard.notices)
    assert heard.notices == [("room.b", "join", "c2"), ("room.b", "join", "c1"),
                             ("room.b", "leave", "c2"), ("room.b", "join", "end")]
    assert (await broker.presence("room.b", 10)).count == 2
    assert heard.lifecycle == [("room.b", OCCUPIED)]


async def test_a_name_is_occupied_at_once_and_vacated_after_the_debounce(make_broker):
    broker, _ = await make_broker(presence=presence_options(debounce=0.3))
    heard = Heard(broker)
    await broker.update_presence([add("life", "c1"), add("life", "c2")])
    assert heard.lifecycle == [("life", OCCUPIED)]
    await broker.update_presence([gone("life", "c1"), gone("life", "c2")])
    await broker.update_presence([add("life", "c3")])  # back within the debounce
    await broker.update_presence([gone("life", "c3")])
    started = time.monotonic()
    await heard.until(lambda: len(heard.lifecycle) == 2)
    assert heard.lifecycle == [("life", OCCUPIED), ("life", VACATED)]
    assert time.monotonic() - started >= 0.25
    await broker.update_presence([add("life", "c4")])
    assert heard.lifecycle[2:] == [("life", OCCUPIED)]


async def test_with_no_debounce_the_last_leave_vacates_at_once(make_broker):
    broker, _ = await make_broker(presence=presence_options(debounce=0))
    heard = Heard(broker)
    await broker.update_presence([add("now", "c1")])
    await broker.update_presence([gone("now", "c1")])
    assert heard.lifecycle == [("now", OCCUPIED), ("now", VACATED)]


async def test_a_disconnect_reaches_this_node_at_once(make_broker):
    broker, _ = await make_broker()
    heard = Heard(broker)
    request = Disconnect("alice", None, 4010, "bye")
    await broker.disconnect(request)
    assert heard.disconnects == [request]
