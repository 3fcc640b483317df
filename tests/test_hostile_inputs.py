"""Inputs that once answered 500, dropped a socket or poisoned a topic, each now a
clear 4xx (or an error frame) with the JSON error shape, harming nobody else."""

from __future__ import annotations

import json
import time

import jwt
import msgpack
import pytest
import websockets

from tests.auth_support import API_KEY, SECRET
from tests.conftest import body_of


def deep(levels: int) -> object:
    value: object = 1
    for _ in range(levels):
        value = [value]
    return value


async def fetch(http_client, base_url, path, **kwargs):
    return await http_client.fetch(base_url + path, raise_error=False, **kwargs)


def is_json_error(response, status: int, code: str | None = None) -> bool:
    error = body_of(response)["error"] if response.body else None
    return (response.code == status and error is not None
            and (code is None or error["code"] == code))


# -- deep nesting and numbers no codec carries ------------------------------------------

@pytest.mark.gen_test
@pytest.mark.parametrize("codec", ["json", "msgpack"])
async def test_deeply_nested_data_is_refused_at_the_edge(http_client, base_url, codec, ws_connect):
    subscriber = await ws_connect(query="topic=deep.ok")
    await subscriber.recv_type("subscribed")
    media = f"application/{codec}"
    dump = (lambda value: json.dumps(value).encode()) if codec == "json" else msgpack.packb
    response = await fetch(http_client, base_url, "/v1/topics/deep.t/events", method="POST",
                           body=dump(deep(300)), headers={"Content-Type": media})
    assert is_json_error(response, 400, "invalid_body")
    batch = {"events": [{"topic": "deep.ok", "data": "valid"},
                        {"topic": "deep.t", "data": deep(300)}]}
    response = await fetch(http_client, base_url, "/v1/events", method="POST",
                           body=dump(batch), headers={"Content-Type": media})
    assert is_json_error(response, 400, "invalid_body")
    history = await fetch(http_client, base_url, "/v1/topics/deep.>/events")
    assert json.loads(history.body)["events"] == []  # nothing of the batch was published
    ok = await fetch(http_client, base_url, "/v1/topics/deep.ok/events", method="POST",
                     body=dump(deep(60)), headers={"Content-Type": media})
    assert ok.code == 202  # deep enough for any event, and it arrives
    assert (await subscriber.recv_type("event"))["data"] == deep(60)


@pytest.mark.gen_test
async def test_a_deep_msgpack_publish_frame_gets_an_error_frame(ws_connect):
    client = await ws_connect(codec="msgpack")
    await client.send({"type": "publish", "topic": "deep.ws", "data": deep(300), "ref": 1})
    assert (await client.recv_type("error"))["code"] == "invalid_body"
    await client.send({"type": "ping", "ref": 2})
    assert await client.recv() == {"type": "pong", "ref": 2}


@pytest.mark.gen_test
@pytest.mark.parametrize("body", [b"1e999", b"[1e400]", b'{"a": -1e999}'])
async def test_numbers_beyond_float_range_are_refused(publish, body):
    response = await publish("inf.t", body=body)
    assert is_json_error(response, 400, "invalid_body")
    assert "finite" in json.loads(response.body)["error"]["message"]


@pytest.mark.gen_test
async def test_non_finite_msgpack_floats_are_refused(publish):
    for number in (float("inf"), float("-inf"), float("nan")):
        response = await publish("inf.t", body=msgpack.packb({"x": number}),
                                 headers={"Content-Type": "application/msgpack"})
        assert is_json_error(response, 400, "invalid_body")


# -- query strings, paths and headers ---------------------------------------------------

@pytest.mark.gen_test
@pytest.mark.parametrize("limit", ["%C2%B2", "%E2%91%A0", "%D9%A3", "-1", "1.5", "0", "0" * 5000,
                                   "9" * 5000])  # (int() refuses over 4300 digits)
async def test_a_limit_that_is_not_ascii_digits_is_a_400(http_client, base_url, limit):
    response = await fetch(http_client, base_url, f"/v1/topics/t/events?limit={limit}")
    assert is_json_error(response, 400, "invalid_body")


@pytest.mark.gen_test
@pytest.mark.parametrize(("path", "status"), [
    ("/static/%00", 404), ("/static/squall.js%00.png", 404), ("/%00", 404),
    ("/static/nope.js", 404), ("/static/%FF", 400)])  # not UTF-8: no name at all
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_static_paths_that_name_no_file_are_a_json_error(http_client, base_url, path,
                                                               status, method):
    response = await fetch(http_client, base_url, path, method=method)
    assert response.code == status
    assert response.headers["Content-Type"] == "application/json"
    if method == "GET":
        assert body_of(response)["error"]["code"] == ("not_found" if status == 404
                                                      else "invalid_body")


@pytest.mark.gen_test
async def test_a_range_outside_a_static_file_is_a_json_416(http_client, base_url):
    response = await fetch(http_client, base_url, "/static/squall.js",
                           headers={"Range": "bytes=999999999-"})
    assert is_json_error(response, 416)


@pytest.mark.gen_test
async def test_methods_a_static_file_lacks_are_a_json_405(http_client, base_url):
    response = await fetch(http_client, base_url, "/static/squall.js", method="POST", body="")
    assert is_json_error(response, 405, "method_not_allowed")


# -- tokens with claims of the wrong type -------------------------------------------------

def odd_token(**claims: object) -> str:
    return jwt.encode({"sub": "mallory", "exp": int(time.time()) + 60, **claims}, SECRET,
                      algorithm="HS256")


class TestTokensWithOddClaims:
    @pytest.fixture
    def squall_settings(self):
        from config.settings import Settings

        return Settings(ping_interval=0, api_keys=(API_KEY,), jwt_secret=SECRET)

    @pytest.mark.gen_test
    @pytest.mark.parametrize("claims", [{"exp": str(int(time.time()) + 60)}, {"exp": [1]},
                                        {"sub": 42}, {"squall": "all"}, {"exp": 2**80}])
    async def test_a_signed_token_with_odd_claims_is_a_401_never_a_500(
            self, http_client, base_url, ws_url, claims):
        credential = odd_token(**claims)
        response = await fetch(http_client, base_url, "/v1/topics/t/events", method="POST",
                               body="1", headers={"Authorization": f"Bearer {credential}"})
        if claims == {"exp": 2**80}:  # far in the future: simply valid, with no grant
            assert is_json_error(response, 403, "forbidden")
            return
        assert is_json_error(response, 401, "unauthorized")
        async with websockets.connect(f"{ws_url}?token={credential}") as socket:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await socket.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001


@pytest.mark.gen_test
async def test_short_json_frames_are_checked_at_the_limits(ws_connect):
    """A short frame's digits and brackets decide whether its checks can be skipped:
    at the depth limit and past it, and with a 20-digit integer, they are not."""
    client = await ws_connect()
    frame = {"type": "publish", "topic": "limits.t", "ref": 1}
    await client.send({**frame, "data": deep(63)})  # 64 levels with the frame's own
    assert (await client.recv())["type"] == "published"
    for data in (deep(64), 2 ** 64, -(2 ** 63) - 1):
        await client.send({**frame, "data": data})
        assert (await client.recv_type("error"))["code"] == "invalid_body", data
    await client.send({**frame, "data": 2 ** 64 - 1})  # the largest integer carried
    assert (await client.recv())["type"] == "published"


# integers at the edges of 64 bits: 19 digits (nanosecond clocks, snowflake ids) and
# the extremes are carried exactly; one past either end is refused
CARRIED = [9_999_999_999_999_999_999, 2 ** 64 - 1, -(2 ** 63), -999_999_999_999_999_999,
           1_796_171_475_864_480_713]
REFUSED = [2 ** 64, -(2 ** 63) - 1, -9_999_999_999_999_999_999, 10 ** 30]


@pytest.mark.gen_test
@pytest.mark.parametrize("pad", [0, 2000])  # short texts skip checks a long one needs
async def test_integers_at_the_edges_of_64_bits(http_client, base_url, pad):
    topic = f"edges.t{pad}"
    batch = {"events": [{"topic": topic, "data": {"n": n, "pad": "x" * pad}}
                        for n in CARRIED]}
    response = await fetch(http_client, base_url, "/v1/events", method="POST",
                           body=json.dumps(batch).encode(),
                           headers={"Content-Type": "application/json"})
    assert response.code == 202, response.body
    nineteen = [n for n in CARRIED if 0 < n < 10 ** 19]  # alone: the fast parser's text
    response = await fetch(http_client, base_url, f"/v1/topics/{topic}/events", method="POST",
                           body=json.dumps({"n": nineteen, "pad": "x" * pad}).encode(),
                           headers={"Content-Type": "application/json"})
    assert response.code == 202, response.body
    history = await fetch(http_client, base_url, f"/v1/topics/{topic}/events")
    assert [event["data"]["n"] for event in json.loads(history.body)["events"]] == [
        *CARRIED, nineteen]
    for n in REFUSED:
        response = await fetch(http_client, base_url, f"/v1/topics/{topic}/events",
                               method="POST", body=json.dumps({"n": n, "pad": "x" * pad}).encode(),
                               headers={"Content-Type": "application/json"})
        assert is_json_error(response, 400, "invalid_body"), n


@pytest.mark.gen_test
@pytest.mark.parametrize("digits", [25, 5000, 65_000])
async def test_an_integer_of_many_digits_is_refused_in_the_contracts_words(publish, digits):
    response = await publish("digits.t", body=b"[" + b"7" * digits + b"]")
    assert is_json_error(response, 400, "invalid_body")
    message = json.loads(response.body)["error"]["message"]
    assert "64 bits" in message and "sys." not in message, message


@pytest.mark.gen_test
@pytest.mark.parametrize("pad", [0, 5000])  # a long text is checked without counting first
async def test_depth_is_checked_exactly_in_short_and_long_texts(publish, pad):
    ok = await publish("depth.t", {"pad": "1" * 30 + "x" * pad, "d": deep(63)})  # 64 levels
    assert ok.code == 202, ok.body
    too_deep = await publish("depth.t", {"pad": "1" * 30 + "x" * pad, "d": deep(64)})
    assert is_json_error(too_deep, 400, "invalid_body")
