"""One subscriber that stops reading must cost the others nothing."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from server.connection import CLOSE_SLOW_CONSUMER
from tests.rawws import RawSocket, close_code

pytestmark = pytest.mark.gen_test(timeout=60)

EVENTS = 10_000
BATCH = 100
PAYLOAD = "x" * 1000


async def publish_batches(http_client, base_url, node, topic):
    """Publish EVENTS 1 KB events; the largest queue seen on any connection meanwhile."""
    largest = 0
    for start in range(0, EVENTS, BATCH):
        events = [{"topic": topic, "data": {"n": n, "pad": PAYLOAD}}
                  for n in range(start, start + BATCH)]
        response = await http_client.fetch(f"{base_url}/v1/events", method="POST",
                                           body=json.dumps({"events": events}))
        assert response.code == 202
        largest = max([largest, *(c.queued_bytes for c in node.hub.connections)])
    return largest


async def test_stalled_subscriber_is_closed_and_healthy_one_unaffected(
        node, http_client, base_url, http_port, ws_connect):
    stalled = await RawSocket.connect(http_port, "/v1/ws?topic=firehose", rcvbuf=4096)
    healthy = await ws_connect(query="topic=firehose", max_queue=None)
    await healthy.recv_type("subscribed")
    assert (await stalled.read_message())["type"] == "subscribed"
    # from here on the stalled client reads nothing

    received: list[int] = []

    async def consume():
        while len(received) < EVENTS:
            received.append((await healthy.recv_type("event"))["data"]["n"])

    started = time.monotonic()
    consumer = asyncio.ensure_future(consume())
    largest_queue = await publish_batches(http_client, base_url, node, "firehose")
    await asyncio.wait_for(consumer, 20)
    elapsed = time.monotonic() - started

    assert received == list(range(EVENTS))
    assert elapsed < 15, f"healthy subscriber took {elapsed:.1f}s"
    limit = node.settings.send_queue_bytes
    assert largest_queue <= limit
    assert len(node.hub.connections) == 1  # the stalled one is gone, its queue dropped
    assert node.hub.router.subscribers("firehose") == 1

    # reading again, the stalled client finds what was in flight, then the close code
    while True:
        opcode, payload = await stalled.read_frame()
        if opcode == 0x8:
            assert close_code(payload) == CLOSE_SLOW_CONSUMER
            break
    stalled.close()


@pytest.mark.settings(send_queue_bytes=64 * 1024)
async def test_queue_limit_is_a_setting(node, http_client, base_url, http_port):
    stalled = await RawSocket.connect(http_port, "/v1/ws?topic=small", rcvbuf=4096)
    assert (await stalled.read_message())["type"] == "subscribed"
    largest = await publish_batches(http_client, base_url, node, "small")
    assert largest <= 64 * 1024
    assert not node.hub.connections
    stalled.close()
