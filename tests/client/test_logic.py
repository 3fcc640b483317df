"""The client's pure logic, table by table: topic matching, batch splitting, backoff,
URLs, close codes, tokens, error answers."""

from __future__ import annotations

import asyncio
import json
import random

import jwt
import pytest

from squall_client import Backoff, Event, SquallError, matches, mint_token
from squall_client._connection import After, after_close, socket_url
from squall_client._delivery import Delivery
from squall_client._registry import Registry, Subscription
from squall_client._wire import error, split_batches
from squall_client.backoff import RetrySchedule


@pytest.mark.parametrize(("name", "topic"), [
    ("orders", "orders"), ("orders.*", "orders.eu"), ("orders.*.created", "orders.eu.created"),
    ("orders.>", "orders.eu"), ("orders.>", "orders.eu.created.x"), ("*", "a"), (">", "a.b"),
    ("*.b.>", "a.b.c"),
])
def test_matches(name: str, topic: str) -> None:
    assert matches(name, topic)


@pytest.mark.parametrize(("name", "topic"), [
    ("orders", "orders.eu"), ("orders.*", "orders"), ("orders.*", "orders.eu.x"),
    ("orders.>", "orders"), ("orders.*.created", "orders.eu.paid"), ("*", "a.b"),
    ("a.b", "a.c"), ("*.b.>", "a.b"),
])
def test_does_not_match(name: str, topic: str) -> None:
    assert not matches(name, topic)


def bodies(entries: list[tuple[str, object]], events: int, size: int) -> list[list[dict]]:
    batches = split_batches(entries, events, size)
    for batch in batches:
        assert len(batch.body) <= size
    decoded = [json.loads(batch.body)["events"] for batch in batches]
    assert [len(found) for found in decoded] == [batch.count for batch in batches]
    return decoded


@pytest.mark.parametrize(("count", "pad", "events", "size", "expected"), [
    (10, 0, 1000, 1 << 20, [10]),            # fits: one batch
    (2500, 0, 1000, 1 << 20, [1000, 1000, 500]),  # by count
    (1, 0, 1, 200, [1]),
    (30, 1000, 1000, 5000, [4] * 7 + [2]),  # by bytes: about 1.07 kB an entry
])
def test_split_batches(count: int, pad: int, events: int, size: int,
                       expected: list[int]) -> None:
    entries = [("t", {"n": n, "pad": "x" * pad}) for n in range(count)]
    decoded = bodies(entries, events, size)
    assert [len(batch) for batch in decoded] == expected
    flat = [entry for batch in decoded for entry in batch]
    assert [entry["data"]["n"] for entry in flat] == list(range(count))
    assert len({entry["idempotency_key"] for entry in flat}) == count  # one key each


def test_split_batches_keeps_the_given_keys() -> None:
    [batch] = bodies([("a", 1, "k1"), ("b", 2), ("c", 3, None)], 10, 1000)
    assert batch[0]["idempotency_key"] == "k1"
    assert len(batch[1]["idempotency_key"]) == 32 and len(batch[2]["idempotency_key"]) == 32


@pytest.mark.parametrize("entry", [("t",), ("t", 1, "k", "extra"), [("t", 1)], (1, 2)])
def test_split_batches_refuses_malformed_entries(entry: object) -> None:
    with pytest.raises(ValueError):
        split_batches([entry], 10, 1000)  # type: ignore[list-item]


def test_split_batches_refuses_nan() -> None:
    with pytest.raises(ValueError):
        split_batches([("t", float("nan"))], 10, 1000)


def test_backoff_is_capped_exponential_with_equal_jitter() -> None:
    backoff = Backoff(0.1, 2.0, 2.0)
    for attempt, ceiling in [(0, 0.1), (1, 0.2), (3, 0.8), (5, 2.0), (50, 2.0), (500, 2.0)]:
        assert backoff.delay(attempt, lambda: 0.0) == pytest.approx(ceiling / 2)
        assert backoff.delay(attempt, lambda: 1.0) == pytest.approx(ceiling)
        assert ceiling / 2 <= backoff.delay(attempt, random.random) <= ceiling


@pytest.mark.parametrize(("initial", "maximum", "factor"), [(0, 1, 2), (2, 1, 2), (1, 2, 0.5)])
def test_backoff_refuses_nonsense(initial: float, maximum: float, factor: float) -> None:
    with pytest.raises(ValueError):
        Backoff(initial, maximum, factor)


def test_retry_schedule_gives_up_when_the_next_attempt_would_pass_the_deadline() -> None:
    now = [100.0]
    schedule = RetrySchedule(3.0, 10.0, Backoff(1.0, 1.0), clock=lambda: now[0])
    assert schedule.timeout() == 3.0  # the deadline is nearer than the attempt timeout
    delays = []
    with pytest.raises(SquallError) as gave_up:
        while True:
            delays.append(schedule.next_delay("503", OSError("x")))
            now[0] += delays[-1]
    assert gave_up.value.code == "unavailable" and isinstance(gave_up.value.__cause__, OSError)
    assert 2 <= len(delays) <= 6 and sum(delays) < 3.0


@pytest.mark.parametrize(("url", "expected"), [
    ("ws://127.0.0.1:8888", "ws://127.0.0.1:8888/v1/ws"),
    ("ws://127.0.0.1:8888/", "ws://127.0.0.1:8888/v1/ws"),
    ("wss://events.example.com/v1/ws", "wss://events.example.com/v1/ws"),
    ("https://example.com/squall", "wss://example.com/squall/v1/ws"),
    ("http://h:1/v1/ws?x=1", "ws://h:1/v1/ws?x=1"),
])
def test_socket_url(url: str, expected: str) -> None:
    assert socket_url(url) == expected


@pytest.mark.parametrize("url", ["ftp://h", "127.0.0.1:8888", "ws://"])
def test_socket_url_refuses_what_is_no_websocket_url(url: str) -> None:
    with pytest.raises(ValueError):
        socket_url(url)


@pytest.mark.parametrize(("code", "after"), [
    (1000, After.STOP), (4003, After.STOP), (4010, After.STOP), (1009, After.STOP),
    (4000, After.STOP), (1002, After.STOP), (4001, After.NEW_TOKEN),
    (1001, After.RECONNECT), (4008, After.RECONNECT), (4009, After.RECONNECT),
    (4029, After.RECONNECT), (1006, After.RECONNECT), (1011, After.RECONNECT),
    (4999, After.RECONNECT), (None, After.RECONNECT),
])
def test_close_codes(code: int | None, after: After) -> None:
    assert after_close(code) is after


def test_mint_token_carries_the_claims_squall_reads() -> None:
    secret = "a-secret-of-at-least-32-bytes-0123456789"
    token = mint_token(secret, sub="alice", subscribe=["chat.*"], publish=["chat.room1"],
                       ttl=60, info={"name": "Alice"})
    claims = jwt.decode(token, secret, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["exp"] - claims["iat"] == 60
    assert claims["squall"] == {"subscribe": ["chat.*"], "publish": ["chat.room1"],
                                "info": {"name": "Alice"}}
    with pytest.raises(ValueError):
        mint_token(secret, sub="alice", ttl=0)


@pytest.mark.parametrize(("status", "body", "code", "message"), [
    (400, b'{"error": {"code": "invalid_topic", "message": "bad"}}', "invalid_topic", "bad"),
    (502, b"<html>Bad Gateway</html>", "http_502", "<html>Bad Gateway</html>"),
    (413, b"", "http_413", "HTTP 413"),
    (400, b'{"error": "flat"}', "http_400", '{"error": "flat"}'),
])
def test_error_answers(status: int, body: bytes, code: str, message: str) -> None:
    found = error(status, body)
    assert (found.code, found.message, found.status) == (code, message, status)


def test_split_batches_refuses_data_over_max_event_bytes_by_its_index() -> None:
    entries = [("t", n) for n in range(1500)] + [("t", "x" * 100_000)]
    with pytest.raises(SquallError) as refused:
        split_batches(entries, 1000, 1 << 20)  # the server's defaults: 64 KiB an event
    assert refused.value.code == "payload_too_large"
    assert refused.value.message.startswith("events[1500]: data is 100002 bytes")
    fits = "x" * (64 * 1024 - 2)  # its JSON, quotes included, is exactly the limit
    assert split_batches([("t", fits, "k")], 1000, 1 << 20)[0].count == 1
    split_batches([("t", "x" * 100_000)], 1000, 1 << 20, max_event_bytes=200_000)


def test_a_position_never_goes_back_when_replays_of_two_topics_interleave() -> None:
    """A resume merges overlapping replays: x.b's events may come before x.a's older
    ones. The pattern's position stays at the newest, or its next resume would replay
    x.b again."""
    async def main() -> None:
        registry = Registry()
        pattern, topic = Subscription("x.*", None), Subscription("x.a", None)
        for subscription in (pattern, topic):
            registry.add(subscription)
            registry.set_live(subscription, True)
        delivery = Delivery(buffer_size=100, replay_size=100)
        for topic_name, seq in (("x.b", 14), ("x.b", 15), ("x.a", 11), ("x.a", 12)):
            event = Event(topic_name, f"e-{seq}", 0, seq)
            assert delivery.accept(event, registry.matching(topic_name))
        assert (pattern.position, topic.position) == ("e-15", "e-12")
        other = Event("x.a", "f-3", 0, 3)  # another epoch: the old history is gone
        assert delivery.accept(other, registry.matching("x.a"))
        assert (pattern.position, topic.position) == ("f-3", "f-3")

    asyncio.run(main())
