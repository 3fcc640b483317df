"""The HTTP server's own bounds (server/httpserver.py), from raw sockets.

Bad HTTP gets the JSON error shape (400, 431) where Tornado alone would send an empty
400 or close silently; a flood of half-sent requests from one address cannot lock
anyone out (the oldest idle connections make room) and leaves busy connections and
WebSocket subscribers alone; running out of file descriptors pauses accepting
instead of spinning and logs one line; a refused connection is told why.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from tornado.ioloop import IOLoop
from tornado.web import Application, RequestHandler

from server.httpserver import MALFORMED_REPLY, Connections, SquallHTTPServer
from tests.server_process import ServerProcess, run_async
from tests.waiting import eventually

pytestmark = pytest.mark.gen_test(timeout=60)

TIMEOUT = 10.0


async def exchange(port: int, data: bytes, timeout: float = TIMEOUT) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def split(response: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body) if body else None


# -- Tornado's own answers, made JSON -----------------------------------------------------

def test_tornado_still_writes_the_malformed_reply_this_server_rewrites():
    """If Tornado changes how it answers a malformed request, the rewrite is lost."""
    import inspect

    from tornado import http1connection

    assert MALFORMED_REPLY.decode("unicode_escape").encode("unicode_escape").decode() in (
        inspect.getsource(http1connection))
    assert "read_until_regex" in inspect.getsource(http1connection.HTTP1Connection)


@pytest.mark.parametrize("request_head", [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header Name: 1\r\n\r\n",
    b"GET /health z HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 2\r\n\r\n",
    b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: \xd9\xa1\r\n\r\n",
    b"POST /v1/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
])
async def test_malformed_requests_get_a_json_400(http_server, http_port, request_head):
    status, headers, body = split(await exchange(http_port, request_head))
    assert status == 400
    assert headers["Content-Type"] == "application/json"
    assert body["error"]["code"] == "invalid_body"


@pytest.mark.parametrize("path", ["/v1/topics/a/events", "/v1/events"])
@pytest.mark.parametrize("zeros", [0, 5000])
async def test_a_content_length_of_thousands_of_digits_is_answered(http_server, http_port,
                                                                    path, zeros):
    """int() refuses a number of over 4300 digits: the length must be judged without it."""
    length = b"0" * zeros + b"9" * 5000
    status, headers, body = split(await exchange(
        http_port, b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %s\r\n\r\n{}"
        % (path.encode(), length)))
    assert status in (400, 413)
    assert headers["Content-Type"] == "application/json"
    assert body["error"]["code"] in ("invalid_body", "payload_too_large")


@pytest.mark.settings(max_header_bytes=2048)
async def test_headers_over_the_limit_get_a_json_431(http_server, http_port):
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n"
    status, _, body = split(await exchange(http_port, head))
    assert status == 431
    assert body["error"]["code"] == "payload_too_large"
    ok = await exchange(http_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close"
                        b"\r\n\r\n")
    assert split(ok)[0] == 200


@pytest.mark.settings(header_timeout=0.3)
async def test_a_request_head_that_never_ends_is_cut_off(http_server, http_port):
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and nothing more
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    assert time.monotonic() - started < 3
    writer.close()


# -- room for everyone --------------------------------------------------------------------

class _Slow(RequestHandler):
    """Answers only when told: a connection that is busy, not waiting for a request."""

    release: asyncio.Event | None = None

    async def get(self) -> None:
        assert _Slow.release is not None
        await _Slow.release.wait()
        self.finish("done")


@pytest.fixture
def bounded(io_loop: IOLoop) -> Iterator[tuple[SquallHTTPServer, int]]:
    """A server with room for 6 connections, 4 per address."""
    server = SquallHTTPServer(Application([(r"/", _Slow)]), connections=Connections(6, 4))
    sock, port = _listen()
    server.add_sockets([sock])
    yield server, port
    server.stop()
    io_loop.run_sync(server.close_all_connections)


def _listen() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock, sock.getsockname()[1]


async def test_idle_connections_make_room_and_busy_ones_keep_theirs(bounded):
    server, port = bounded
    _Slow.release = asyncio.Event()
    busy = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    for _, writer in busy:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    await eventually(lambda: server.connections.total == 4, what="four connections")
    # the address is at its bound: each newcomer closes the oldest idle one
    newcomers = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    for reader, writer in idle:
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        writer.close()
    assert server.connections.evicted == 2
    # only busy ones and newcomers (idle too) are left; newcomers can make room again
    _Slow.release.set()
    for reader, writer in busy:
        assert (await asyncio.wait_for(reader.readuntil(b"done"), TIMEOUT)).startswith(
            b"HTTP/1.1 200")
        writer.close()
    for _, writer in newcomers:
        writer.close()


async def test_a_connection_no_room_can_be_made_for_is_told_why(bounded):
    server, port = bounded
    _Slow.release = asyncio.Event()
    busy = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
    for _, writer in busy:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await eventually(lambda: not server.connections._idle, what="every connection busy")
    status, _, body = split(await exchange(port, b""))
    assert (status, body["error"]["code"]) == (429, "rate_limited")
    assert server.connections.refused == 1
    _Slow.release.set()
    for _, writer in busy:
        writer.close()


# -- out of file descriptors --------------------------------------------------------------

CONNECTOR = """
import socket, sys, time
sockets = [socket.create_connection(("127.0.0.1", int(sys.argv[1]))) for _ in range(40)]
print("connected", flush=True)
sys.stdin.readline()
"""


async def test_running_out_of_descriptors_pauses_accepting_without_a_log_flood(caplog):
    server = SquallHTTPServer(Application([]))
    sock, port = _listen()
    server.add_sockets([sock])
    caplog.set_level(logging.INFO, logger="squall.http")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    client = subprocess.Popen([sys.executable, "-c", CONNECTOR, str(port)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "connected"  # all 40 in the backlog
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 5,
                                                    hard))
        try:
            await eventually(lambda: server.accept_errors >= 3, what="accept errors")
            accepted = server.connections.total
            cpu = time.process_time()
            await asyncio.sleep(1.0)  # paused, not spinning: the loop stays idle
            assert time.process_time() - cpu < 0.5
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        await eventually(lambda: server.connections.total == 40, what="the rest accepted")
        assert accepted < 40
        lines = [r for r in caplog.records if "cannot accept" in r.getMessage()]
        assert len(lines) == 1, lines  # one line per interval, however many errors
    finally:
        client.communicate("\n", timeout=TIMEOUT)
        server.stop()
        await server.close_all_connections()


# -- a flood from one address, against a real server process ----------------------------

def test_a_flood_of_half_sent_requests_locks_nobody_out():
    with ServerProcess("--max-http-connections-per-ip", "300", "--max-http-connections",
                       "400", "--header-timeout", "30") as server:
        run_async(_flood(server))
        tracebacks = [line for line in server.log if "Traceback" in line]
        assert tracebacks == []


async def _flood(server: ServerProcess) -> None:
    import websockets

    subscriber = await websockets.connect(f"ws://127.0.0.1:{server.port}/v1/ws?topic=f",
                                          open_timeout=TIMEOUT)
    assert json.loads(await subscriber.recv())["type"] == "subscribed"
    flood = []
    for _ in range(1000):  # more than either bound
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /v1/topics/f/events HTTP/1.1\r\nHost: x\r\nContent-Le")
        flood.append(writer)
    started = time.monotonic()
    health = await exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                            b"Connection: close\r\n\r\n")
    assert split(health)[0] == 200
    assert time.monotonic() - started < 2
    published = await exchange(server.port, b"POST /v1/topics/f/events HTTP/1.1\r\n"
                               b"Host: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n42")
    assert split(published)[0] == 202
    event = json.loads(await asyncio.wait_for(subscriber.recv(), TIMEOUT))
    assert (event["type"], event["data"]) == ("event", 42)
    metrics = await exchange(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
                             b"Connection: close\r\n\r\n")
    evicted = [line for line in metrics.decode().splitlines()
               if line.startswith("squall_http_connections_evicted_total")]
    assert float(evicted[0].split()[1]) >= 600
    for writer in flood:
        writer.close()
    await subscriber.close()


async def test_an_idempotency_key_header_is_read_as_utf8(http_server, http_port):
    """Tornado reads headers as Latin-1; a key means the same in a header as in a body."""
    key = "é" * 200  # 200 characters, 400 bytes
    body = json.dumps({"events": [{"topic": "k", "data": 1, "idempotency_key": key}]})
    _, _, batch = split(await exchange(http_port, (
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: "
        f"application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode()))
    status, _, single = split(await exchange(http_port, (
        "POST /v1/topics/k/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Idempotency-Key: {key}\r\nContent-Length: 1\r\n\r\n1").encode()))
    assert status == 202 and single["id"] == batch["events"][0]["id"]
    status, _, refused = split(await exchange(
        http_port, b"POST /v1/topics/k/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Idempotency-Key: \xe9\r\nContent-Length: 1\r\n\r\n1"))  # Latin-1, not UTF-8
    assert (status, refused["error"]["code"]) == (400, "invalid_body")
