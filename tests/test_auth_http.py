"""Auth and CORS on the HTTP API, against a real server."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.auth_support import API_KEY, OTHER_SECRET, SECRET, bearer, token, unsigned_token
from tests.conftest import body_of

pytestmark = pytest.mark.gen_test(timeout=20)

AUTH_ON = pytest.mark.settings(api_keys=(API_KEY,), jwt_secret=SECRET,
                               public_topics=("news.>",))


async def fetch(http_client, base_url, path, **kwargs):
    return await http_client.fetch(base_url + path, raise_error=False, **kwargs)


def error_code(response) -> str:
    return body_of(response)["error"]["code"]


async def events_received(client, count: int) -> list:
    """The next ``count`` events; a ping answered after them proves nothing else came."""
    events = await client.events(count)
    await client.send({"type": "ping", "ref": "end"})
    assert await client.recv() == {"type": "pong", "ref": "end"}
    return events


@AUTH_ON
async def test_publish_needs_a_credential(publish):
    response = await publish("news.eu", {"n": 1})
    assert response.code == 401 and error_code(response) == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@AUTH_ON
async def test_api_key_publishes_anywhere(publish, ws_connect):
    watcher = await ws_connect(query=f"token={token(subscribe=['>'])}")
    await watcher.subscribe("orders.>")
    for topic in ("orders.eu", "orders.us.west"):
        response = await publish(topic, topic, headers=bearer(API_KEY))
        assert response.code == 202, response.body
    assert [event["data"] for event in await events_received(watcher, 2)] == [
        "orders.eu", "orders.us.west"]


@AUTH_ON
@pytest.mark.parametrize("header", [
    f"Bearer {API_KEY[:-1]}", f"Bearer {API_KEY}x", f"Basic {API_KEY}", "Bearer", API_KEY,
    f"Bearer {token(key=OTHER_SECRET, publish=['>'])}", f"Bearer {unsigned_token()}",
    f"Bearer {token(publish=['>'], ttl=-1)}",
])
async def test_bad_credentials_are_401_and_publish_nothing(publish, ws_connect, header):
    watcher = await ws_connect(query=f"token={token(subscribe=['>'])}")
    await watcher.subscribe("news.eu")
    response = await publish("news.eu", "forged", headers={"Authorization": header})
    assert response.code == 401 and error_code(response) == "unauthorized"
    assert (await publish("news.eu", "real", headers=bearer(API_KEY))).code == 202
    assert [event["data"] for event in await events_received(watcher, 1)] == ["real"]


@AUTH_ON
async def test_token_publishes_only_where_its_claim_allows(publish):
    credential = bearer(token("alice", publish=["chat.*", "alerts.>"]))
    for topic in ("chat.room1", "alerts.eu", "alerts.eu.fire"):
        assert (await publish(topic, 1, headers=credential)).code == 202, topic
    for topic in ("chat.room1.x", "chat", "alerts", "orders.eu"):
        response = await publish(topic, 1, headers=credential)
        assert response.code == 403 and error_code(response) == "forbidden", topic
        assert topic in body_of(response)["error"]["message"]


@AUTH_ON
async def test_subscribe_rights_do_not_grant_publishing(publish):
    response = await publish("chat.room1", 1, headers=bearer(token(subscribe=[">"])))
    assert response.code == 403


@AUTH_ON
async def test_a_batch_with_one_forbidden_topic_publishes_nothing(
        http_client, base_url, ws_connect):
    watcher = await ws_connect(query=f"token={token(subscribe=['>'])}")
    await watcher.subscribe("chat.>")
    body = json.dumps({"events": [{"topic": "chat.room1", "data": 1},
                                  {"topic": "admin.x", "data": 2}]})
    headers = {"Content-Type": "application/json", **bearer(token(publish=["chat.*"]))}
    response = await fetch(http_client, base_url, "/v1/events", method="POST", body=body,
                           headers=headers)
    assert response.code == 403 and "admin.x" in body_of(response)["error"]["message"]
    allowed = json.dumps({"events": [{"topic": "chat.room2", "data": 3}]})
    response = await fetch(http_client, base_url, "/v1/events", method="POST", body=allowed,
                           headers=headers)
    assert response.code == 202
    assert [event["data"] for event in await events_received(watcher, 1)] == [3]


@AUTH_ON
async def test_batch_needs_a_credential(http_client, base_url):
    body = json.dumps({"events": [{"topic": "news.a", "data": 1}]})
    response = await fetch(http_client, base_url, "/v1/events", method="POST", body=body,
                           headers={"Content-Type": "application/json"})
    assert response.code == 401


@AUTH_ON
async def test_history_is_read_with_subscribe_rights(http_client, base_url, publish):
    for topic in ("news.eu", "orders.eu"):
        assert (await publish(topic, topic, headers=bearer(API_KEY))).code == 202
    anonymous = await fetch(http_client, base_url, "/v1/topics/news.eu/events")
    assert anonymous.code == 200 and body_of(anonymous)["events"][0]["data"] == "news.eu"
    refused = await fetch(http_client, base_url, "/v1/topics/orders.eu/events")
    assert refused.code == 401 and error_code(refused) == "unauthorized"
    reader = bearer(token(subscribe=["orders.*"]))
    allowed = await fetch(http_client, base_url, "/v1/topics/orders.eu/events", headers=reader)
    assert allowed.code == 200 and body_of(allowed)["events"][0]["data"] == "orders.eu"
    wider = await fetch(http_client, base_url, "/v1/topics/orders.>/events", headers=reader)
    assert wider.code == 403 and error_code(wider) == "forbidden"
    bad = await fetch(http_client, base_url, "/v1/topics/news.eu/events",
                      headers=bearer(token(key=OTHER_SECRET)))
    assert bad.code == 401


async def test_with_auth_off_anyone_publishes_and_credentials_are_ignored(publish):
    assert (await publish("any.topic", 1)).code == 202
    assert (await publish("any.topic", 2, headers={"Authorization": "Basic xyz"})).code == 202
    assert (await publish("any.topic", 3, headers=bearer("whatever"))).code == 202


@pytest.mark.settings(api_keys=(API_KEY,))
async def test_keys_only_refuse_tokens(publish):
    response = await publish("a", 1, headers=bearer(token(publish=[">"])))
    assert response.code == 401
    assert (await publish("a", 1, headers=bearer(API_KEY))).code == 202


# -- CORS ------------------------------------------------------------------------------


async def test_cross_origin_gets_no_cors_headers_by_default(publish, base_url):
    refused = await publish("a", 1, headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in refused.headers
    assert refused.headers["Vary"] == "Origin"
    allowed = await publish("a", 1, headers={"Origin": base_url})
    assert allowed.headers["Access-Control-Allow-Origin"] == base_url


@pytest.mark.settings(allowed_origins=("https://app.example.com",), api_keys=(API_KEY,))
async def test_allowed_origins_get_cors_headers_on_success_and_error(publish):
    origin = {"Origin": "https://app.example.com"}
    ok = await publish("a", 1, headers={**origin, **bearer(API_KEY)})
    assert ok.code == 202 and ok.headers["Access-Control-Allow-Origin"] == origin["Origin"]
    refused = await publish("a", 1, headers=origin)
    assert refused.code == 401
    assert refused.headers["Access-Control-Allow-Origin"] == origin["Origin"]
    other = await publish("a", 1, headers={"Origin": "https://other.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


@pytest.mark.settings(allowed_origins=("https://app.example.com",))
@pytest.mark.parametrize(("path", "methods"), [
    ("/v1/topics/a.b/events", "GET, POST, OPTIONS"), ("/v1/events", "POST, OPTIONS"),
    ("/v1/topics", "GET, OPTIONS"),
])
async def test_preflight_answers_methods_and_headers(http_client, base_url, path, methods):
    headers = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type"}
    response = await fetch(http_client, base_url, path, method="OPTIONS", headers=headers)
    assert response.code == 204
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert response.headers["Access-Control-Allow-Methods"] == methods
    allowed = {name.strip() for name in
               response.headers["Access-Control-Allow-Headers"].split(",")}
    assert allowed == {"Authorization", "Content-Type", "Idempotency-Key", "Accept"}
    refused = await fetch(http_client, base_url, path, method="OPTIONS",
                          headers={**headers, "Origin": "https://evil.example"})
    assert refused.code == 204 and "Access-Control-Allow-Origin" not in refused.headers
    assert "Access-Control-Allow-Methods" not in refused.headers


@pytest.mark.settings(allowed_origins=("*",))
async def test_star_allows_every_origin(publish):
    response = await publish("a", 1, headers={"Origin": "https://anyone.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "https://anyone.example"


async def _answers_on_one_connection(port: int, requests: list[bytes]) -> list[int]:
    """The status of each of ``requests``, sent one after another on one connection
    (each answer read whole first); an answer that never comes fails the test."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    statuses = []
    try:
        for request in requests:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            assert b"connection: close" not in head.lower()
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            statuses.append(int(head.split(b" ")[1]))
    finally:
        writer.close()
    return statuses


def _request(method: str, path: str, headers: str = "", body: bytes = b"") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


HEALTHZ = _request("GET", "/healthz")


@AUTH_ON
@pytest.mark.parametrize("refused", [
    _request("GET", "/v1/topics/k.a/events", "Authorization: Bearer bad\r\n"),
    _request("POST", "/v1/topics/k%2Ea/events", "Authorization: Bearer bad\r\n", b"1"),
    _request("POST", "/v1/topics/k.a/events", "Origin: http://127.0.0.1\r\n"
             "Authorization: Bearer bad\r\n", b"1"),
    _request("POST", "/v1/events", "Content-Type: application/x-ndjson\r\n"
             "Authorization: Bearer bad\r\n", b'{"topic": "k.a", "data": 1}\n'),
    _request("POST", "/v1/events", "Origin: http://127.0.0.1\r\n",
             b'{"events": [{"topic": "k.a", "data": 1}]}'),
], ids=["history", "encoded topic", "origin", "ndjson", "anonymous batch"])
async def test_a_refused_credential_keeps_the_connection(http_server, http_port, refused):
    """A 401 once closed the connection without saying so (Tornado ends one whose
    answer comes before its request is read), and a keep-alive client's next request
    met a reset."""
    assert await _answers_on_one_connection(http_port, [refused, refused, HEALTHZ]) == [
        401, 401, 200]


@pytest.mark.settings(publish_rate=0.001, publish_burst=1)
async def test_a_rate_limited_publish_keeps_the_connection(http_server, http_port):
    publish = _request("POST", "/v1/topics/k%2Ea/events", "Content-Type: application/json\r\n",
                       b"1")
    assert await _answers_on_one_connection(http_port, [publish, publish, HEALTHZ]) == [
        202, 429, 200]


@pytest.mark.settings(api_keys=(API_KEY,), jwt_secret=SECRET, publish_rate=0.001,
                      publish_burst=1)
async def test_a_publish_without_a_credential_is_401_however_often_it_comes(publish):
    """Once the address's publish rate counted it: the second was 429, telling a client
    that forgot its key to slow down."""
    for _ in range(3):
        response = await publish("news.eu", 1)
        assert response.code == 401 and error_code(response) == "unauthorized"
    assert (await publish("news.eu", 1, headers=bearer(API_KEY))).code == 202


@AUTH_ON
@pytest.mark.parametrize("length", ["Content-Length: 10000000\r\n",
                                    "Transfer-Encoding: chunked\r\n"])
async def test_a_refused_request_with_a_long_body_is_answered_before_it(http_server, http_port,
                                                                        length):
    """Reading a refused body to keep the connection is for short ones: a long one (up
    to the 64 MiB of a stream) is not read at all."""
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    writer.write(f"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer bad"
                 f"\r\nContent-Type: application/x-ndjson\r\n{length}\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # no body sent
    writer.close()
    assert head.startswith(b"HTTP/1.1 401 ")
