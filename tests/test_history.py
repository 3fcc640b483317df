"""History retention and ``since`` lookups, as pure logic with a controlled clock."""

from __future__ import annotations

import pytest

from server.events import Event, EventId
from server.history import MemoryHistory, Retention

EPOCH = "ep0ch"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Log:
    """A history fed with events numbered 1, 2, 3... like a broker would."""

    def __init__(self, **retention: float) -> None:
        self.clock = Clock()
        self.history = MemoryHistory(Retention(**retention), EPOCH, self.clock)  # type: ignore[arg-type]
        self.seq = 0

    def publish(self, topic: str, data: object = None) -> str:
        self.seq += 1
        event = Event.of(topic, EventId(EPOCH, self.seq), int(self.clock.now * 1000), data)
        self.history.append(event)
        return event.id

    def since(self, name: str, since: str | None, limit: int | None = None):
        replay = self.history.since(name, since, limit)
        return [event.id for event in replay.events], replay.recovered


def test_since_returns_every_later_event_of_the_topic():
    log = Log()
    ids = [log.publish("a", n) for n in range(5)]
    log.publish("b")
    assert log.since("a", ids[1]) == (ids[2:], True)
    assert log.since("a", ids[-1]) == ([], True)
    assert log.since("a", None) == (ids, True)
    assert log.since("a", ids[0], limit=2) == (ids[1:3], True)


def test_pattern_since_merges_matching_topics_in_publish_order():
    log = Log()
    first = log.publish("orders.eu")
    later = [log.publish(topic) for topic in ("orders.us", "users.1", "orders.eu", "orders.x.y")]
    assert log.since("orders.*", first) == ([later[0], later[2]], True)
    assert log.since("orders.>", first) == ([later[0], later[2], later[3]], True)


def test_count_bound_evicts_oldest_and_makes_older_ids_unrecoverable():
    log = Log(size=3)
    ids = [log.publish("a", n) for n in range(5)]
    assert log.since("a", None) == (ids[2:], True)
    assert log.since("a", ids[1]) == (ids[2:], True)  # nothing after ids[1] was lost
    assert log.since("a", ids[0]) == ([], False)  # ids[1] was lost: no partial replay


def test_age_bound_evicts_old_events():
    log = Log(ttl=10)
    old = log.publish("a", "old")
    log.clock.now += 6
    middle = log.publish("a", "middle")
    log.clock.now += 6
    newest = log.publish("a", "new")
    assert log.since("a", None) == ([middle, newest], True)
    assert log.since("a", old) == ([middle, newest], True)
    log.clock.now += 20
    assert log.since("a", None) == ([], True)
    assert log.since("a", old) == ([], False)
    assert log.since("a", newest) == ([], True)  # the client missed nothing
    assert len(log.history) == 0


def test_ttl_zero_means_no_age_limit_and_size_zero_no_history():
    log = Log(ttl=0)
    first = log.publish("a")
    log.clock.now += 10**6
    assert log.since("a", None) == ([first], True)
    none = Log(size=0)
    seen = none.publish("a")
    assert none.since("a", None) == ([], True)
    assert none.since("a", seen) == ([], True)
    none.publish("a")
    assert none.since("a", seen) == ([], False)


def test_an_id_of_another_epoch_gets_everything_retained_and_the_loss():
    log = Log(size=2)
    for _ in range(3):
        log.publish("a")
    log.publish("b")
    assert log.since("a", "otherepoch-1") == ([f"{EPOCH}-2", f"{EPOCH}-3"], False)
    assert log.since("*", "otherepoch-9") == ([f"{EPOCH}-{n}" for n in (2, 3, 4)], False)


@pytest.mark.parametrize("since", [
    "not-an-id", "", "ep0ch-", "ep0ch-x1", "-5", "ep0ch-999",  # malformed, or from the future
    "ep0ch-٣",  # a digit, but not an ASCII one
])
def test_unrecoverable_ids(since):
    log = Log()
    log.publish("a")
    log.publish("a")
    assert log.since("a", since) == ([], False)
    assert log.since("a.*", since) == ([], False)


def test_global_topic_bound_evicts_least_recently_published():
    log = Log(max_topics=3)
    stale = log.publish("t0")
    for n in range(1, 4):
        log.publish(f"t{n}")
    assert sorted(log.history.topics()) == ["t1", "t2", "t3"]
    assert log.since("t0", stale) == ([], True)  # t0 had nothing after stale
    before = log.publish("t1")
    assert log.since("t2", before) == ([], True)
    log.publish("t2")
    for topic in ("t4", "t5", "t6"):  # evict t3, t1, t2: the least recently published
        log.publish(topic)
    assert sorted(log.history.topics()) == ["t4", "t5", "t6"]
    assert log.since("t2", before) == ([], False)  # t2 was forgotten with an event after
    assert log.since("t1", before) == ([], True)  # t1 had nothing after


def test_global_byte_bound():
    log = Log(max_bytes=2000)
    for n in range(100):
        log.publish(f"topic.{n}", "x" * 100)
    assert log.history.bytes <= 2000
    assert 0 < len(log.history) < 20


def test_a_single_topic_over_the_byte_bound_keeps_its_newest_events():
    log = Log(max_bytes=1000, size=1000)
    ids = [log.publish("big", "x" * 100) for _ in range(50)]
    retained, recovered = log.since("big", None)
    assert recovered and retained == ids[-len(retained):] and len(retained) < 10


def test_flood_of_distinct_topics_stays_bounded():
    log = Log(max_topics=100)
    for n in range(20_000):
        log.publish(f"flood.{n}", n)
    assert len(log.history) == 100
    assert log.history.bytes < 100 * 200
    # forgotten topics are answered conservatively, never with a partial replay
    assert log.since("flood.5", f"{EPOCH}-1") == ([], False)


def test_pattern_since_is_unrecoverable_if_any_matching_topic_lost_events():
    log = Log(size=2)
    start = log.publish("room.a")
    for _ in range(3):
        log.publish("room.b")
    kept = log.publish("room.a")
    assert log.since("room.*", start) == ([], False)
    assert log.since("room.a", start) == ([kept], True)


@pytest.mark.parametrize("data", [None, 1, "x" * 40, "y" * 200, "z" * 70_000,
                                  {"é": ["ü", 1.5, None]}])
@pytest.mark.parametrize("ts", [1796130000123, 999_999_999_999, 10 ** 13, 7])  # 13 digits, or not
def test_an_events_size_is_its_websocket_json_frame_worked_out_without_it(data, ts):
    from server.wire import WS_JSON

    event = Event("t.a", f"{EPOCH}-9", 9, ts, data)
    counted = event.size  # before any frame exists
    assert counted == len(event.frame(WS_JSON)) == event.size
