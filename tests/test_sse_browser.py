"""Chromium's own EventSource against /v1/sse: it reads the stream, and when the server
closes the stream or restarts it reconnects by itself, sends Last-Event-ID and gets
what it missed, with no gap and no duplicate."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from tornado.web import Application, RequestHandler

from server.app import make_app
from server.broker.base import PublishRequest
from server.node import Node
from tests.browser_support import Chromium, require_browser
from tests.server_process import ServerProcess, free_port

pytestmark = pytest.mark.browser
pytest_plugins = ["tests.redis_server"]

# Follows one stream; records its events, named events, and each request's Last-Event-ID.
FOLLOW = """(url) => {
  window.got = []; window.subscribed = []; window.closes = []; window.opens = 0;
  const source = new EventSource(url);
  source.onopen = () => { window.opens += 1; };
  source.onmessage = (e) => window.got.push([e.lastEventId, JSON.parse(e.data)]);
  source.addEventListener("subscribed", (e) => window.subscribed.push(JSON.parse(e.data)));
  source.addEventListener("close", (e) => window.closes.push(JSON.parse(e.data)));
  window.source = source;
}"""


class BlankPage(RequestHandler):
    def get(self) -> None:
        self.write("<!doctype html><title>sse</title>")


@pytest.fixture
def app(node: Node) -> Application:
    application = make_app(node)
    application.add_handlers(r".*", [(r"/blank", BlankPage)])
    return application


async def last_event_ids(requests: list[Any]) -> list[str | None]:
    """The Last-Event-ID header of each stream request the page made."""
    return [(await request.all_headers()).get("last-event-id") for request in requests]


async def open_page(chromium: Chromium, url: str) -> tuple[Any, list[Any]]:
    """A page at ``url`` (the server's own origin), and the stream requests it makes."""
    tab = await chromium.tab()
    requests: list[Any] = []
    tab.page.on("request", lambda r: requests.append(r) if "/v1/sse" in r.url else None)
    await tab.page.goto(url)
    return tab.page, requests


def seen(got: list[Any]) -> list[tuple[str, Any]]:
    return [(event_id, event["data"]) for event_id, event in got]


@pytest.mark.settings(sse_retry=0.1, history_size=100)
@pytest.mark.gen_test(timeout=60)
async def test_eventsource_resumes_with_last_event_id_after_the_server_closes_the_stream(
        chromium, http_server, http_port, node, publish):
    page, requests = await open_page(chromium, f"http://127.0.0.1:{http_port}/blank")
    await page.evaluate(FOLLOW, "/v1/sse?topic=feed.*")
    await page.wait_for_function("window.subscribed.length === 1")
    before = [json.loads((await publish(f"feed.{n % 2}", n)).body)["id"] for n in range(3)]
    await page.wait_for_function("window.got.length === 3")

    node.hub.close_all(1001, "server shutting down")
    # published while the browser is away: only a resume can bring these
    away = await node.hub.publish([PublishRequest("feed.x", n) for n in range(3, 6)])
    await page.wait_for_function("window.subscribed.length === 2 && window.got.length === 6")
    after = json.loads((await publish("feed.y", 6)).body)["id"]
    await page.wait_for_function("window.got.length === 7")

    assert seen(await page.evaluate("window.got")) == [
        *zip(before, range(3), strict=True), *((p.id, n) for n, p in enumerate(away, 3)),
        (after, 6)]
    assert await page.evaluate("window.closes") == [
        {"type": "close", "code": 1001, "reason": "server shutting down"}]
    assert [reply.get("recovered") for reply in await page.evaluate("window.subscribed")] == [
        None, True]
    assert await last_event_ids(requests) == [None, before[-1]]


def test_eventsource_resumes_across_a_restart_of_its_server(redis_url, io_loop):
    """Two nodes on one Redis: the browser's node restarts on its port while the other
    publishes; EventSource reconnects by itself and gets the events of the outage."""
    port = free_port()
    flags = ("--broker", redis_url, "--sse-retry", "0.2")
    publisher = ServerProcess(*flags).start()
    # --port after the ServerProcess's own --port 0: the last one wins
    followers = [ServerProcess("--port", str(port), *flags) for _ in range(2)]
    followers[0].start()
    browser = Chromium(require_browser())

    async def scenario() -> list[Any]:
        page, requests = await open_page(browser, f"{followers[0].url}/healthz")
        await page.evaluate(FOLLOW, "/v1/sse?topic=orders")
        await page.wait_for_function("window.subscribed.length === 1")
        ids = [_post(publisher, "orders", n) for n in range(2)]
        await page.wait_for_function("window.got.length === 2")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, followers[0].stop)
        ids += [_post(publisher, "orders", n) for n in range(2, 4)]  # while it is down
        await loop.run_in_executor(None, followers[1].start)
        await page.wait_for_function("window.got.length === 4", timeout=20_000)
        ids.append(_post(publisher, "orders", 4))
        await page.wait_for_function("window.got.length === 5")
        return [ids, await page.evaluate("window.got"), await page.evaluate("window.closes"),
                await page.evaluate("window.subscribed"), await last_event_ids(requests)]

    try:
        ids, got, closes, subscribed, resumed_from = io_loop.run_sync(scenario, timeout=60)
    finally:
        io_loop.run_sync(browser.close)
        for server in (*followers, publisher):
            if server.process is not None:
                server.stop()
    assert seen(got) == list(zip(ids, range(5), strict=True))
    assert closes[0]["code"] == 1001
    assert subscribed[-1]["recovered"] is True
    # the first request had no id; the one that got through asked from where it stood
    # (retries refused while the server was down show no headers)
    assert resumed_from[0] is None and resumed_from[-1] == ids[1]
    assert set(resumed_from[1:]) <= {ids[1], None}


def _post(server: ServerProcess, topic: str, data: Any) -> str:
    import urllib.request

    request = urllib.request.Request(f"{server.url}/v1/topics/{topic}/events", method="POST",
                                     data=json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["id"]  # type: ignore[no-any-return]
