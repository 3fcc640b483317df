"""The WebSocket transport's own edges, on raw sockets: framing errors close with the
right code, refused clients and bad handshakes get JSON and no tracebacks, client ids
are unique per node, a paced replay never stops pongs from being read."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
import tracemalloc

import pytest
from tornado.httpclient import AsyncHTTPClient

from server.node import Node
from tests.auth_support import API_KEY, SECRET
from tests.rawws import RawSocket, close_code
from tests.waiting import eventually
from transports.websocket import _unmask, unmask

pytestmark = pytest.mark.gen_test(timeout=30)

PING, PONG, CLOSE = 0x9, 0xA, 0x8


async def close_of(client: RawSocket) -> tuple[int | None, bytes]:
    """Read until the server's close frame: its code and reason."""
    while True:
        opcode, payload = await client.read_frame()
        if opcode == CLOSE:
            return close_code(payload), payload[2:]


@pytest.fixture
def raw(http_server, http_port):
    opened: list[RawSocket] = []

    async def connect(path: str = "/v1/ws", **options) -> RawSocket:
        client = await RawSocket.connect(http_port, path, **options)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


@pytest.mark.parametrize(("frame", "code"), [
    (bytes([0x81, 0x02]) + b"hi", 1002),  # unmasked
    (bytes([0xC1, 0x80]) + os.urandom(4), 1002),  # RSV1 without an extension
    (bytes([0x83, 0x80]) + os.urandom(4), 1002),  # reserved data opcode
    (bytes([0x8B, 0x80]) + os.urandom(4), 1002),  # reserved control opcode
    (bytes([0x09, 0x80]) + os.urandom(4), 1002),  # fragmented ping
    (bytes([0x89, 0xFE, 0x00, 0x7E]) + b"\0" * 4 + b"p" * 126, 1002),  # ping over 125 bytes
    (bytes([0x80, 0x80]) + b"\0" * 4, 1002),  # continuation without a message
    (bytes([0x81, 0x82]) + b"\0" * 4 + b"\xc3\x28", 1007),  # invalid UTF-8
    (bytes([0x88, 0x82]) + b"\0" * 4 + struct.pack("!H", 1005), 1002),  # invalid close code
    (bytes([0x88, 0x82]) + b"\0" * 4 + struct.pack("!H", 999), 1002),
    (bytes([0x88, 0x81]) + b"\0" * 4 + b"\x03", 1002),  # close payload of one byte
])
async def test_protocol_errors_close_with_their_code(raw, frame, code):
    client = await raw()
    client.writer.write(frame)
    assert (await close_of(client))[0] == code


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 125, 126, 4099])
def test_unmasking_in_c_and_in_python_agree(size):
    payload, mask = os.urandom(size), os.urandom(4)
    expected = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
    assert unmask(payload, mask) == _unmask(payload, mask) == expected


async def test_a_text_message_beyond_ascii_is_read_as_utf8(raw):
    subscriber = await raw("/v1/ws?topic=utf8")
    assert (await subscriber.read_message())["type"] == "subscribed"
    publisher = await raw()
    data = {"text": "h\u00e9llo \u2603 \U0001f600"}
    publisher.send_frame(json.dumps({"type": "publish", "topic": "utf8", "data": data,
                                     "ref": 1}, ensure_ascii=False).encode())
    assert (await publisher.read_message())["type"] == "published"
    event = await subscriber.read_message()
    assert event["data"] == data
    publisher.send_frame(b'{"type": "ping", "ref": "\xc3\x28"}')  # not UTF-8: 1007
    assert (await close_of(publisher))[0] == 1007


@pytest.mark.parametrize("code", [1000, 1001, 3000, 4000, 4999])
async def test_a_client_close_is_answered_with_its_code_then_the_server_closes(raw, node, code):
    client = await raw("/v1/ws?topic=t")
    assert (await client.read_message())["type"] == "subscribed"
    client.send_frame(struct.pack("!H", code) + b"bye", opcode=CLOSE)
    assert await close_of(client) == (code, b"bye")
    with pytest.raises(EOFError):
        await client.read_frame()
    await eventually(lambda: not node.hub.connections)


async def test_pings_are_answered_with_their_payload_between_fragments(raw):
    client = await raw()
    mask = b"\0\0\0\0"  # fragments by hand: send_frame always sets FIN
    client.writer.write(bytes([0x01, 0x80 | 12]) + mask + b'{"type": "pi')
    client.writer.write(bytes([0x89, 0x80 | 4]) + mask + b"beat")
    client.writer.write(bytes([0x80, 0x80 | 6]) + mask + b'ng"}\n ')
    opcode, payload = await client.read_frame()
    assert (opcode, payload) == (PONG, b"beat")
    assert await client.read_message() == {"type": "pong"}


async def test_a_message_in_many_fragments_empty_ones_too_arrives_whole(raw, node):
    """Fragments go into one buffer: empty ones cost nothing (they once cost an entry
    each, without limit), and a character split between two fragments stays whole."""
    client = await raw()
    mask = b"\0\0\0\0"
    text = '{"type": "ping", "ref": "é✓"}'.encode()
    split = text.index("✓".encode()) + 1  # inside the three bytes of ✓
    client.writer.write(bytes([0x01, 0x80 | split]) + mask + text[:split]
                        + (bytes([0x00, 0x80]) + mask) * 20_000
                        + bytes([0x80, 0x80 | (len(text) - split)]) + mask + text[split:])
    assert await client.read_message() == {"type": "pong", "ref": "é✓"}


async def test_empty_fragments_of_an_unfinished_message_hold_no_memory(raw):
    """The size limit counts bytes, so empty fragments must cost none: they once took
    an entry each, without limit (42 MB for 5M of them)."""
    client = await raw()
    mask = b"\0\0\0\0"
    client.writer.write(bytes([0x01, 0x80 | 1]) + mask + b"{")
    await client.writer.drain()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        client.writer.write((bytes([0x00, 0x80]) + mask) * 200_000
                            + bytes([0x89, 0x80 | 4]) + mask + b"done")
        opcode, payload = await client.read_frame()  # the pong: every fragment was read
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert (opcode, payload) == (PONG, b"done")
    assert grown < 400_000  # a list of 200,000 entries alone is 1.6 MB


@pytest.mark.settings(max_frame_bytes=1024)
async def test_a_message_over_the_limit_in_fragments_closes_with_1009(raw):
    client = await raw()
    mask = b"\0\0\0\0"
    for opcode in (0x01, 0x00, 0x00):
        client.writer.write(bytes([opcode, 0x80 | 126]) + struct.pack("!H", 500) + mask
                            + b"x" * 500)
    assert (await close_of(client))[0] == 1009


async def test_deeply_nested_msgpack_gets_an_error_frame(ws_connect):
    client = await ws_connect(codec="msgpack")
    # by hand: msgpack refuses to pack this deep a value
    frame = (b"\x84\xa4type\xa7publish\xa5topic\xa4deep\xa3ref\x01\xa4data"
             + b"\x91" * 1000 + b"\xc0")
    await client.socket.send(frame)
    reply = await client.recv()
    assert reply["type"] == "error" and reply["code"] == "invalid_body", reply
    await client.send({"type": "ping", "ref": 2})
    assert await client.recv() == {"type": "pong", "ref": 2}


# -- handshakes and refusals: JSON errors, no tracebacks ----------------------------------


@pytest.mark.parametrize(("method", "headers", "status", "code"), [
    ("POST", {}, 405, "method_not_allowed"),
    ("PATCH", {}, 405, "method_not_allowed"),
    ("GET", {}, 400, "invalid_body"),
    ("GET", {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "8",
             "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}, 426, "upgrade_required"),
    ("GET", {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
             "Sec-WebSocket-Key": "short"}, 400, "invalid_body"),
])
async def test_bad_handshakes_get_json_errors_and_log_no_traceback(
        http_client: AsyncHTTPClient, base_url, caplog, method, headers, status, code):
    caplog.set_level(logging.DEBUG)
    response = await http_client.fetch(f"{base_url}/v1/ws", method=method, headers=headers,
                                       body=b"{}" if method in ("POST", "PATCH") else None,
                                       raise_error=False)
    assert response.code == status
    assert json.loads(response.body)["error"]["code"] == code
    if status == 426:
        assert response.headers["Sec-WebSocket-Version"] == "13"
    if status == 405:
        assert response.headers["Allow"] == "GET, OPTIONS"
    assert not [r for r in caplog.records if r.exc_info or r.levelno > logging.WARNING]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) <= 1


@pytest.mark.settings(api_keys=(API_KEY,), jwt_secret=SECRET)
async def test_a_refused_client_that_keeps_sending_logs_nothing(raw, caplog, node):
    caplog.set_level(logging.DEBUG)
    client = await raw("/v1/ws?token=not-a-token")
    client.send_json({"type": "subscribe", "topic": "x"})
    assert (await close_of(client))[0] == 4001
    client.send_json({"type": "ping"})
    client.send_frame(struct.pack("!H", 4001), opcode=CLOSE)
    with pytest.raises(EOFError):
        await client.read_frame()
    assert node.limits.connections.total == 0
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]


def test_client_ids_are_made_per_node():
    """Each worker (and node) makes its own Node after the fork: ids never repeat."""
    from config.settings import Settings

    first, second = Node(Settings()), Node(Settings())
    ids = [node.new_client_id() for node in (first, second) for _ in range(3)]
    assert len(set(ids)) == 6
    assert ids[0][:14] != ids[3][:14]  # "c-" and 48 random bits each


# -- a paced replay keeps reading -----------------------------------------------------------


@pytest.mark.settings(history_size=10_000, send_queue_bytes=64 * 1024, ping_interval=1,
                      ping_timeout=1)
async def test_a_paced_replay_keeps_reading_pongs_and_frames(raw, http_client, base_url, node):
    count, first = 6000, None  # 6 MB: more than the kernel buffers of both sides
    for start in range(0, count, 500):
        events = [{"topic": "long", "data": {"n": n, "pad": "x" * 1000}}
                  for n in range(start, start + 500)]
        response = await http_client.fetch(f"{base_url}/v1/events", method="POST",
                                           body=json.dumps({"events": events}))
        first = first or json.loads(response.body)["events"][0]["id"]
    client = await raw(rcvbuf=4096)
    client.send_json({"type": "subscribe", "topic": "long", "since": first})
    for _ in range(15):  # 3 s of pings unread, each answered blind; the replay waits
        client.send_frame(b"", opcode=PONG)
        await asyncio.sleep(0.2)
    (connection,) = node.hub.connections
    assert connection.hold is not None  # the replay is still under way, paced
    client.send_json({"type": "ping", "ref": "after"})
    numbers, replies = [], []
    while len(replies) < 2:
        opcode, payload = await client.read_frame()
        if opcode == PING:
            client.send_frame(payload, opcode=PONG)
        elif opcode == CLOSE:
            pytest.fail(f"closed with {close_code(payload)} after {len(numbers)} events")
        elif (frame := json.loads(payload))["type"] == "event":
            numbers.append(frame["data"]["n"])
        else:
            replies.append(frame)
    assert numbers == list(range(1, count))
    assert [reply["type"] for reply in replies] == ["subscribed", "pong"]
    assert replies[1]["ref"] == "after"


def test_no_private_tornado_name_is_used():
    """The transports stand on Tornado's public API only (docs/transports.md): no import of
    a private name, no private attribute of Tornado's objects, no pin on its version."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    private = []
    for path in [path for package in ("transports", "server", "handlers")
                 for path in root.glob(f"{package}/*.py")]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tornado"):
                private += [f"{path.name}: {alias.name}" for alias in node.names
                            if alias.name.startswith("_")]
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                    and node.attr in _TORNADO_PRIVATE:
                private.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert private == []
    assert "tornado>=6.4\"" in (root / "pyproject.toml").read_text()


_TORNADO_PRIVATE = {"_abort", "_receive_frame_loop", "_break_cycles", "_WebSocketParams",
                    "_read_buffer", "_write_buffer", "_close_callback", "_finished",
                    "_execute", "_handle_write"}
