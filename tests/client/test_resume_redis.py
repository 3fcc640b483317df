"""The subscriber on Redis-backed servers: resume across a restart, broker outages."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from squall_client import AsyncPublisher, Subscriber
from tests.client.support import FAST, client_log, data_of, history, run, take, ws_url
from tests.server_process import ServerProcess
from tests.waiting import eventually

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]
pytestmark = pytest.mark.redis


def test_resume_across_a_server_restart_on_redis_has_no_gap_and_no_duplicate(
        redis_url: str) -> None:
    """While node A is down, node B (same Redis) publishes: to a topic the subscriber
    had events of, to one it never had any of (it resumes from ``last_id``), and to
    one two overlapping subscriptions share. A comes back; the subscriber gets each
    missed event once, in order, then live ones."""
    node_a = ServerProcess("--broker", redis_url).start()
    node_b = ServerProcess("--broker", redis_url).start()

    async def scenario() -> None:
        async with Subscriber(ws_url(node_a), backoff=FAST) as subscriber, \
                AsyncPublisher(node_b.url) as publisher:
            for name in ("feed.*", "quiet.one", "feed.shared"):
                await subscriber.subscribe(name)
            await publisher.publish_many([("feed.a", n) for n in range(3)])
            assert data_of(await take(subscriber, 3)) == [0, 1, 2]

            def publish_while_a_is_down() -> None:
                with_b = [("feed.a", 3), ("quiet.one", "q1"), ("feed.shared", "s1"),
                          ("feed.a", 4), ("quiet.one", "q2")]
                asyncio.run_coroutine_threadsafe(publisher.publish_many(with_b),
                                                 loop).result(10)

            loop = asyncio.get_running_loop()
            await asyncio.to_thread(node_a.restart, while_down=publish_while_a_is_down)
            await publisher.publish("feed.a", "live")
            items = await take(subscriber, 6)
            assert sorted(map(str, data_of(items))) == sorted(
                ["3", "q1", "s1", "4", "q2", "live"])  # each once, no Gap
            feed = [data for data in data_of(items) if data in (3, 4, "live")]
            assert feed == [3, 4, "live"]  # in order per topic
            assert data_of(items).index("q1") < data_of(items).index("q2")
            await publisher.publish("quiet.one", "end")
            assert data_of(await take(subscriber, 1)) == ["end"]  # nothing else was queued

    try:
        run(scenario())
    finally:
        node_a.stop()
        node_b.stop()


def test_subscribe_waits_out_a_broker_outage(redis_server: RedisServer,
                                              redis_url: str) -> None:
    """Redis is down: the server answers the subscribe with broker_unavailable; the
    subscriber asks again with backoff until Redis is back, then it works."""
    node = ServerProcess("--broker", redis_url, "--broker-timeout", "0.5").start()

    async def scenario() -> None:
        with client_log() as log:
            async with Subscriber(ws_url(node), backoff=FAST) as subscriber:
                await subscriber.subscribe("before")
                await asyncio.to_thread(redis_server.kill)
                subscribing = asyncio.ensure_future(subscriber.subscribe("during"))
                await eventually(lambda: log.saw("answered broker_unavailable"),
                                 timeout=20, what="a broker_unavailable answer")
                assert not subscribing.done()
                await asyncio.to_thread(redis_server.start)
                await asyncio.wait_for(subscribing, 30)
                async with AsyncPublisher(node.url, deadline=30) as publisher:
                    await publisher.publish("during", "works")
                seen: list[object] = []
                while "works" not in seen:  # a Gap of "before" may come first: Redis lost it
                    seen += data_of(await take(subscriber, 1))
                assert all(item == "works" or item[0] == "gap" for item in seen)  # type: ignore[index]
        assert history(node, "during") == ["works"]

    try:
        run(scenario())
    finally:
        node.stop()
