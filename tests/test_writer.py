"""The fan-out writer's fast paths, against a real server and real sockets.

Events delivered in one loop pass are fanned out as runs (one joined chunk per
subscriber), flushes are paced, and writes go straight to the socket when Tornado's
buffer is empty. Each test pins one edge of that: order and completeness of long and
interleaved runs, subscription changes inside a run, partial writes, a socket that
goes away mid-write, and the pacing itself.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from server.broker.base import PublishRequest
from server.connection import Flusher
from server.hub import MAX_PENDING_EVENTS
from tests.rawws import RawSocket
from tests.waiting import eventually

pytestmark = pytest.mark.gen_test(timeout=30)


async def publish_batch(http_client, base_url, events):
    response = await http_client.fetch(f"{base_url}/v1/events", method="POST",
                                       body=json.dumps({"events": events}))
    assert response.code == 202


async def server_side(node, count):
    """The hub's connections, in the order they were attached, once there are ``count``."""
    await eventually(lambda: len(node.hub.connections) >= count, what="connections attached")
    return sorted(node.hub.connections, key=lambda c: int(c.info.id[8:], 16))


async def test_a_run_longer_than_the_cap_reaches_every_codec_whole_and_in_order(
        node, ws_connect):
    as_json = await ws_connect(query="topic=burst")
    as_msgpack = await ws_connect(query="topic=burst", codec="msgpack")
    for client in (as_json, as_msgpack):
        await client.recv_type("subscribed")
    count = 2 * MAX_PENDING_EVENTS + 7  # one publish, so one pass: fanned out in parts
    await node.hub.publish([PublishRequest("burst", {"n": n}) for n in range(count)])
    for client in (as_json, as_msgpack):
        events = await client.events(count)
        assert [event["data"]["n"] for event in events] == list(range(count))


@pytest.mark.settings(send_queue_bytes=64 * 1024)
async def test_a_burst_larger_than_the_queue_reaches_a_reader_that_keeps_up(node, ws_connect):
    client = await ws_connect(query="topic=flood", max_queue=None)
    await client.recv_type("subscribed")
    count = 200  # 200 KB in one loop pass: three times the queue limit
    await node.hub.publish([PublishRequest("flood", {"n": n, "pad": "f" * 1000})
                            for n in range(count)])
    assert [event["data"]["n"] for event in await client.events(count)] == list(range(count))
    assert node.hub.slow_closes == 0


async def test_interleaved_topics_keep_publish_order_for_a_pattern(
        ws_connect, http_client, base_url):
    pattern = await ws_connect(query="topic=mix.*")
    only_b = await ws_connect(query="topic=mix.b")
    for client in (pattern, only_b):
        await client.recv_type("subscribed")
    topics = ["mix.a", "mix.a", "mix.b", "mix.a", "mix.b", "mix.b", "mix.c"] * 20
    await publish_batch(http_client, base_url,
                        [{"topic": topic, "data": n} for n, topic in enumerate(topics)])
    seen = await pattern.events(len(topics))
    assert [(event["topic"], event["data"]) for event in seen] == list(
        zip(topics, range(len(topics)), strict=True))
    b_events = await only_b.events(topics.count("mix.b"))
    assert [event["data"] for event in b_events] == [
        n for n, topic in enumerate(topics) if topic == "mix.b"]


async def test_unsubscribe_in_the_pass_of_a_publish_sends_the_event_first(node, ws_connect):
    client = await ws_connect(query="topic=u")
    await client.recv_type("subscribed")
    (connection,) = await server_side(node, 1)
    # publish and unsubscribe before the writer runs: the event was due, then no more
    await node.hub.publish([PublishRequest("u", 1)])
    await node.hub.unsubscribe(connection, "u")
    await node.hub.publish([PublishRequest("u", 2)])
    assert (await client.recv())["data"] == 1
    assert (await client.recv())["type"] == "unsubscribed"
    with pytest.raises(asyncio.TimeoutError):
        await client.recv(timeout=0.3)


async def test_a_subscriber_added_inside_a_run_gets_only_later_events(node, ws_connect):
    early = await ws_connect(query="topic=r")
    await early.recv_type("subscribed")
    late = await ws_connect()
    _, late_connection = await server_side(node, 2)
    await node.hub.publish([PublishRequest("r", "before")])
    await node.hub.subscribe(late_connection, "r")
    await node.hub.publish([PublishRequest("r", "after")])
    assert [event["data"] for event in await early.events(2)] == ["before", "after"]
    assert (await late.recv())["type"] == "subscribed"
    assert (await late.recv())["data"] == "after"


async def test_a_replay_in_the_pass_of_a_publish_carries_the_event_once(node, ws_connect):
    client = await ws_connect(query="topic=once")
    await client.recv_type("subscribed")
    (connection,) = await server_side(node, 1)
    (first,) = await node.hub.publish([PublishRequest("once", "first")])
    assert (await client.recv())["data"] == "first"
    # the event is due to the subscriber when the replay (which has it too) ends
    await node.hub.publish([PublishRequest("once", "second")])
    await node.hub.subscribe(connection, "once", since=first.id)
    assert (await client.recv())["data"] == "second"
    reply = await client.recv()
    assert (reply["type"], reply["recovered"]) == ("subscribed", True)
    with pytest.raises(asyncio.TimeoutError):
        await client.recv(timeout=0.3)


async def fill(http_client, base_url, topic, numbers):
    """Publish 3 KB events numbered ``numbers``, 20 to a batch."""
    pad = "y" * 3000
    numbers = list(numbers)
    for start in range(0, len(numbers), 20):
        await publish_batch(http_client, base_url, [
            {"topic": topic, "data": {"n": n, "pad": pad}} for n in numbers[start:start + 20]])


@pytest.mark.settings(send_queue_bytes=32 * 1024 * 1024)
async def test_partial_writes_keep_frames_whole_and_in_order(
        node, http_port, http_client, base_url):
    # a tiny receive window, not read for a while: the kernel takes part of a write,
    # the rest waits in Tornado's buffer, and later events must queue behind it
    slow = await RawSocket.connect(http_port, "/v1/ws?topic=big", rcvbuf=4096)
    assert (await slow.read_message())["type"] == "subscribed"
    count = 2000  # 6 MB: more than the kernel buffers
    await fill(http_client, base_url, "big", range(count))
    (connection,) = await server_side(node, 1)
    assert connection.queued_bytes > 0
    numbers = [(await slow.read_message())["data"]["n"] for _ in range(count)]
    assert numbers == list(range(count))
    slow.close()


@pytest.mark.settings(send_queue_bytes=32 * 1024 * 1024)
async def test_a_socket_closing_mid_write_costs_the_others_nothing(
        node, http_port, http_client, base_url, ws_connect):
    stuck = await RawSocket.connect(http_port, "/v1/ws?topic=gone", rcvbuf=4096)
    assert (await stuck.read_message())["type"] == "subscribed"
    healthy = await ws_connect(query="topic=gone", max_queue=None)
    await healthy.recv_type("subscribed")
    received: list[int] = []

    async def consume():
        while len(received) < 2100:
            received.append((await healthy.recv_type("event"))["data"]["n"])

    consumer = asyncio.ensure_future(consume())
    await fill(http_client, base_url, "gone", range(2000))
    assert any(c.queued_bytes for c in node.hub.connections)  # a write is under way
    stuck.writer.transport.abort()  # reset, with the server's write still under way
    await fill(http_client, base_url, "gone", range(2000, 2100))
    await asyncio.wait_for(consumer, 20)
    assert received == list(range(2100))
    await eventually(lambda: len(node.hub.connections) == 1, what="the reset one forgotten")
    assert node.hub.router.subscribers("gone") == 1


class _Costly:
    """Stands in for a connection whose write takes ``cost`` seconds."""

    def __init__(self, cost: float) -> None:
        self.cost = cost
        self.flushed: list[float] = []

    def flush(self) -> None:
        self.flushed.append(time.monotonic())
        time.sleep(self.cost)


async def test_busy_flushes_are_paced_and_a_quiet_one_is_not():
    flusher = Flusher(pace=2.0, max_delay=0.5)
    costly = _Costly(0.02)
    flusher.mark(costly)  # type: ignore[arg-type]
    await asyncio.sleep(0.03)
    assert len(costly.flushed) == 1
    flusher.mark(costly)  # type: ignore[arg-type]  # 10 ms after a 20 ms flush
    await eventually(lambda: len(costly.flushed) == 2, every=0.005)
    # it waited 2 x 20 ms after the first flush ended, not just the next loop pass
    assert costly.flushed[1] - (costly.flushed[0] + 0.02) >= 0.04 - 0.002
    await asyncio.sleep(0.6)  # quiet for longer than max_delay: the next pass flushes
    flusher.mark(costly)  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert len(costly.flushed) == 3


async def test_max_delay_bounds_the_wait():
    flusher = Flusher(pace=100.0, max_delay=0.01)
    costly = _Costly(0.02)
    flusher.mark(costly)  # type: ignore[arg-type]
    await asyncio.sleep(0.03)
    flusher.mark(costly)  # type: ignore[arg-type]
    await asyncio.sleep(0.05)  # 100 x 20 ms would be 2 s; the bound is 10 ms
    assert len(costly.flushed) == 2
