"""WebSocket subscribe and publish, end to end on real sockets."""

from __future__ import annotations

import json

import pytest
import websockets

from tests.rawws import RawSocket, close_code

pytestmark = pytest.mark.gen_test(timeout=20)


async def test_http_publish_reaches_json_and_msgpack_subscribers(ws_connect, publish):
    exact = await ws_connect(query="topic=orders.eu")
    pattern = await ws_connect(codec="msgpack")
    tail = await ws_connect()
    assert (await exact.recv_type("subscribed"))["topic"] == "orders.eu"
    assert "recovered" not in await pattern.subscribe("orders.*", ref=1)
    await tail.subscribe("orders.>")

    response = await publish("orders.eu", {"n": 1, "text": "héllo"})
    assert response.code == 202
    accepted = json.loads(response.body)

    for client in (exact, pattern, tail):
        event = await client.recv_type("event")
        assert event == {"type": "event", "topic": "orders.eu", "id": accepted["id"],
                         "ts": accepted["ts"], "data": {"n": 1, "text": "héllo"}}


async def test_events_arrive_in_publish_order_once_each(ws_connect, publish):
    client = await ws_connect()
    # both patterns match every event: the connection still gets each one once
    await client.subscribe("feed.*")
    await client.subscribe("feed.>")
    await client.subscribe("feed.a")
    for n in range(50):
        assert (await publish("feed.a", n)).code == 202
    await (await ws_connect()).subscribe("feed.b")  # a later reply proves nothing else came
    assert (await publish("feed.b", "end")).code == 202
    events = await client.events(51)
    assert [event["data"] for event in events] == [*range(50), "end"]
    await client.send({"type": "ping", "ref": "last"})
    assert await client.recv() == {"type": "pong", "ref": "last"}


async def test_pattern_subscriptions_do_not_overmatch(ws_connect, publish):
    client = await ws_connect()
    await client.subscribe("a.*.c")
    for topic in ("a.c", "a.b.c.d", "x.b.c", "a.b.d", "a.b.c"):
        await publish(topic, topic)
    assert (await client.recv_type("event"))["topic"] == "a.b.c"
    await client.send({"type": "ping"})
    assert await client.recv() == {"type": "pong"}


async def test_client_publish_over_websocket(ws_connect):
    publisher = await ws_connect(codec="msgpack")
    subscriber = await ws_connect(query="topic=chat.room1")
    await subscriber.recv_type("subscribed")
    await publisher.send({"type": "publish", "topic": "chat.room1", "data": {"text": "hi"},
                          "ref": 3})
    reply = await publisher.recv_type("published")
    assert reply["ref"] == 3 and reply["topic"] == "chat.room1"
    event = await subscriber.recv_type("event")
    assert event["id"] == reply["id"] and event["data"] == {"text": "hi"}


async def test_unsubscribe_stops_delivery(ws_connect, publish):
    client = await ws_connect()
    await client.subscribe("news")
    await client.send({"type": "unsubscribe", "topic": "news", "ref": 2})
    assert await client.recv() == {"type": "unsubscribed", "topic": "news", "ref": 2}
    await publish("news", 1)
    await client.send({"type": "ping"})
    assert await client.recv() == {"type": "pong"}


async def test_msgpack_subscriber_gets_binary_frames(ws_connect, publish):
    client = await ws_connect(codec="msgpack")
    await client.subscribe("bin")
    await publish("bin", [1, 2.5, None, True])
    raw_frame = await client.socket.recv()
    assert isinstance(raw_frame, bytes)


async def test_default_subprotocol_is_json(ws_url, publish):
    async with websockets.connect(ws_url + "?topic=plain") as socket:
        assert socket.subprotocol is None
        assert json.loads(await socket.recv())["type"] == "subscribed"
        await publish("plain", "x")
        assert json.loads(await socket.recv())["data"] == "x"


@pytest.mark.parametrize(("frame", "code"), [
    ("not json", "invalid_body"),
    ("[1, 2]", "invalid_body"),
    ('{"topic": "a"}', "invalid_body"),
    ('{"type": "dance"}', "invalid_body"),
    ('{"type": "subscribe"}', "invalid_body"),
    ('{"type": "subscribe", "topic": "a..b", "ref": 9}', "invalid_topic"),
    ('{"type": "subscribe", "topic": 42}', "invalid_topic"),
    ('{"type": "subscribe", "topic": "a.>.b"}', "invalid_topic"),
    ('{"type": "publish", "topic": "a.*", "data": 1}', "invalid_topic"),
    ('{"type": "publish", "topic": "a"}', "invalid_body"),
    ('{"type": "subscribe", "topic": "a", "since": 5}', "invalid_body"),
    ('{"type": "ping", "ref": {"no": "objects"}}', "invalid_body"),
    ('{"type": "unsubscribe", "topic": "never.subscribed"}', "not_found"),
    ("NaN", "invalid_body"),
    ('{"type": "ping"', "invalid_body"),
])
async def test_bad_frames_get_error_frames_and_the_connection_stays(ws_connect, frame, code):
    client = await ws_connect()
    await client.socket.send(frame)
    error = await client.recv_type("error")
    assert error["code"] == code and error["message"]
    if '"ref": 9' in frame:
        assert error["ref"] == 9
    await client.send({"type": "ping", "ref": 1})
    assert await client.recv() == {"type": "pong", "ref": 1}


async def test_garbage_bytes_on_each_subprotocol(ws_connect):
    as_json = await ws_connect()
    as_msgpack = await ws_connect(codec="msgpack")
    await as_json.socket.send(b"\xff\xfe\x00garbage")
    await as_msgpack.socket.send(b"\xc1")  # never used in msgpack
    await as_msgpack.socket.send("text on the binary subprotocol")
    assert (await as_json.recv_type("error"))["code"] == "invalid_body"
    assert (await as_msgpack.recv_type("error"))["code"] == "invalid_body"
    assert (await as_msgpack.recv_type("error"))["code"] == "invalid_body"


@pytest.mark.settings(max_frame_bytes=1024)
async def test_oversize_frame_closes_with_1009(ws_connect):
    client = await ws_connect()
    await client.send({"type": "publish", "topic": "big", "data": "x" * 2000})
    assert await client.closed_with() == 1009


@pytest.mark.settings(max_event_bytes=100)
async def test_oversize_event_over_websocket_is_an_error(ws_connect):
    client = await ws_connect()
    await client.send({"type": "publish", "topic": "big", "data": "x" * 200, "ref": 1})
    error = await client.recv_type("error")
    assert (error["code"], error["ref"]) == ("payload_too_large", 1)
    await client.send({"type": "publish", "topic": "small", "data": "x" * 50})
    await client.recv_type("published")


@pytest.mark.settings(max_bad_frames=3)
async def test_too_many_bad_frames_close_with_4000(ws_connect, publish):
    abuser = await ws_connect()
    bystander = await ws_connect(query="topic=calm")
    await bystander.recv_type("subscribed")
    for _ in range(4):
        await abuser.socket.send("nope")
    assert await abuser.closed_with() == 4000
    await publish("calm", "still here")
    assert (await bystander.recv_type("event"))["data"] == "still here"


@pytest.mark.settings(max_subscriptions=2)
async def test_subscription_limit(ws_connect):
    client = await ws_connect()
    await client.subscribe("a")
    await client.subscribe("b")
    await client.subscribe("a")  # again: not a new subscription
    await client.send({"type": "subscribe", "topic": "c", "ref": 5})
    error = await client.recv_type("error")
    assert (error["code"], error["ref"]) == ("too_many_subscriptions", 5)


@pytest.mark.settings(ping_interval=0.3, ping_timeout=0.3)
async def test_server_pings_and_closes_clients_that_stop_answering(ws_connect, http_port):
    answering = await ws_connect()
    silent = await RawSocket.connect(http_port)
    try:
        opcodes = []
        while 0x8 not in opcodes:  # until the server gives up on the silent client
            opcode, payload = await silent.read_frame(timeout=5)
            opcodes.append(opcode)
        assert opcodes[0] == 0x9  # a server ping, never answered
        assert close_code(payload) == 1001  # "going away": clients reconnect
    finally:
        silent.close()
    await answering.send({"type": "ping"})
    assert await answering.recv() == {"type": "pong"}


async def test_query_topics_subscribe_at_once(ws_connect, publish):
    client = await ws_connect(query="topic=q.a&topic=q.*&topic=bad..topic")
    replies = [await client.recv() for _ in range(3)]
    assert [reply["type"] for reply in replies] == ["subscribed", "subscribed", "error"]
    await publish("q.a", 1)
    assert (await client.recv_type("event"))["data"] == 1
