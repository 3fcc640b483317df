"""One suite for what a session does, run on every transport: WebSocket, SSE and TCP.

The same subscribe, patterns, resume, errors, limits, slow-consumer close, token
expiry, shutdown and signals, seen through tests/transport_clients.py, which shows
each transport's messages as the WebSocket JSON frames. Where a transport says
things its own way, the test says so: SSE answers a bad request before its stream
starts with an HTTP error, and it takes no frames from the client.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from server import signals
from tests.auth_support import API_KEY, SECRET, token
from tests.transport_clients import HttpRefused
from tests.waiting import eventually

pytestmark = pytest.mark.gen_test(timeout=60)

AUTH_ON = pytest.mark.settings(api_keys=(API_KEY,), jwt_secret=SECRET,
                               public_topics=("news.>",))
TWO_WAY = pytest.mark.parametrize("transport", ["ws", "tcp"])


async def published(publish, topic: str, data: Any) -> dict[str, Any]:
    response = await publish(topic, data)
    assert response.code == 202, response.body
    return json.loads(response.body)  # type: ignore[no-any-return]


async def refused_or_error(open_client, transport: str, topics: tuple[str, ...], code: str,
                           status: int, **options: Any):
    """SSE: the request is refused with ``status``; else an error frame with ``code``
    comes first and the client stays. Returns the open client (None for SSE)."""
    if transport == "sse":
        with pytest.raises(HttpRefused) as refused:
            await open_client(topics, **options)
        assert (refused.value.status, refused.value.code) == (status, code)
        return None
    client = await open_client(topics, **options)
    error = await client.recv_type("error")
    assert error["code"] == code and error["message"]
    return client


async def still_open(client) -> None:
    await client.send({"type": "ping", "ref": "alive"})
    assert await client.recv() == {"type": "pong", "ref": "alive"}


# -- subscribing ----------------------------------------------------------------------------


async def test_exact_and_pattern_subscriptions_get_each_event_once(open_client, publish):
    client = await open_client(("orders.eu", "orders.*"))
    assert [(await client.recv_type("subscribed"))["topic"] for _ in range(2)] == [
        "orders.eu", "orders.*"]
    accepted = await published(publish, "orders.eu", {"n": 1, "text": "héllo"})
    assert await client.recv() == {"type": "event", "topic": "orders.eu", "id": accepted["id"],
                                   "ts": accepted["ts"], "data": {"n": 1, "text": "héllo"}}
    for topic in ("other", "orders.eu.x", "orders.us"):
        await published(publish, topic, topic)
    assert (await client.recv_type("event"))["data"] == "orders.us"  # nothing else matched
    await published(publish, "orders.eu", "end")
    assert (await client.recv_type("event"))["data"] == "end"


@pytest.mark.settings(history_size=1000)
async def test_resume_replays_the_missed_events_before_subscribed_then_live(open_client,
                                                                            publish):
    sent = [(topic, (await published(publish, topic, n))["id"])
            for n, topic in enumerate(["chat.a", "news.x", "chat.a", "news.y"] * 3)]
    since = sent[3][1]
    client = await open_client(("chat.a", "news.*"), since=since)
    frames = []
    while len([f for f in frames if f["type"] == "subscribed"]) < 2:
        frames.append(await client.recv())
    replayed = [(frame["topic"], frame["id"]) for frame in frames if frame["type"] == "event"]
    assert replayed == [e for e in sent[4:] if e[0] == "chat.a"] + [
        e for e in sent[4:] if e[0] != "chat.a"]
    replies = [frame for frame in frames if frame["type"] == "subscribed"]
    assert [(r["topic"], r["recovered"]) for r in replies] == [("chat.a", True),
                                                                ("news.*", True)]
    assert frames.index(replies[0]) == 4  # chat.a's four events, then its reply
    live = await published(publish, "news.z", "live")
    assert (await client.recv_type("event"))["id"] == live["id"]


@pytest.mark.settings(history_size=2)
async def test_a_resume_past_the_history_says_recovered_false(open_client, publish):
    old = (await published(publish, "t", 0))["id"]
    for n in range(1, 5):
        await published(publish, "t", n)
    for since in (old, "never-1", "garbage"):
        client = await open_client(("t",), since=since)
        replayed = []  # what is still retained may come first, after the gap
        while (reply := await client.recv())["type"] == "event":
            replayed.append(reply["data"])
        assert (reply["type"], reply["recovered"]) == ("subscribed", False)
        assert len(replayed) <= 2  # at most what the history keeps
        live = await published(publish, "t", "live")
        assert (await client.recv_type("event"))["id"] == live["id"]
        client.close()


# -- errors -----------------------------------------------------------------------------------


async def test_a_bad_topic_is_invalid_topic(open_client, transport):
    client = await refused_or_error(open_client, transport, ("a..b",), "invalid_topic", 400)
    if client is not None:
        await still_open(client)


@TWO_WAY
@pytest.mark.parametrize("frame", ["not json", '{"type": "dance", "ref": 7}',
                                   '{"type": "subscribe"}', '{"type": "ping", "ref": {}}'])
async def test_bad_frames_get_error_frames_and_the_connection_stays(open_client, transport,
                                                                      frame):
    client = await open_client()
    client.writer.write(frame.encode() + b"\n" if transport == "tcp" else _ws_text(frame))
    error = await client.recv_type("error")
    assert error["code"] == "invalid_body"
    if '"ref": 7' in frame:
        assert error["ref"] == 7
    await still_open(client)


def _ws_text(text: str) -> bytes:
    payload = text.encode()
    return bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


@TWO_WAY
@pytest.mark.settings(max_bad_frames=2)
async def test_too_many_bad_frames_close_with_4000(open_client, transport):
    client = await open_client()
    for _ in range(3):
        await client.send({"type": "dance"})
    assert await client.closed_with() == 4000
    assert await client.ends()


@TWO_WAY
async def test_publishing_over_the_connection_reaches_every_transport(open_client, transport,
                                                                      request):
    from tests.transport_clients import SseClient

    request.getfixturevalue("http_server")
    listener = await SseClient.connect(request.getfixturevalue("http_port"), ("chat.room",))
    try:
        await listener.recv_type("subscribed")
        client = await open_client()
        await client.send({"type": "publish", "topic": "chat.room", "data": {"hi": 1}, "ref": 3})
        reply = await client.recv_type("published")
        assert (reply["ref"], reply["topic"]) == (3, "chat.room")
        assert (await listener.recv_type("event"))["id"] == reply["id"]
    finally:
        listener.close()


# -- auth and limits --------------------------------------------------------------------------


@AUTH_ON
async def test_grants_rule_what_a_client_may_follow(open_client, transport, publish):
    if transport == "sse":  # an HTTP request without a credential is told to send one
        await refused_or_error(open_client, transport, ("orders",), "unauthorized", 401)
        await refused_or_error(open_client, transport, ("orders",), "forbidden", 403,
                               token=token("bob", subscribe=["news.>"]))
    else:
        await refused_or_error(open_client, transport, ("orders",), "forbidden", 403)
    anonymous = await open_client(("news.eu",))
    assert (await anonymous.recv_type("subscribed"))["topic"] == "news.eu"
    alice = await open_client(("orders",), token=token("alice", subscribe=["orders"]))
    assert (await alice.recv_type("subscribed"))["topic"] == "orders"
    response = await publish("orders", 1, headers={"Authorization": f"Bearer {API_KEY}"})
    assert (await alice.recv_type("event"))["id"] == json.loads(response.body)["id"]


@AUTH_ON
async def test_a_bad_token_is_refused(open_client, transport):
    if transport == "sse":
        with pytest.raises(HttpRefused) as refused:
            await open_client(("news.eu",), token="not-a-token")
        assert (refused.value.status, refused.value.code) == (401, "unauthorized")
    elif transport == "ws":
        client = await open_client(("news.eu",), token="not-a-token")
        assert await client.closed_with() == 4001
    else:  # the line protocol's auth frame is answered, and the client stays anonymous
        client = await open_client(("news.eu",), token="not-a-token")
        assert (await client.recv_type("error"))["code"] == "unauthorized"
        assert (await client.recv_type("subscribed"))["topic"] == "news.eu"


@pytest.mark.settings(max_subscriptions=2)
async def test_the_subscription_limit(open_client, transport):
    if transport == "sse":
        await refused_or_error(open_client, transport, ("a", "b", "c"),
                               "too_many_subscriptions", 429)
        return
    client = await open_client(("a", "b", "c"))
    replies = [await client.recv() for _ in range(3)]
    assert [reply["type"] for reply in replies] == ["subscribed", "subscribed", "error"]
    assert replies[2]["code"] == "too_many_subscriptions"
    await still_open(client)


@pytest.mark.settings(max_connections_per_ip=1)
async def test_connections_over_the_limit_are_refused_with_4029(open_client, transport, node):
    first = await open_client(("t",))
    await first.recv_type("subscribed")
    if transport == "sse":
        with pytest.raises(HttpRefused) as refused:
            await open_client(("t",))
        assert (refused.value.status, refused.value.code) == (429, "rate_limited")
    else:
        assert await (await open_client()).closed_with() == 4029
    other = await open_client(("t",), local_addr="127.0.0.2")  # another address: its own
    await other.recv_type("subscribed")
    first.close()
    await eventually(lambda: node.limits.connections.from_ip("127.0.0.1") == 0)
    again = await open_client(("t",))
    await again.recv_type("subscribed")


async def flood(http_client, base_url: str, topic: str, count: int,
                received: list[int] | None = None) -> None:
    """``count`` events of 1 KB to ``topic``, 250 a batch; each batch once ``received``
    (when given) has the one before it, as a client that reads would."""
    pad = "x" * 1000
    for start in range(0, count, 250):
        if received is not None:
            await eventually(lambda start=start: len(received) >= start, what="the reader",
                             every=0.005)
        events = [{"topic": topic, "data": {"n": n, "pad": pad}}
                  for n in range(start, start + 250)]
        response = await http_client.fetch(f"{base_url}/v1/events", method="POST",
                                           body=json.dumps({"events": events}))
        assert response.code == 202


@pytest.mark.settings(send_queue_bytes=64 * 1024)
async def test_a_client_that_stops_reading_is_closed_with_4008(open_client, http_client,
                                                               base_url, node):
    stalled = await open_client(("firehose",), rcvbuf=4096)
    await stalled.recv_type("subscribed")
    await flood(http_client, base_url, "firehose", 5000)  # 5 MB: more than kernel buffers
    await eventually(lambda: not node.hub.connections, what="the slow consumer closed")
    assert node.hub.slow_closes == 1
    assert await stalled.closed_with() == 4008  # after what was in flight


async def test_a_client_that_stops_reading_costs_one_that_reads_nothing(
        open_client, http_client, base_url, node):
    stalled = await open_client(("firehose",), rcvbuf=4096)
    await stalled.recv_type("subscribed")
    healthy = await open_client(("firehose",))
    await healthy.recv_type("subscribed")
    count, received = 10_000, []  # 10 MB: past the stalled one's queue and kernel buffers

    async def read() -> None:
        while len(received) < count:
            received.append((await healthy.recv_type("event"))["data"]["n"])

    reading = asyncio.ensure_future(read())
    await flood(http_client, base_url, "firehose", count, received)
    await asyncio.wait_for(reading, 30)
    assert received == list(range(count))
    await eventually(lambda: node.hub.slow_closes == 1, what="the slow consumer closed")
    assert len(node.hub.connections) == 1
    assert await stalled.closed_with() == 4008


@AUTH_ON
async def test_an_expiring_token_closes_with_4001(open_client):
    client = await open_client(("news.eu",), token=token("alice", subscribe=["news.>"], ttl=2))
    await client.recv_type("subscribed")
    closed = await client.recv(timeout=5)
    assert (closed["type"], closed["code"], closed["reason"]) == ("close", 4001, "token expired")
    assert await client.ends()


# -- closing and signals ---------------------------------------------------------------------


async def test_shutdown_closes_every_client_with_1001(open_client, node, publish):
    client = await open_client(("t",))
    await client.recv_type("subscribed")
    accepted = await published(publish, "t", "before")
    await node.drain(1.0)
    assert (await client.recv_type("event"))["id"] == accepted["id"]  # queued frames first
    closed = await client.recv()
    assert closed == {"type": "close", "code": 1001, "reason": "server shutting down"}
    assert await client.ends()


async def test_signals_tell_the_same_story_on_every_transport(open_client, transport, node):
    heard: list[tuple[str, Any]] = []

    def hear(signal: Any, sender: Any, **kwargs: Any) -> None:
        heard.append((signal.name, kwargs.get("topic") or kwargs.get("code")))

    names = ("client_connected", "subscribed", "client_disconnected")
    for name in names:
        signals.SIGNALS[name].connect(hear)
    try:
        client = await open_client(("t",))
        await client.recv_type("subscribed")
        node.hub.close_all(4010, "disconnected by the backend")
        assert await client.closed_with() == 4010
        await eventually(lambda: len(heard) == 3)
    finally:
        for name in names:
            signals.SIGNALS[name].disconnect(hear)
    assert heard == [("client_connected", None), ("subscribed", "t"),
                     ("client_disconnected", 4010)]
