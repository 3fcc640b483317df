"""The TCP line protocol's own edges: raw sockets against the in-process node, and
``nc`` against a real ``run.py --tcp-port`` process."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time

import pytest

from tests.auth_support import API_KEY, SECRET, token
from tests.server_process import ServerProcess, free_port
from tests.transport_clients import TcpClient

live = pytest.mark.gen_test(timeout=30)

AUTH_ON = pytest.mark.settings(api_keys=(API_KEY,), jwt_secret=SECRET, public_topics=("news.>",))


@pytest.fixture
def line_client(tcp_port):
    opened: list[TcpClient] = []

    async def connect() -> TcpClient:
        client = await TcpClient.connect(tcp_port)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


@AUTH_ON
@live
async def test_auth_frames_take_an_api_key_or_a_jwt(line_client):
    client = await line_client()
    await client.send({"type": "subscribe", "topic": "orders", "ref": 1})
    assert (await client.recv_type("error"))["code"] == "forbidden"  # anonymous at first
    await client.send({"type": "auth", "token": token("alice", subscribe=["orders"]), "ref": 2})
    assert await client.recv() == {"type": "authed", "sub": "alice", "ref": 2}
    await client.send({"type": "subscribe", "topic": "orders", "ref": 3})
    assert (await client.recv_type("subscribed"))["ref"] == 3
    await client.send({"type": "auth", "token": API_KEY, "ref": 4})
    assert await client.recv() == {"type": "authed", "sub": None, "ref": 4}
    await client.send({"type": "publish", "topic": "orders", "data": 1, "ref": 5})
    assert (await client.recv_type("published"))["ref"] == 5
    assert (await client.recv_type("event"))["data"] == 1
    for bad in ({"type": "auth"}, {"type": "auth", "token": ""}):
        await client.send(bad)
        assert (await client.recv_type("error"))["code"] == "invalid_body"
    await client.send({"type": "auth", "token": token("eve", ttl=-10), "ref": 6})
    refused = await client.recv_type("error")
    assert (refused["code"], refused["ref"]) == ("unauthorized", 6)


@live
async def test_lines_may_end_in_crlf_come_in_pieces_and_be_blank(line_client):
    client = await line_client()
    client.writer.write(b'{"type": "ping", "ref": 1}\r\n\n   \n{"type": "pi')
    assert await client.recv() == {"type": "pong", "ref": 1}
    await asyncio.sleep(0.05)
    client.writer.write(b'ng", "ref": 2}\n{"type": "ping", "ref": 3}\n')
    assert await client.recv() == {"type": "pong", "ref": 2}
    assert await client.recv() == {"type": "pong", "ref": 3}


@live
async def test_an_auth_frame_is_unknown_on_websocket(ws_connect):
    client = await ws_connect()
    await client.send({"type": "auth", "token": API_KEY})
    error = await client.recv_type("error")
    assert error["code"] == "invalid_body" and "auth" not in error["message"].split("expected")[1]


@pytest.mark.settings(max_frame_bytes=1024)
@pytest.mark.parametrize("line", [b"x" * 2000 + b"\n", b"y" * 2000])
@live
async def test_a_line_over_max_frame_bytes_closes_with_1009(line_client, line):
    client = await line_client()
    await client.send({"type": "ping"})
    assert await client.recv() == {"type": "pong"}
    client.writer.write(line)
    closed = await client.recv()
    assert (closed["type"], closed["code"]) == ("close", 1009)
    assert await client.ends()


@pytest.mark.settings(max_frame_bytes=1024)
@live
async def test_a_line_of_exactly_max_frame_bytes_passes_with_its_crlf(line_client):
    client = await line_client()
    ping = b'{"type": "ping", "ref": 7, "pad": "'
    line = ping + b"p" * (1024 - len(ping) - 2) + b'"}'
    assert len(line) == 1024
    client.writer.write(line + b"\r\n")
    assert await client.recv() == {"type": "pong", "ref": 7}
    client.writer.write(line + b"\r")  # the \r read before its \n
    await client.writer.drain()
    await asyncio.sleep(0.05)
    client.writer.write(b"\n")
    assert await client.recv() == {"type": "pong", "ref": 7}
    client.writer.write(line + b"pp\r\n")
    closed = await client.recv()
    assert (closed["type"], closed["code"]) == ("close", 1009)


def test_nc_session_against_a_real_server():
    nc = shutil.which("nc")
    if nc is None:
        pytest.skip("no nc on PATH (apt-get install netcat-openbsd)")
    port = free_port()
    with ServerProcess("--tcp-port", str(port)) as server:
        assert server.tcp_port == port
        session = subprocess.Popen([nc, "127.0.0.1", str(port)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
        try:
            assert session.stdin is not None and session.stdout is not None
            session.stdin.write('{"type": "subscribe", "topic": "orders.*", "ref": 1}\n')
            session.stdin.flush()
            subscribed = json.loads(session.stdout.readline())
            assert (subscribed["type"], subscribed["topic"], subscribed["ref"]) == (
                "subscribed", "orders.*", 1)
            published = _post(server.port, "/v1/topics/orders.eu/events", {"order": 42})
            event = json.loads(session.stdout.readline())
            assert (event["type"], event["id"], event["data"]) == ("event", published["id"],
                                                                   {"order": 42})
            session.stdin.write('{"type": "ping", "ref": 2}\nnot json\n')
            session.stdin.flush()
            assert json.loads(session.stdout.readline()) == {"type": "pong", "ref": 2}
            assert json.loads(session.stdout.readline())["code"] == "invalid_body"
        finally:
            session.kill()
            session.wait(5)
            for pipe in (session.stdin, session.stdout):
                if pipe is not None:
                    pipe.close()


def test_shutdown_sends_the_close_line_and_ends_the_connection():
    port = free_port()
    server = ServerProcess("--tcp-port", str(port)).start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b'{"type": "subscribe", "topic": "t"}\n')
            reader = sock.makefile("rb")
            assert json.loads(reader.readline())["type"] == "subscribed"
            started = time.monotonic()
            assert server.process is not None
            server.process.terminate()
            assert json.loads(reader.readline()) == {"type": "close", "code": 1001,
                                                     "reason": "server shutting down"}
            assert reader.readline() == b""  # then the server ends it
            assert time.monotonic() - started < 5
            reader.close()
        assert server.process.wait(10) == 0
    finally:
        server.stop()


def _post(port: int, path: str, body: object) -> dict:
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)  # type: ignore[no-any-return]
