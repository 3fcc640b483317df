"""squall.js on Server-Sent Events, in headless Chromium against a real node: chosen by
option or after three failed WebSocket handshakes; resuming with the last id; the
stream reopened when the topics change; publishing over HTTP; the demo page saying
which transport it uses."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from tornado.web import Application

from server.broker.base import PublishRequest
from server.node import Node
from tests.browser_support import Chromium, Tab, harness_app
from tests.server_process import free_port
from tests.waiting import eventually

pytestmark = [pytest.mark.browser, pytest.mark.gen_test(timeout=90)]


@pytest.fixture
def app(node: Node) -> Application:
    return harness_app(node)


async def sse_tab(chromium: Chromium, origin: str) -> tuple[Tab, list[Any]]:
    """A harness page, and the requests it makes to /v1/sse and to the publish path."""
    tab = await chromium.tab()
    requests: list[Any] = []
    tab.page.on("request", lambda r: requests.append(r)
                if "/v1/sse" in r.url or r.method == "POST" else None)
    await tab.open_harness(origin)
    return tab, requests


async def follow_transports(tab: Tab) -> None:
    await tab.eval("""() => { record.transports = [];
      client.on("transport", (t) => record.transports.push(t.transport)); }""")


def stream_queries(requests: list[Any]) -> list[dict[str, list[str]]]:
    return [parse_qs(urlsplit(r.url).query) for r in requests if "/v1/sse" in r.url]


def seen(events: list[dict[str, Any]]) -> list[tuple[str, str, Any]]:
    return [(event["topic"], event["id"], event["data"]) for event in events]


async def http_publish(publish, topic: str, data: Any) -> tuple[str, str, Any]:
    response = await publish(topic, data)
    assert response.code == 202, response.body
    return topic, json.loads(response.body)["id"], data


async def test_the_sse_option_follows_topics_and_publishes_over_http(chromium, origin,
                                                                     publish):
    tab, requests = await sse_tab(chromium, origin)
    await tab.start_client(origin, ("chat.*",), transport="sse")
    await follow_transports(tab)
    assert await tab.all_subscribed() == [{"topic": "chat.*"}]
    assert await tab.eval("client.transport") == "sse"
    first = await http_publish(publish, "chat.a", {"text": "hi"})
    await tab.wait("record.events['chat.*'].length === 1")
    reply = await tab.eval("client.publish('chat.b', {text: 'from the page'})")
    assert (reply["type"], reply["topic"]) == ("published", "chat.b")
    await tab.wait("record.events['chat.*'].length === 2")
    assert seen(await tab.eval("record.events['chat.*']")) == [
        first, ("chat.b", reply["id"], {"text": "from the page"})]
    posted = [r for r in requests if r.method == "POST"]
    assert [urlsplit(r.url).path for r in posted] == ["/v1/topics/chat.b/events"]
    assert (await posted[0].all_headers())["idempotency-key"]
    refused = await tab.eval("client.publish('a..b', 1).then(() => null,"
                             " (error) => [error.name, error.code])")
    assert refused == ["SquallError", "invalid_topic"]
    assert tab.sockets == []  # no WebSocket at all


async def test_three_failed_websocket_handshakes_fall_back_to_sse(chromium, origin, publish):
    tab, requests = await sse_tab(chromium, origin)
    nowhere = f"ws://127.0.0.1:{free_port()}/v1/ws"  # nothing listens: every handshake fails
    await tab.start_client(origin, ("news",), url=nowhere, sseUrl=f"{origin}/v1/sse")
    await follow_transports(tab)
    await tab.all_subscribed()
    assert await tab.eval("record.transports") == ["sse"]
    states = await tab.eval("record.states")
    assert states.count("reconnecting") == 3 and states[-1] == "open"
    closes = await tab.eval("record.closes")
    assert [close["code"] for close in closes] == [1006] * 3
    event = await http_publish(publish, "news", "via sse")
    await tab.wait("record.events.news.length === 1")
    assert seen(await tab.eval("record.events.news")) == [event]
    assert [query["topic"] for query in stream_queries(requests)] == [["news"]]


@pytest.mark.settings(history_size=100)
async def test_sse_resumes_from_the_last_id_after_the_server_closes_it(chromium, origin, node,
                                                                        publish):
    tab, requests = await sse_tab(chromium, origin)
    await tab.start_client(origin, ("feed.a", "feed.*"), transport="sse")
    await tab.all_subscribed()
    before = [await http_publish(publish, topic, n)
              for n, topic in enumerate(["feed.a", "feed.b", "feed.a"])]
    await tab.wait("record.events['feed.*'].length === 3")
    node.hub.close_all(1001, "server shutting down")
    away = await node.hub.publish([PublishRequest(topic, n) for n, topic in
                                   enumerate(["feed.b", "feed.a"], start=3)])
    await tab.wait_open(2)
    after = await http_publish(publish, "feed.a", "end")
    await tab.wait("record.events['feed.a'].some((event) => event.data === 'end')")
    everything = [*before, *((p.topic, p.id, n) for n, p in enumerate(away, start=3)), after]
    events = await tab.eval("record.events")
    assert seen(events["feed.*"]) == everything
    assert seen(events["feed.a"]) == [e for e in everything if e[0] == "feed.a"]
    assert await tab.eval("record.closes") == [
        {"code": 1001, "reason": "server shutting down", "willReconnect": True}]
    queries = stream_queries(requests)
    assert queries[0]["topic"] == ["feed.a", "feed.*"] and "since" not in queries[0]
    assert queries[1]["since"] == [before[-1][1]]
    assert await tab.eval("record.recoveryFailed") == []


async def test_changing_topics_reopens_the_stream(chromium, origin, publish):
    tab, requests = await sse_tab(chromium, origin)
    await tab.start_client(origin, ("a",), transport="sse")
    await tab.all_subscribed()
    await http_publish(publish, "a", 1)
    await tab.wait("record.events.a.length === 1")
    await tab.eval("follow('b')")
    await tab.all_subscribed()
    await tab.eval("subs.a.unsubscribe()")
    await eventually(lambda: len(stream_queries(requests)) >= 3, what="a third stream")
    queries = stream_queries(requests)
    assert [query["topic"] for query in queries] == [["a"], ["a", "b"], ["b"]]
    await http_publish(publish, "a", 2)
    last = await http_publish(publish, "b", 3)
    await tab.wait("record.events.b.length === 1")
    assert seen(await tab.eval("record.events.b")) == [last]
    assert [event["data"] for event in await tab.eval("record.events.a")] == [1]


@pytest.mark.parametrize(("query", "shown"), [("", "over WebSocket"),
                                              ("&transport=sse", "over SSE")])
async def test_the_demo_page_shows_its_transport(chromium, origin, publish, query, shown):
    tab = await chromium.tab()
    await tab.page.goto(f"{origin}/?topic=news{query}")
    await tab.page.wait_for_selector('.chip[data-topic="news"]:not(.pending)')
    assert await tab.page.inner_text("#transport") == shown
    _, event_id, _ = await http_publish(publish, "news", {"headline": "hi"})
    entry = tab.page.locator('#log .event[data-topic="news"]')
    await entry.wait_for()
    assert await entry.locator(".id").inner_text() == event_id
