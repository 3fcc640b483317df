"""Property-based tests: random bytes and random JSON at every input surface of a
real server process. Never a 500, never a traceback, never a healthy client dropped."""

from __future__ import annotations

import contextlib
import http.client
import json
from collections.abc import Iterator

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import ClientConnection, connect

from tests.server_process import ServerProcess

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12)
topics = st.text(max_size=40) | st.sampled_from(["a", "a.b", "a.*", "a.>", "a..b", ""])
frames = st.fixed_dictionaries(
    {"type": st.sampled_from(["subscribe", "unsubscribe", "publish", "ping", "other"])},
    optional={"topic": topics | json_values, "since": st.text(max_size=20) | json_values,
              "data": json_values, "ref": json_values, "idempotency_key": json_values})


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess("--max-bad-frames", "1000000", "--frame-rate", "0") as process:
        yield process


@pytest.fixture(scope="module")
def bystander(server: ServerProcess) -> Iterator[ClientConnection]:
    """A healthy subscriber that must survive every fuzz case."""
    with connect(f"ws://127.0.0.1:{server.port}/v1/ws?topic=calm",
                 subprotocols=["squall.v1.json"], ping_interval=None) as socket:
        assert json.loads(socket.recv(timeout=5))["type"] == "subscribed"
        yield socket


def post(server: ServerProcess, path: str, body: bytes, content_type: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": content_type})
        response = connection.getresponse()
        payload = response.read()
        assert b"Traceback" not in payload
        if response.status >= 400:
            assert "error" in json.loads(payload)
        return response.status
    finally:
        connection.close()


def still_healthy(bystander: ClientConnection) -> None:
    bystander.send(json.dumps({"type": "ping", "ref": "alive"}))
    while True:
        frame = json.loads(bystander.recv(timeout=5))
        if frame["type"] == "pong":
            assert frame["ref"] == "alive"
            return


@FUZZ
@given(body=st.binary(max_size=300),
       content_type=st.sampled_from(["application/json", "application/msgpack", "text/plain"]),
       path=st.sampled_from(["/v1/topics/calm/events", "/v1/events", "/v1/topics/a..b/events"]))
def test_http_random_bytes(server, bystander, body, content_type, path):
    assert post(server, path, body, content_type) in (202, 400, 413, 415)


@FUZZ
@given(value=json_values, path=st.sampled_from(["/v1/topics/calm/events", "/v1/events"]))
def test_http_random_json(server, bystander, value, path):
    assert post(server, path, json.dumps(value).encode(), "application/json") in (202, 400, 413)
    still_healthy(bystander)


@FUZZ
@given(events=st.lists(st.fixed_dictionaries({}, optional={
    "topic": topics | json_values, "data": json_values, "idempotency_key": json_values}),
    max_size=5))
def test_http_random_batches(server, bystander, events):
    body = msgpack.packb({"events": events})
    assert post(server, "/v1/events", body, "application/msgpack") in (202, 400, 413)


@pytest.fixture(scope="module")
def fuzzed(server: ServerProcess) -> Iterator[dict[str, ClientConnection]]:
    with contextlib.ExitStack() as stack:
        yield {codec: stack.enter_context(connect(
            f"ws://127.0.0.1:{server.port}/v1/ws", subprotocols=[f"squall.v1.{codec}"],
            ping_interval=None)) for codec in ("json", "msgpack")}


def answer(socket: ClientConnection) -> dict[str, object]:
    """The reply to the frame just sent: events of the calm topic are skipped."""
    while True:
        raw = socket.recv(timeout=5)
        frame = json.loads(raw) if isinstance(raw, str) else msgpack.unpackb(raw)
        if frame.get("type") != "event":
            return frame  # type: ignore[no-any-return]


@FUZZ
@given(raw=st.binary(max_size=200) | st.text(max_size=200), codec=st.sampled_from(["json",
                                                                                  "msgpack"]))
def test_websocket_random_frames(fuzzed, bystander, raw, codec):
    socket = fuzzed[codec]
    socket.send(raw)
    socket.send(msgpack.packb({"type": "ping", "ref": "x"}) if codec == "msgpack"
                else '{"type": "ping", "ref": "x"}')
    reply = answer(socket)
    if reply["type"] != "pong":
        assert reply["type"] in ("error", "subscribed", "unsubscribed", "published")
        while reply.get("ref") != "x":
            reply = answer(socket)


@FUZZ
@given(frame=frames, codec=st.sampled_from(["json", "msgpack"]))
def test_websocket_random_commands(fuzzed, bystander, frame, codec):
    socket = fuzzed[codec]
    socket.send(msgpack.packb(frame) if codec == "msgpack" else json.dumps(frame))
    reply = answer(socket)
    assert reply["type"] in ("error", "subscribed", "unsubscribed", "published", "pong")
    if reply["type"] == "error":
        assert reply["code"] in ("invalid_body", "invalid_topic", "not_found",
                                 "payload_too_large", "too_many_subscriptions")
    still_healthy(bystander)
