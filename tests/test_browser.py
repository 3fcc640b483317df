"""squall.js in a real headless Chromium, against a real node (the demo page:
tests/test_demo.py).

The node runs in-process (pytest-tornado), so a test can close every connection from
the server side (``node.hub.close_all``) and publish while the browser is away, with
the history kept. Pages talk to the node over real sockets; Playwright's async API
shares the test's IOLoop with the server. The test pages that load squall.js are
served by the node itself: Chromium's Local Network Access checks refuse a WebSocket
to a loopback address from a page that did not come from one (a page made up by
Playwright's router counts as public).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from tornado.httpclient import HTTPResponse
from tornado.web import Application

from server import signals
from server.broker.base import PublishRequest
from server.node import Node
from server.topics import matches
from tests.browser_support import Chromium, Tab, harness_app

pytestmark = [pytest.mark.browser, pytest.mark.gen_test(timeout=90)]

JWT_SECRET = "browser-tests-" + "0123456789abcdef" * 2
Publish = Callable[..., Awaitable[HTTPResponse]]


@pytest.fixture
def app(node: Node) -> Application:
    return harness_app(node)


@pytest.fixture
def socket_handlers() -> Iterator[list[Any]]:
    """The server side of every WebSocket opened during the test, in order."""
    handlers: list[Any] = []

    def opened(signal: Any, sender: Any, **kwargs: Any) -> None:
        handlers.append(sender)

    signals.client_connected.connect(opened)
    yield handlers
    signals.client_connected.disconnect(opened)


async def client_tab(chromium: Chromium, origin: str, loading: str = "classic") -> Tab:
    tab = await chromium.tab()
    await tab.open_harness(origin, loading)
    return tab


async def http_publish(publish: Publish, topic: str, data: Any) -> tuple[str, str, Any]:
    response = await publish(topic, data)
    assert response.code == 202, response.body
    return topic, json.loads(response.body)["id"], data


def seen(events: list[dict[str, Any]]) -> list[tuple[str, str, Any]]:
    return [(event["topic"], event["id"], event["data"]) for event in events]


def mint(lifetime: int, subscribe: tuple[str, ...] = (), publish: tuple[str, ...] = ()) -> str:
    """A JWT for "ada", as an app's backend would mint it for its page."""
    import jwt

    claims = {"sub": "ada", "exp": int(time.time()) + lifetime,
              "squall": {"subscribe": list(subscribe), "publish": list(publish)}}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


async def tokens_sent(tab: Tab, connections: int) -> list[list[str]]:
    """The ``?token=`` of each of the page's first ``connections`` WebSockets."""
    sockets = await tab.until(lambda: len(tab.sockets) >= connections and tab.sockets)
    return [parse_qs(urlsplit(socket.url).query).get("token", []) for socket in sockets]


# -- loading squall.js, and its API -------------------------------------------------


@pytest.mark.parametrize("loading", ["module", "classic"])
async def test_squall_js_loads_as_module_and_as_classic_script(chromium, origin, publish,
                                                               loading):
    tab = await client_tab(chromium, origin, loading)
    if loading == "module":
        assert await tab.eval("window.namedExport === window.SquallUnderTest")
    await tab.start_client(origin, ("greet",))
    assert await tab.all_subscribed() == [{"topic": "greet"}]

    response = await publish("greet", {"hello": "browser"})
    accepted = json.loads(response.body)
    await tab.wait("record.events.greet.length === 1")
    assert await tab.eval("record.events.greet[0]") == {
        "type": "event", "topic": "greet", "id": accepted["id"], "ts": accepted["ts"],
        "data": {"hello": "browser"}}

    reply = await tab.eval("client.publish('greet', [1, 2])")
    assert reply["type"] == "published" and reply["topic"] == "greet"
    await tab.wait("record.events.greet.length === 2")
    assert await tab.eval("record.events.greet[1].id") == reply["id"]

    refused = await tab.eval("client.publish('a..b', 1).then(() => null,"
                             " (error) => [error.name, error.code])")
    assert refused == ["SquallError", "invalid_topic"]


async def test_subscribes_and_publishes_made_while_connecting_are_buffered(chromium, origin):
    tab = await client_tab(chromium, origin)
    await tab.start_client(origin, autoConnect=False)
    state_then, reply = await tab.eval("""() => {
      client.connect();
      const state = client.state;
      follow("chat.room");
      return client.publish("chat.room", "early").then((reply) => [state, reply]);
    }""")
    assert state_then == "connecting"
    await tab.wait("record.events['chat.room'].length === 1")
    assert await tab.eval("record.events['chat.room'][0].id") == reply["id"]
    # subscribe went first, then the publish, both once
    frames = await tab.until(lambda: len(tab.sockets[0].sent) >= 2 and tab.sockets[0].sent)
    assert [frame["type"] for frame in frames] == ["subscribe", "publish"]
    assert frames[1]["idempotency_key"]


async def test_unsubscribe_stops_delivery(chromium, origin, publish):
    tab = await client_tab(chromium, origin)
    await tab.start_client(origin, ("left", "stay"))
    await tab.all_subscribed()
    await tab.eval("subs.left.unsubscribe()")
    await http_publish(publish, "left", 1)
    await http_publish(publish, "stay", 2)
    await tab.wait("record.events.stay.length === 1")
    assert await tab.eval("record.events.left") == []
    [unsubscribe] = await tab.until(lambda: tab.sockets[0].sent_of_type("unsubscribe"))
    assert unsubscribe["topic"] == "left"


async def test_close_rejects_pending_publishes_and_connect_resumes(chromium, origin, publish):
    tab = await client_tab(chromium, origin)
    await tab.start_client(origin, ("again",))
    refused = await tab.eval("(() => { const p = client.publish('again', 1); client.close();"
                             " return p.then(() => null, (error) => error.code); })()")
    assert refused == "closed"
    await tab.assert_stays_closed()
    await tab.eval("client.connect()")
    await tab.wait_open()
    await tab.all_subscribed()
    await http_publish(publish, "again", 2)
    # the refused publish may have reached the server before the close: then the resume
    # replays it first
    await tab.wait("record.events.again.some((event) => event.data === 2)")
    assert [event["data"] for event in await tab.eval("record.events.again")] in ([2], [1, 2])


async def test_pattern_matching_agrees_with_the_server(chromium, origin):
    table = [("orders.*", "orders.eu"), ("orders.*", "orders.eu.x"), ("orders.*", "orders"),
             ("orders.>", "orders.eu.x"), ("orders.>", "orders"), ("a.*.c", "a.b.c"),
             ("a.*.c", "a.b.d"), ("*", "a"), ("*", "a.b"), (">", "a.b"), ("a.b", "a.b"),
             ("a.b", "a.bc"), ("*.>", "a"), ("*.>", "a.b.c"), ("a.*.>", "a.b")]
    tab = await client_tab(chromium, origin)
    got = await tab.eval("(pairs) => pairs.map(([p, t]) => SquallUnderTest.topicMatches(p, t))",
                         table)
    assert got == [matches(pattern, topic) for pattern, topic in table]


async def test_backoff_is_exponential_capped_and_jittered(chromium, origin):
    tab = await client_tab(chromium, origin)
    low, high, spread = await tab.eval("""() => {
      const backoff = {initial: 500, max: 30000, factor: 2};
      const at = (random) => [...Array(10).keys()].map(
        (n) => SquallUnderTest.backoffDelay(n, backoff, () => random));
      const spread = new Set([...Array(20)].map(() => SquallUnderTest.backoffDelay(3, backoff)));
      return [at(0), at(1), spread.size];
    }""")
    ceilings = [min(30000, 500 * 2**n) for n in range(10)]
    assert high == ceilings
    assert low == [ceiling // 2 for ceiling in ceilings]
    assert spread > 1


# -- reconnecting and resuming ------------------------------------------------------


@pytest.mark.parametrize("code", [1001, 4008])
async def test_resumes_after_a_server_side_close_with_nothing_missed_or_doubled(
        chromium, origin, node, publish, code):
    tab = await client_tab(chromium, origin)
    await tab.start_client(origin, ("feed.a", "feed.*"))
    await tab.all_subscribed()
    before = [await http_publish(publish, topic, n)
              for n, topic in enumerate(["feed.a", "feed.b", "feed.a", "feed.b"])]
    await tab.wait("record.events['feed.*'].length === 4")

    node.hub.close_all(code, "going away")
    # the closing connections take no more events: these can only come back by resuming.
    # Both subscriptions replay feed.a's event; feed.* must still see it once, in order.
    published = await node.hub.publish([PublishRequest(topic, n) for n, topic in
                                        enumerate(["feed.b", "feed.a", "feed.b"], start=4)])
    meanwhile = [(p.topic, p.id, n) for n, p in enumerate(published, start=4)]
    await tab.wait_open(2)
    after = [await http_publish(publish, topic, n)
             for n, topic in enumerate(["feed.b", "feed.a"], start=7)]
    await tab.wait("record.events['feed.*'].length >= 9 && record.events['feed.a'].length >= 4")
    end = await http_publish(publish, "feed.a", "end")
    await tab.wait("record.events['feed.a'].some((event) => event.data === 'end')")

    everything = [*before, *meanwhile, *after, end]
    events = await tab.eval("record.events")
    assert seen(events["feed.*"]) == everything
    assert seen(events["feed.a"]) == [e for e in everything if e[0] == "feed.a"]
    assert await tab.eval("record.closes") == [
        {"code": code, "reason": "going away", "willReconnect": True}]
    resubscribed = await tab.until(
        lambda: len(tab.sockets) == 2 and tab.sockets[1].sent_of_type("subscribe"))
    resumed = {frame["topic"]: frame.get("since") for frame in resubscribed}
    assert resumed == {"feed.a": before[2][1], "feed.*": before[3][1]}
    assert await tab.eval("record.recoveryFailed") == []


async def test_a_stale_since_is_surfaced_as_recovery_failed(chromium, origin, publish):
    tab = await client_tab(chromium, origin)
    await tab.start_client(origin)
    ready = await tab.eval("follow('news', {since: 'gone-1'})")
    assert ready == {"topic": "news", "recovered": False}
    await tab.wait("record.recoveryFailed.length === 1 && record.callbacks.length === 1")
    failure = {"topic": "news", "since": "gone-1"}
    assert await tab.eval("[record.recoveryFailed, record.callbacks]") == [[failure], [failure]]
    live = await http_publish(publish, "news", "live")
    await tab.wait("record.events.news.length === 1")
    assert seen(await tab.eval("record.events.news")) == [live]


async def test_a_subscription_that_saw_no_event_resumes_from_where_it_started(
        chromium, origin, node, publish):
    tab = await client_tab(chromium, origin)
    await tab.start_client(origin, ("quiet",))
    await tab.all_subscribed()
    [reply] = await tab.until(lambda: tab.sockets and tab.sockets[0].received_of_type(
        "subscribed"))
    node.hub.close_all(1001, "going away")
    [missed] = await node.hub.publish([PublishRequest("quiet", "while away")])
    await tab.wait("record.events.quiet.length === 1")
    assert seen(await tab.eval("record.events.quiet")) == [("quiet", missed.id, "while away")]
    [resumed] = await tab.until(lambda: len(tab.sockets) == 2 and tab.sockets[1].sent_of_type(
        "subscribe"))
    assert resumed["since"] == reply["last_id"]


async def test_a_gap_is_reported_before_the_events_replayed_after_it(chromium, origin, publish):
    """After a restart (a forgotten epoch) the server replays what it kept since: the app
    hears of the gap first, then those events, then live ones."""
    kept = [await http_publish(publish, "restarted", n) for n in range(3)]
    tab = await client_tab(chromium, origin)
    await tab.start_client(origin)
    ready = await tab.eval("follow('restarted', {since: 'zzzzzz-7'})")
    assert ready == {"topic": "restarted", "recovered": False}
    live = await http_publish(publish, "restarted", "live")
    await tab.wait("record.events.restarted.length === 4")
    assert await tab.eval("record.journal") == [
        "gap restarted", "restarted 0", "restarted 1", "restarted 2", "restarted live"]
    assert seen(await tab.eval("record.events.restarted")) == [*kept, live]


@pytest.mark.settings(history_size=1)
async def test_history_lost_during_an_outage_is_surfaced_as_recovery_failed(
        chromium, origin, node, publish):
    tab = await client_tab(chromium, origin)
    await tab.start_client(origin, ("ticks",))
    await tab.all_subscribed()
    first = await http_publish(publish, "ticks", 1)
    await tab.wait("record.events.ticks.length === 1")

    node.hub.close_all(4009, "events lost")
    await node.hub.publish([PublishRequest("ticks", n) for n in (2, 3, 4)])  # keeps only 4
    await tab.wait("record.recoveryFailed.length === 1")
    assert await tab.eval("record.recoveryFailed") == [{"topic": "ticks", "since": first[1]}]
    live = await http_publish(publish, "ticks", 5)
    await tab.wait("record.events.ticks.length === 2")
    # never part of a gap: the app reloads its state instead
    assert seen(await tab.eval("record.events.ticks")) == [first, live]


async def test_unauthorized_close_asks_get_token_then_stops_without_one(
        chromium, origin, node, publish):
    tab = await client_tab(chromium, origin)
    await tab.start_client(origin, ("inbox",), tokens=["second"], token="first")
    await tab.all_subscribed()

    node.hub.close_all(4001, "token expired")
    await tab.wait_open(2)
    await tab.all_subscribed()
    assert await tab.eval("record.tokenRequests") == [{"code": 4001, "reason": "token expired"}]
    assert await tokens_sent(tab, 2) == [["first"], ["second"]]
    await http_publish(publish, "inbox", "hi")
    await tab.wait("record.events.inbox.length === 1")

    node.hub.close_all(4001, "token expired")  # and now getToken has none to give
    await tab.wait("client.state === 'closed'")
    assert await tab.eval("record.tokenRequests.length") == 2
    await tab.assert_stays_closed()


async def test_get_token_supplies_the_first_token(chromium, origin):
    tab = await client_tab(chromium, origin)
    await tab.start_client(origin, ("inbox",), tokens=["minted"])
    await tab.wait_open()
    assert await tab.eval("record.tokenRequests") == [{"code": None, "reason": ""}]
    assert await tokens_sent(tab, 1) == [["minted"]]


@pytest.mark.settings(jwt_secret=JWT_SECRET)
async def test_a_token_the_server_refuses_is_replaced_through_get_token(chromium, origin,
                                                                         publish):
    expired = mint(-60, subscribe=("user:ada.>",))
    fresh = mint(600, subscribe=("user:ada.>",))
    tab = await client_tab(chromium, origin)
    await tab.start_client(origin, ("user:ada.inbox",), tokens=[fresh], token=expired)
    assert await tab.all_subscribed() == [{"topic": "user:ada.inbox"}]
    assert await tokens_sent(tab, 2) == [[expired], [fresh]]
    assert [request["code"] for request in await tab.eval("record.tokenRequests")] == [4001]

    backend = {"Authorization": f"Bearer {mint(60, publish=('user:ada.>',))}"}
    response = await publish("user:ada.inbox", {"unread": 1}, headers=backend)
    assert response.code == 202, response.body
    await tab.wait("record.events['user:ada.inbox'].length === 1")
    refused = await tab.eval("follow('orders.eu').then(() => null, (error) => error.code)")
    assert refused == "forbidden"


@pytest.mark.parametrize("code", [1000, 1009, 4000, 4003, 4001])
async def test_terminal_close_codes_stop_reconnecting(chromium, origin, node, code):
    tab = await client_tab(chromium, origin)
    await tab.start_client(origin, ("t",))  # no getToken: 4001 is terminal too
    await tab.all_subscribed()
    node.hub.close_all(code, "bye")
    await tab.wait("client.state === 'closed'")
    assert await tab.eval("record.closes") == [
        {"code": code, "reason": "bye", "willReconnect": False}]
    await tab.assert_stays_closed()


@pytest.mark.parametrize("code", [1001, 4008, 4009, 4029, None])
async def test_other_closes_reconnect_with_backoff(chromium, origin, node, socket_handlers,
                                                   code):
    tab = await client_tab(chromium, origin)
    await tab.start_client(origin, ("t",))
    await tab.all_subscribed()
    if code is None:  # the TCP connection drops without a close frame
        socket_handlers[-1].transport.abort()
    else:
        node.hub.close_all(code, "again later")
    await tab.wait_open(2)
    await tab.all_subscribed()
    [close] = await tab.eval("record.closes")
    assert close["code"] == (code or 1006) and close["willReconnect"]
    assert await tab.eval("record.states") == [
        "connecting", "open", "reconnecting", "connecting", "open"]
    waited = await tab.eval("record.transitions[2].delay")
    assert 10 <= waited <= 20  # the first backoff step: initial (20 ms) with jitter


async def test_ping_detects_a_dead_connection(chromium, origin, publish):
    tab = await client_tab(chromium, origin)
    attempts: list[Any] = []
    heard: list[dict[str, Any]] = []

    def hear(message: str | bytes) -> None:
        heard.append(json.loads(message))

    def route(socket: Any) -> None:
        attempts.append(socket)
        if len(attempts) == 1:  # the first connection opens, then never answers
            socket.on_message(hear)
        else:
            socket.connect_to_server()

    await tab.page.route_web_socket("**/v1/ws*", route)
    await tab.start_client(origin, ("alive",), pingInterval=100, pingTimeout=2000)
    await tab.wait_open(2)
    assert await tab.eval("record.closes") == [
        {"code": 1006, "reason": "ping timeout", "willReconnect": True}]
    assert [frame["type"] for frame in heard[:2]] == ["subscribe", "ping"]

    await tab.all_subscribed()
    await http_publish(publish, "alive", 1)
    await tab.wait("record.events.alive.length === 1")
    # the live connection answers its pings and stays up
    live = await tab.until(
        lambda: next((socket for socket in tab.sockets if socket.received_of_type("pong")), None))
    pongs = len(live.received_of_type("pong"))
    await tab.until(lambda: len(live.received_of_type("pong")) >= pongs + 3)
    assert await tab.eval("record.closes.length") == 1


# -- presence frames and the backend's disconnect ------------------------------------


@pytest.mark.parametrize("transport", ["websocket", "sse"])
@pytest.mark.settings(presence_topics=("room.>",))
async def test_join_and_leave_reach_listeners_and_4010_stops_the_client(
        chromium, origin, ws_connect, http_client, transport):
    tab = await client_tab(chromium, origin)
    await tab.start_client(origin, ("room.b",), transport=transport)
    await tab.all_subscribed()
    await tab.eval("""() => {
      window.presence = [];
      client.on("join", (frame) => presence.push(frame));
      client.on("leave", (frame) => presence.push(frame));
    }""")
    other = await ws_connect(query="topic=room.b")
    await other.recv_type("subscribed")
    await tab.wait("presence.length === 1")
    await other.socket.close()
    await tab.wait("presence.length === 2")
    join, leave = await tab.eval("presence")
    assert (join["type"], join["topic"], leave["type"]) == ("join", "room.b", "leave")
    assert join["client"] == leave["client"] and set(join["client"]) == {"id", "sub", "info"}
    listed = json.loads((await http_client.fetch(f"{origin}/v1/topics/room.b/presence")).body)
    [mine] = listed["clients"]
    response = await http_client.fetch(f"{origin}/v1/disconnect", method="POST",
                                       body=json.dumps({"client": mine["id"]}))
    assert response.code == 202
    await tab.wait("client.state === 'closed'")
    assert (await tab.eval("record.closes"))[-1]["code"] == 4010
    await tab.assert_stays_closed()
