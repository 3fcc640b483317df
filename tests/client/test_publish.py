"""The publishers against real servers: answers, batches, errors, retries."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from squall_client import (
    AsyncPublisher,
    Backoff,
    Event,
    Published,
    Publisher,
    SquallError,
    Subscriber,
)
from tests.client.support import FAST, FaultyProxy, data_of, history, run, take, ws_url
from tests.server_process import ServerProcess

pytest_plugins = ["tests.redis_server"]

API_KEY = "test-publisher-key"
SLOW = Backoff(5.0, 5.0)  # a retry would take seconds: a quick answer was not retried


@pytest.fixture(scope="module")
def squall() -> Iterator[ServerProcess]:
    """A memory server with auth on (an API key), small batches, a long history."""
    with ServerProcess("--api-keys", API_KEY, "--max-batch-events", "5",
                       "--max-batch-bytes", "2000", "--history-size", "1000",
                       "--public-topics", ">") as server:
        yield server


def test_publish_answers_published_and_subscribers_get_the_event(squall: ServerProcess) -> None:
    async def scenario() -> None:
        async with Subscriber(ws_url(squall)) as subscriber:
            await subscriber.subscribe("orders.one")
            with Publisher(squall.url, api_key=API_KEY) as publisher:
                published = publisher.publish("orders.one", {"id": 42, "text": "é"})
            assert isinstance(published, Published)
            assert published.topic == "orders.one" and published.id and published.ts > 0
            [event] = await take(subscriber, 1)
            assert event == Event("orders.one", published.id, published.ts,
                                  {"id": 42, "text": "é"})

    run(scenario())


def test_publish_many_splits_batches_over_the_server_limits(squall: ServerProcess) -> None:
    """The server takes 5 events or 2000 bytes per batch: 23 events, some large, pass
    only because the client splits them; ids come back in order."""
    events = [("batches.a", {"n": n, "pad": "x" * (600 if n % 4 == 0 else 10)})
              for n in range(23)]
    with Publisher(squall.url, api_key=API_KEY, max_batch_events=5,
                   max_batch_bytes=2000) as publisher:
        outcomes = publisher.publish_many(events)
        assert [outcome.topic for outcome in outcomes] == ["batches.a"] * 23
        assert len({outcome.id for outcome in outcomes}) == 23
        assert [data["n"] for data in history(squall, "batches.a")] == list(range(23))
        # with the server's default limits the same call is one batch, which it refuses
        with Publisher(squall.url, api_key=API_KEY) as unsplit, \
                pytest.raises(SquallError) as refused:
            unsplit.publish_many(events)
        assert (refused.value.code, refused.value.status) == ("payload_too_large", 413)


def test_publish_many_refuses_an_event_no_batch_can_hold_before_sending(
        squall: ServerProcess) -> None:
    with Publisher(squall.url, api_key=API_KEY, max_batch_bytes=2000) as publisher:
        with pytest.raises(SquallError) as refused:
            publisher.publish_many([("batches.none", 1), ("batches.none", "x" * 3000)])
        assert refused.value.code == "payload_too_large" and refused.value.status is None
    assert history(squall, "batches.none") == []


def test_publish_many_keeps_given_keys_so_running_it_again_is_safe(
        squall: ServerProcess) -> None:
    events = [("batches.keyed", n, f"key-{n}") for n in range(7)]
    with Publisher(squall.url, api_key=API_KEY, max_batch_events=5) as publisher:
        first = publisher.publish_many(events)
        again = publisher.publish_many(events)
    assert [outcome.id for outcome in again] == [outcome.id for outcome in first]
    assert history(squall, "batches.keyed") == list(range(7))


@pytest.mark.parametrize(("topic", "data", "key", "code", "status"), [
    ("a..b", 1, API_KEY, "invalid_topic", 400),
    ("ok.topic", "x" * 70_000, API_KEY, "payload_too_large", 413),
    ("ok.topic", 1, "wrong-key", "unauthorized", 401),
])
def test_4xx_raise_squall_error_at_once(squall: ServerProcess, topic: str, data: object,
                                        key: str, code: str, status: int) -> None:
    with Publisher(squall.url, api_key=key, backoff=SLOW, deadline=30) as publisher:
        started = time.monotonic()
        with pytest.raises(SquallError) as refused:
            publisher.publish(topic, data)
        assert time.monotonic() - started < 2.0  # never retried (a retry waits 2.5 s or more)
    assert (refused.value.code, refused.value.status) == (code, status)
    assert refused.value.message


def test_async_publisher_publishes_batches_and_raises_4xx(squall: ServerProcess) -> None:
    async def scenario() -> None:
        async with AsyncPublisher(squall.url, api_key=API_KEY, max_batch_events=5,
                                  max_batch_bytes=2000, backoff=SLOW) as publisher:
            single = await publisher.publish("async.one", [1, 2])
            many = await publisher.publish_many([("async.one", n) for n in range(12)])
            assert single.topic == "async.one" and len(many) == 12
            started = time.monotonic()
            with pytest.raises(SquallError) as refused:
                await publisher.publish("bad topic", 1)
            assert time.monotonic() - started < 2.0
            assert (refused.value.code, refused.value.status) == ("invalid_topic", 400)
        assert history(squall, "async.one") == [[1, 2], *range(12)]

    run(scenario())


def test_a_server_that_stays_away_ends_in_unavailable_at_the_deadline() -> None:
    with ServerProcess() as gone:
        url = gone.url
    with Publisher(url, deadline=1.0, backoff=Backoff(0.05, 0.2)) as publisher:
        started = time.monotonic()
        with pytest.raises(SquallError) as failed:
            publisher.publish("nowhere", 1)
        # it stops once the next attempt could not begin before the deadline: within
        # one backoff delay (at most 0.2 s here) of it
        assert 0.75 <= time.monotonic() - started < 3.0
    assert failed.value.code == "unavailable"
    assert isinstance(failed.value.__cause__, OSError)


@pytest.mark.redis
def test_retry_across_a_server_restart_reuses_the_key_and_delivers_once(
        redis_url: str) -> None:
    """The first answer is lost after the server published; while the publisher
    retries, the server restarts; the retry carries the same key, so Redis answers
    with the first id and subscribers get the event once."""
    server = ServerProcess("--broker", redis_url).start()

    async def scenario() -> None:
        proxy = FaultyProxy(server.port)
        proxy_port = await proxy.start()
        try:
            async with Subscriber(ws_url(server), backoff=FAST) as subscriber:
                await subscriber.subscribe("orders.*")
                publisher = Publisher(f"http://127.0.0.1:{proxy_port}", backoff=FAST,
                                      deadline=40)
                proxy.drop_next_answer = True
                publishing = asyncio.ensure_future(
                    asyncio.to_thread(publisher.publish, "orders.eu", {"order": 1}))
                await asyncio.wait_for(proxy.dropped.wait(), 10)
                await asyncio.to_thread(server.restart)
                refused_before = proxy.refused
                proxy.blocked = False  # the retries reach the restarted server
                published = await asyncio.wait_for(publishing, 30)
                assert refused_before > 0  # it did retry while the server was away
                publisher.close()
                [event] = await take(subscriber, 1)
                assert isinstance(event, Event) and event.id == published.id
                async with AsyncPublisher(server.url) as direct:
                    await direct.publish("orders.marker", "after")
                assert data_of(await take(subscriber, 1)) == ["after"]  # no second copy
            assert history(server, "orders.eu") == [{"order": 1}]
        finally:
            await proxy.close()

    try:
        run(scenario())
    finally:
        server.stop()



def test_async_publisher_retries_a_lost_answer_with_the_same_key(squall: ServerProcess) -> None:
    async def scenario() -> None:
        proxy = FaultyProxy(squall.port)
        port = await proxy.start()
        try:
            async with AsyncPublisher(f"http://127.0.0.1:{port}", api_key=API_KEY,
                                      backoff=FAST) as publisher:
                proxy.drop_next_answer = True
                publishing = asyncio.ensure_future(publisher.publish("async.lost", "once"))
                await asyncio.wait_for(proxy.dropped.wait(), 10)
                proxy.blocked = False
                published = await asyncio.wait_for(publishing, 20)
            assert published.topic == "async.lost"
            assert history(squall, "async.lost") == ["once"]  # published by the first try
        finally:
            await proxy.close()

    run(scenario())


def test_a_kept_alive_connection_the_server_closed_is_replaced_at_once() -> None:
    """The pooled connection died with the server it led to; the next publish goes out
    on a new one without waiting for a backoff (a retry would wait 2.5 s or more)."""
    with ServerProcess() as server, Publisher(server.url, backoff=SLOW) as publisher:
        publisher.publish("stale.a", 1)
        server.restart()
        started = time.monotonic()
        publisher.publish("stale.a", 2)
        assert time.monotonic() - started < 2.0
        assert history(server, "stale.a") == [2]  # a new memory server: only the second
