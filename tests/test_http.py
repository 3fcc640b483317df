"""The HTTP API: publishing, batches, errors, content negotiation."""

from __future__ import annotations

import json

import msgpack
import pytest

from tests.conftest import body_of

pytestmark = pytest.mark.gen_test(timeout=20)


async def fetch(http_client, base_url, path, **kwargs):
    return await http_client.fetch(base_url + path, raise_error=False, **kwargs)


async def test_publish_json_answers_202_with_id_and_ts(publish):
    response = await publish("orders.eu", {"any": "value"})
    assert response.code == 202
    assert response.headers["Content-Type"] == "application/json"
    body = json.loads(response.body)
    assert set(body) == {"topic", "id", "ts"} and body["topic"] == "orders.eu"
    later = json.loads((await publish("orders.eu", 2)).body)
    assert later["id"] != body["id"] and later["ts"] >= body["ts"]


@pytest.mark.parametrize("media", ["application/msgpack", "application/x-msgpack"])
async def test_publish_msgpack_body_reaches_json_subscriber(ws_connect, publish, media):
    client = await ws_connect(query="topic=bin.x")
    await client.recv_type("subscribed")
    response = await publish("bin.x", body=msgpack.packb({"k": [1, 2]}),
                             headers={"Content-Type": media, "Accept": "application/msgpack"})
    assert response.code == 202
    assert response.headers["Content-Type"] == "application/msgpack"
    assert msgpack.unpackb(response.body)["topic"] == "bin.x"
    assert (await client.recv_type("event"))["data"] == {"k": [1, 2]}


async def test_msgpack_only_values_reach_json_subscribers_as_json(ws_connect, publish):
    client = await ws_connect(query="topic=raw")
    await client.recv_type("subscribed")
    await publish("raw", body=msgpack.packb({"blob": b"\x00\x01", 1: 2.5}),
                  headers={"Content-Type": "application/msgpack"})
    assert (await client.recv_type("event"))["data"] == {"blob": "AAE=", "1": 2.5}
    # extension types are null, a timestamp is milliseconds (null past 64 bits), and a
    # key that is not a string is the JSON text of its converted value
    odd = {"ext": msgpack.ExtType(5, b"abc"), "at": msgpack.Timestamp(1, 500_000_000),
           "far": msgpack.Timestamp(2**63 - 1), "before": msgpack.Timestamp(-2**63),
           None: "nil", True: "yes", b"\x00\x01": "bytes", msgpack.ExtType(7, b"z"): "ext"}
    await publish("raw", body=msgpack.packb(odd, datetime=False),
                  headers={"Content-Type": "application/msgpack"})
    assert (await client.recv_type("event"))["data"] == {
        "ext": None, "at": 1500, "far": None, "before": None, "null": "ext", "true": "yes",
        "AAE=": "bytes"}


async def test_batch_publish_in_order(ws_connect, http_client, base_url):
    client = await ws_connect()
    await client.subscribe("batch.*")
    events = [{"topic": f"batch.{n % 2}", "data": n} for n in range(10)]
    response = await fetch(http_client, base_url, "/v1/events", method="POST",
                           body=json.dumps({"events": events}))
    assert response.code == 202
    answered = json.loads(response.body)["events"]
    assert [entry["topic"] for entry in answered] == [event["topic"] for event in events]
    received = await client.events(10)
    assert [event["data"] for event in received] == list(range(10))
    assert [event["id"] for event in received] == [entry["id"] for entry in answered]


@pytest.mark.parametrize("body", [
    {"events": [{"topic": "ok", "data": 1}, {"topic": "bad..topic", "data": 2}]},
    {"events": [{"topic": "ok", "data": 1}, {"topic": "ok"}]},
])
async def test_batch_is_validated_whole_before_publishing(ws_connect, http_client, base_url,
                                                           body):
    client = await ws_connect(query="topic=ok")
    await client.recv_type("subscribed")
    response = await fetch(http_client, base_url, "/v1/events", method="POST",
                           body=json.dumps(body))
    assert response.code == 400
    assert "events[1]" in body_of(response)["error"]["message"]
    await client.send({"type": "ping"})
    assert await client.recv() == {"type": "pong"}  # nothing was published


async def test_idempotency_key_publishes_once(ws_connect, publish):
    client = await ws_connect(query="topic=pay")
    await client.recv_type("subscribed")
    first = await publish("pay", {"amount": 5}, headers={"Idempotency-Key": "k1"})
    again = await publish("pay", {"amount": 5}, headers={"Idempotency-Key": "k1"})
    other_topic = await publish("pay.other", 1, headers={"Idempotency-Key": "k1"})
    assert first.code == again.code == other_topic.code == 202
    assert json.loads(first.body)["id"] == json.loads(again.body)["id"]
    assert (await client.recv_type("event"))["data"] == {"amount": 5}
    await client.send({"type": "ping"})
    assert await client.recv() == {"type": "pong"}


@pytest.mark.settings(max_event_bytes=100, max_batch_events=3)
@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "code"), [
    ("POST", "/v1/topics/a..b/events", b"1", {}, 400, "invalid_topic"),
    ("POST", "/v1/topics/a.*/events", b"1", {}, 400, "invalid_topic"),
    ("POST", "/v1/topics/a%20b/events", b"1", {}, 400, "invalid_topic"),
    ("POST", "/v1/topics/" + "a" * 256 + "/events", b"1", {}, 400, "invalid_topic"),
    ("POST", "/v1/topics/a/events", b"{nope", {}, 400, "invalid_body"),
    ("POST", "/v1/topics/a/events", b"", {}, 400, "invalid_body"),
    ("POST", "/v1/topics/a/events", b"NaN", {}, 400, "invalid_body"),
    ("POST", "/v1/topics/a/events", b'{"s": "\\ud800"}', {}, 400, "invalid_body"),
    ("POST", "/v1/topics/a/events", b'{"n": 100000000000000000000000}', {}, 400,
     "invalid_body"),
    ("POST", "/v1/topics/a/events", b"\xc1", {"Content-Type": "application/msgpack"}, 400,
     "invalid_body"),
    ("POST", "/v1/topics/a/events", b"1", {"Content-Type": "text/plain"}, 415,
     "unsupported_media_type"),
    ("POST", "/v1/topics/a/events", b'"' + b"x" * 200 + b'"', {}, 413, "payload_too_large"),
    ("POST", "/v1/events", b'{"events": 1}', {}, 400, "invalid_body"),
    ("POST", "/v1/events", b'{"events": []}', {}, 400, "invalid_body"),
    ("POST", "/v1/events", json.dumps({"events": [{"topic": "a", "data": 1}] * 4}).encode(),
     {}, 413, "payload_too_large"),
    ("POST", "/v1/events", json.dumps({"events": [{"topic": "a", "data": "x" * 200}]}).encode(),
     {}, 413, "payload_too_large"),
    ("POST", "/v1/topics/a/events", b"1", {"Idempotency-Key": "k" * 300}, 400, "invalid_body"),
    ("GET", "/nowhere", None, {}, 404, "not_found"),
    ("GET", "/v1/topics/a/events?limit=zero", None, {}, 400, "invalid_body"),
    ("GET", "/v1/topics/a..b/events", None, {}, 400, "invalid_topic"),
    ("DELETE", "/v1/topics/a/events", None, {}, 405, "method_not_allowed"),
    ("PUT", "/v1/events", b"{}", {}, 405, "method_not_allowed"),
])
async def test_errors_are_clear_json(http_client, base_url, method, path, body, headers, status,
                                     code):
    response = await fetch(http_client, base_url, path, method=method, body=body,
                           headers={"Content-Type": "application/json", **headers},
                           allow_nonstandard_methods=True)
    assert response.code == status
    assert response.headers["Content-Type"] == "application/json"
    error = json.loads(response.body)["error"]
    assert error["code"] == code and error["message"]
    assert "Traceback" not in response.body.decode()


@pytest.mark.parametrize(("accept", "media"), [
    ("application/msgpack", "application/msgpack"),
    ("application/x-msgpack;q=0.9, */*;q=0.1", "application/msgpack"),
    ("application/json;q=0.5, application/msgpack", "application/msgpack"),
    ("application/msgpack;q=0.5, application/json", "application/json"),
    ("application/json, application/msgpack", "application/json"),  # a tie: the default
    ("application/msgpack;q=0", "application/json"),
    ("application/msgpack;q=x", "application/json"),
    ("*/*", "application/json"),
    ("application/msgpack, */*", "application/msgpack"),  # named beats a wildcard's tie
    ("application/msgpack;q=0.5, */*", "application/json"),
    ("application/msgpack;q=0.5, application/*;q=0.4", "application/msgpack"),
])
async def test_the_answer_follows_the_accept_preference(http_client, base_url, accept, media):
    response = await fetch(http_client, base_url, "/v1/topics/accept.t/events",
                           headers={"Accept": accept})
    assert response.code == 200 and response.headers["Content-Type"] == media


async def test_errors_follow_accept_msgpack(http_client, base_url):
    response = await fetch(http_client, base_url, "/v1/topics/a..b/events", method="POST",
                           body=b"1", headers={"Accept": "application/msgpack"})
    assert response.code == 400
    assert msgpack.unpackb(response.body)["error"]["code"] == "invalid_topic"


@pytest.mark.settings(max_event_bytes=1000)
async def test_oversize_body_without_content_length_is_413(http_client, base_url):
    chunks = [b'"' + b"x" * 3000, b'"']

    async def producer(write):
        for chunk in chunks:
            await write(chunk)

    response = await fetch(http_client, base_url, "/v1/topics/a/events", method="POST",
                           body_producer=producer,
                           headers={"Content-Type": "application/json"})
    assert response.code == 413


async def test_health(http_client, base_url):
    response = await fetch(http_client, base_url, "/healthz")
    assert (response.code, json.loads(response.body)) == (200, {"status": "ok"})
    assert (await fetch(http_client, base_url, "/readyz")).code == 200
