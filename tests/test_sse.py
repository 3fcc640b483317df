"""``GET /v1/sse`` on its own: the exact stream, resume rules, origins, heartbeats, and a
third-party client (httpx-sse). The browser's own EventSource is in test_sse_browser.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from server.errors import BrokerUnavailable
from tests.auth_support import SECRET, token
from tests.transport_clients import HttpRefused, SseClient

pytestmark = pytest.mark.gen_test(timeout=30)


@pytest.fixture
def sse(http_server, http_port):
    opened: list[SseClient] = []

    async def connect(*topics: str, **options: Any) -> SseClient:
        client = await SseClient.connect(http_port, topics, **options)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


async def post(publish, topic: str, data: Any) -> str:
    response = await publish(topic, data)
    assert response.code == 202
    return json.loads(response.body)["id"]  # type: ignore[no-any-return]


@pytest.mark.settings(sse_retry=0.25)
async def test_the_stream_is_eventsource_framing_with_the_websocket_frames(sse, publish):
    client = await sse("orders.*")
    assert client.headers["content-type"] == "text/event-stream"
    assert client.headers["cache-control"] == "no-cache"
    assert client.headers["x-accel-buffering"] == "no"
    assert "content-length" not in client.headers
    name, event_id, data = await client.event()
    assert (name, event_id) == ("subscribed", None)
    assert json.loads(data)["topic"] == "orders.*"
    assert client.retry == 250  # the stream opened with it
    event_id = await post(publish, "orders.eu", {"text": "two\nlines"})
    name, sent_id, data = await client.event()
    assert (name, sent_id) == (None, event_id)  # unnamed: EventSource.onmessage gets it
    assert "\n" not in data and json.loads(data)["data"] == {"text": "two\nlines"}


@pytest.mark.settings(sse_heartbeat=0.1)
async def test_an_idle_stream_gets_comment_heartbeats(sse, publish):
    client = await sse("quiet")
    await client.recv_type("subscribed")
    before = client.comments
    await asyncio.sleep(0.5)
    event_id = await post(publish, "quiet", 1)
    assert (await client.recv_type("event"))["id"] == event_id  # after the heartbeats
    assert client.comments - before >= 3


@pytest.mark.settings(history_size=100)
async def test_last_event_id_wins_over_since(sse, publish):
    ids = [await post(publish, "t", n) for n in range(5)]
    client = await sse("t", since=ids[0], last_event_id=ids[2])
    assert [event["data"] for event in await client.events(2)] == [3, 4]
    assert (await client.recv_type("subscribed"))["recovered"] is True


async def test_a_resume_of_overlapping_topics_replays_each_subscription_in_turn(sse, publish):
    """Each subscription's replay comes before its own ``subscribed``, in id order, so an
    event that two of them match is replayed for each (squall.js tells them apart)."""
    ids = [await post(publish, f"o.{'ab'[n % 2]}", n) for n in range(5)]
    client = await sse("o.a", "o.*", last_event_id=ids[0])
    assert [event["data"] for event in await client.events(2)] == [2, 4]
    assert (await client.recv_type("subscribed"))["topic"] == "o.a"
    assert [event["data"] for event in await client.events(4)] == [1, 2, 3, 4]
    assert (await client.recv_type("subscribed"))["topic"] == "o.*"


async def test_a_subscription_that_fails_ends_the_stream(sse, node, monkeypatch):
    async def unavailable(name):
        raise BrokerUnavailable("the broker did not answer (test)")

    monkeypatch.setattr(node.broker, "position", unavailable)
    client = await sse("down.a")
    error = await client.recv_type("error")
    assert error["code"] == "broker_unavailable"
    assert await client.closed_with() == 1013  # try again later: EventSource comes back
    assert await client.ends()


async def test_bad_requests_are_answered_before_the_stream(sse):
    for topics, status, code in [((), 400, "invalid_body"), (("a..b",), 400, "invalid_topic")]:
        with pytest.raises(HttpRefused) as refused:
            await sse(*topics)
        assert (refused.value.status, refused.value.code) == (status, code)


@pytest.mark.settings(jwt_secret=SECRET, public_topics=("news.>",))
async def test_a_topic_that_needs_a_credential_is_401_without_one_and_403_with_one(sse):
    """As on every HTTP path: no credential is told to authenticate, a token whose
    grant does not cover the topic is refused."""
    with pytest.raises(HttpRefused) as refused:
        await sse("news.eu", "chat.room3")
    assert (refused.value.status, refused.value.code) == (401, "unauthorized")
    assert refused.value.headers["www-authenticate"].startswith("Bearer")
    with pytest.raises(HttpRefused) as refused:
        await sse("chat.room3", token=token(subscribe=["orders.>"]))
    assert (refused.value.status, refused.value.code) == (403, "forbidden")
    client = await sse("news.eu")
    await client.recv_type("subscribed")


@pytest.mark.settings(allowed_origins=("https://app.example",))
async def test_origins_are_checked_and_allowed_ones_get_cors(sse):
    with pytest.raises(HttpRefused) as refused:
        await sse("t", headers={"Origin": "https://evil.example"})
    assert (refused.value.status, refused.value.code) == (403, "forbidden")
    client = await sse("t", headers={"Origin": "https://app.example"})
    assert client.headers["access-control-allow-origin"] == "https://app.example"
    await client.recv_type("subscribed")


async def test_a_client_going_away_releases_its_session(sse, node):
    client = await sse("t")
    await client.recv_type("subscribed")
    assert len(node.hub.connections) == 1
    client.close()
    from tests.waiting import eventually

    await eventually(lambda: not node.hub.connections and not node.limits.connections.total)


@pytest.mark.settings(history_size=100)
async def test_httpx_sse_reads_the_stream_and_resumes_with_last_event_id(base_url, publish):
    first = await post(publish, "feed", "before")
    async with httpx.AsyncClient(timeout=10) as http:
        seen: list[tuple[str, str, str]] = []
        async with aconnect_sse(http, "GET", f"{base_url}/v1/sse",
                                params={"topic": "feed"}) as source:
            assert source.response.headers["content-type"] == "text/event-stream"
            async for message in source.aiter_sse():
                if not message.data:  # the opening ``retry:`` alone (EventSource skips it)
                    assert message.retry == 3000
                    continue
                seen.append((message.event, message.id, message.data))
                if message.event == "subscribed":
                    live = await post(publish, "feed", "live")
                if message.event == "message":
                    break
        # (an id persists from event to event, as EventSource's lastEventId does)
        assert [(event, event_id) for event, event_id, _ in seen] == [
            ("subscribed", ""), ("message", live)]
        assert json.loads(seen[1][2])["data"] == "live"
        missed = await post(publish, "feed", "missed")
        async with aconnect_sse(http, "GET", f"{base_url}/v1/sse", params={"topic": "feed"},
                                headers={"Last-Event-ID": live}) as source:
            messages = []
            async for message in source.aiter_sse():
                if message.data:
                    messages.append(message)
                if message.event == "subscribed":
                    break
    assert [(m.event, m.id) for m in messages] == [("message", missed), ("subscribed", missed)]
    assert json.loads(messages[1].data)["recovered"] is True
    assert first != live
