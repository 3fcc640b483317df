"""Shared fixtures: a real Squall node on an ephemeral port, and real clients.

``app`` builds a node from ``squall_settings`` (override that fixture, or use the
``settings`` marker, to change limits); pytest-tornado serves it on ``http_port``
once a test asks for ``http_server``, and ``tcp_port`` serves its TCP line protocol.
``ws_connect`` opens real WebSocket clients (the ``websockets`` package) and closes
them all after the test; ``open_client`` opens clients of one transport (``ws``,
``sse`` or ``tcp``, see tests/transport_clients.py), and ``transport`` runs a test
once on each.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import msgpack
import pytest
import websockets
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.ioloop import IOLoop
from tornado.web import Application

from config.settings import Settings
from server.app import make_app
from server.httpserver import SquallHTTPServer
from server.node import Node
from server.serve import http_server as http_server_for
from tests.transport_clients import CLIENTS, KINDS, TransportClient
from transports.tcp import LineServer

TIMEOUT = 10.0

if Settings().event_loop == "uvloop":  # the tests run on the loop production runs on
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


@pytest.fixture
def squall_settings(request: pytest.FixtureRequest) -> Settings:
    """Settings for the node under test; ``@pytest.mark.settings(k=v)`` overrides."""
    marker = request.node.get_closest_marker("settings")
    overrides = dict(marker.kwargs) if marker else {}
    overrides.setdefault("ping_interval", 0)
    return Settings(**overrides)


@pytest.fixture
def node(squall_settings: Settings, io_loop: IOLoop) -> Any:
    node = Node(squall_settings)
    io_loop.run_sync(node.start)
    yield node
    io_loop.run_sync(node.stop)  # also disconnects its webhooks from the signals


@pytest.fixture
def app(node: Node) -> Application:
    return make_app(node)


@pytest.fixture
def http_server(request: pytest.FixtureRequest, io_loop: IOLoop, _unused_port: Any) -> Any:
    """The production HTTP server (bounds, timeouts, JSON errors) for the ``app``
    fixture, on pytest-tornado's port; pytest-tornado's own serves plain Tornado."""
    application = request.getfixturevalue("app")
    if "node" in request.fixturenames:
        server = http_server_for(request.getfixturevalue("node"), application)
    else:
        server = SquallHTTPServer(application)
    server.add_sockets([_unused_port[0]])
    yield server
    server.stop()
    io_loop.run_sync(server.close_all_connections, timeout=TIMEOUT)


@pytest.fixture
def chromium(io_loop: IOLoop) -> Iterator[Any]:
    """A headless Chromium for the test (tests/browser_support.py); page errors fail it."""
    from tests.browser_support import Chromium, require_browser

    browser = Chromium(require_browser())
    yield browser
    io_loop.run_sync(browser.close)
    assert not browser.page_errors, f"uncaught errors in the page: {browser.page_errors}"


@pytest.fixture
def origin(http_server: Any, http_port: int) -> str:
    # the address the test server listens on (localhost may resolve to ::1 first)
    return f"http://127.0.0.1:{http_port}"


@pytest.fixture
def ws_url(http_server: Any, http_port: int) -> str:
    return f"ws://127.0.0.1:{http_port}/v1/ws"


@pytest.fixture
def tcp_port(node: Node, io_loop: IOLoop) -> Iterator[int]:
    """The node's TCP line protocol, on an ephemeral port."""
    from tornado.netutil import bind_sockets

    sockets = bind_sockets(0, "127.0.0.1")
    server = LineServer(node)
    server.add_sockets(sockets)
    yield sockets[0].getsockname()[1]
    server.stop()


@pytest.fixture(params=KINDS)
def transport(request: pytest.FixtureRequest) -> str:
    """Run the test once per transport: ``ws``, ``sse`` and ``tcp``."""
    return str(request.param)


OpenClient = Callable[..., Awaitable[TransportClient]]


@pytest.fixture
def open_client(transport: str, request: pytest.FixtureRequest,
                io_loop: IOLoop) -> Iterator[OpenClient]:
    """``await open_client(topics=("a",), since=..., token=...)`` on this test's transport."""
    if transport == "tcp":
        port = request.getfixturevalue("tcp_port")
    else:
        request.getfixturevalue("http_server")
        port = request.getfixturevalue("http_port")
    opened: list[TransportClient] = []

    async def connect(topics: tuple[str, ...] = (), **options: Any) -> TransportClient:
        client = await CLIENTS[transport].connect(port, topics, **options)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


class Client:
    """A real WebSocket client speaking one of Squall's subprotocols."""

    def __init__(self, socket: websockets.ClientConnection, binary: bool) -> None:
        self.socket = socket
        self.binary = binary

    async def send(self, frame: dict[str, Any]) -> None:
        await self.socket.send(msgpack.packb(frame) if self.binary else json.dumps(frame))

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.socket.recv(), timeout)
        frame = msgpack.unpackb(raw) if self.binary else json.loads(raw)
        assert isinstance(frame, dict)
        return frame

    async def recv_type(self, kind: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        frame = await self.recv(timeout)
        assert frame["type"] == kind, frame
        return frame

    async def subscribe(self, topic: str, **fields: Any) -> dict[str, Any]:
        await self.send({"type": "subscribe", "topic": topic, **fields})
        return await self.recv_type("subscribed")

    async def events(self, count: int, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        return [await self.recv_type("event", timeout) for _ in range(count)]

    async def closed_with(self, timeout: float = TIMEOUT) -> int | None:
        """Read until the server closes; the close code it sent."""
        try:
            while True:
                await asyncio.wait_for(self.socket.recv(), timeout)
        except websockets.ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else None


Connect = Callable[..., Awaitable[Client]]


@pytest.fixture
def ws_connect(ws_url: str, io_loop: IOLoop) -> Iterator[Connect]:
    """Open clients with ``await ws_connect(query="topic=a", codec="msgpack")``."""
    opened: list[Client] = []

    async def connect(query: str = "", codec: str = "json", **options: Any) -> Client:
        url = f"{ws_url}?{query}" if query else ws_url
        socket = await websockets.connect(url, subprotocols=[f"squall.v1.{codec}"],
                                          open_timeout=TIMEOUT, **options)
        client = Client(socket, codec == "msgpack")
        opened.append(client)
        return client

    yield connect

    async def close_all() -> None:
        for client in opened:
            await client.socket.close()

    io_loop.run_sync(close_all)


@pytest.fixture
def publish(http_client: AsyncHTTPClient, base_url: str) -> Callable[..., Awaitable[HTTPResponse]]:
    """POST an event over HTTP: ``await publish("topic", {"data": 1})``; never raises."""

    async def post(topic: str, data: Any = None, *, body: bytes | None = None,
                   headers: dict[str, str] | None = None) -> HTTPResponse:
        if body is None:
            body = json.dumps(data).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
        return await http_client.fetch(f"{base_url}/v1/topics/{topic}/events", method="POST",
                                       body=body, headers=headers, raise_error=False)

    return post


def body_of(response: HTTPResponse) -> Any:
    if response.headers.get("Content-Type", "").startswith("application/msgpack"):
        return msgpack.unpackb(response.body)
    return json.loads(response.body)
