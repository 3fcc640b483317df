"""Signals and webhooks end to end: a real node, real clients, real HTTP receivers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port
from tornado.web import Application, RequestHandler

from server import signals
from server.webhooks import verify_signature
from tests.server_process import ServerProcess

SECRET = "webhook-secret"


class Receiver:
    """A backend that records signed webhook deliveries (or hangs, when told to)."""

    def __init__(self, hang: bool = False) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.arrived = asyncio.Condition()
        self.hang = hang
        self.release = asyncio.Event()

    def app(self) -> Application:
        receiver = self

        class Deliveries(RequestHandler):
            async def post(self) -> None:
                if receiver.hang:
                    await receiver.release.wait()
                assert verify_signature(SECRET, self.request.body,
                                        self.request.headers["X-Squall-Signature"])
                async with receiver.arrived:
                    receiver.bodies.append(json.loads(self.request.body))
                    receiver.arrived.notify_all()

        return Application([(r"/hook", Deliveries)])

    async def wait_for(self, count: int, timeout: float = 10) -> list[dict[str, Any]]:
        async with self.arrived:
            await asyncio.wait_for(
                self.arrived.wait_for(lambda: len(self.bodies) >= count), timeout)
        return self.bodies


def serve(receiver: Receiver) -> tuple[HTTPServer, str]:
    sock, port = bind_unused_port()
    server = HTTPServer(receiver.app())
    server.add_sockets([sock])
    return server, f"http://127.0.0.1:{port}/hook"


@pytest.fixture
def receivers(io_loop: Any) -> Iterator[dict[str, tuple[Receiver, str]]]:
    made = {"ok": Receiver(), "hung": Receiver(hang=True)}
    servers = {name: serve(receiver) for name, receiver in made.items()}
    yield {name: (made[name], servers[name][1]) for name in made}
    for receiver in made.values():
        receiver.release.set()
    for server, _ in servers.values():
        server.stop()


@pytest.fixture
def squall_settings(receivers):
    from config.settings import Settings

    lifecycle = ["client_connected", "subscribed", "unsubscribed", "client_disconnected"]
    return Settings(ping_interval=0, webhooks=(
        {"url": receivers["ok"][1], "secret": SECRET, "signals": lifecycle},
        {"url": receivers["hung"][1], "secret": SECRET, "signals": lifecycle,
         "timeout": 30},
    ))


@pytest.mark.gen_test(timeout=30)
async def test_lifecycle_webhooks_are_signed_and_complete(receivers, ws_connect, node):
    receiver = receivers["ok"][0]
    client = await ws_connect(query="topic=orders.*")
    await client.recv_type("subscribed")
    await client.send({"type": "unsubscribe", "topic": "orders.*"})
    await client.recv_type("unsubscribed")
    await client.socket.close(code=1000)
    bodies = await receiver.wait_for(4)
    assert [body["signal"] for body in bodies] == [
        "client_connected", "subscribed", "unsubscribed", "client_disconnected"]
    client_info = bodies[0]["client"]
    assert set(client_info) == {"id", "sub", "ip", "info"} and client_info["ip"] == "127.0.0.1"
    for body in bodies:
        assert body["client"] == client_info and body["node"] == node.name
        assert isinstance(body["ts"], int)
    assert bodies[1]["topic"] == bodies[2]["topic"] == "orders.*"
    assert (bodies[3]["code"], bodies[0]["reason"]) == (1000, None)


@pytest.mark.gen_test(timeout=30)
async def test_a_hanging_endpoint_does_not_slow_fan_out(receivers, ws_connect, publish):
    subscriber = await ws_connect(query="topic=fast")
    await subscriber.recv_type("subscribed")
    started = asyncio.get_running_loop().time()
    for n in range(200):
        assert (await publish("fast", n)).code == 202
    assert [event["data"] for event in await subscriber.events(200)] == list(range(200))
    assert asyncio.get_running_loop().time() - started < 10
    assert receivers["hung"][0].bodies == []  # still hanging on its first delivery
    await receivers["ok"][0].wait_for(2)  # the healthy endpoint was not held up


@pytest.mark.gen_test(timeout=30)
async def test_in_process_receivers_sync_async_and_failing(ws_connect, publish, caplog):
    heard: list[tuple[str, Any]] = []
    done = asyncio.Event()

    def failing(**kwargs: Any) -> None:
        raise RuntimeError("receiver bug")

    def on_subscribed(*, topic: str, **kwargs: Any) -> None:
        heard.append(("sync", topic))

    async def on_published(*, event: Any, **kwargs: Any) -> None:
        heard.append(("async", event.data))
        done.set()

    signals.subscribed.connect(failing)
    signals.subscribed.connect(on_subscribed)
    signals.event_published.connect(on_published)
    try:
        client = await ws_connect(query="topic=hooked")
        await client.recv_type("subscribed")
        assert (await publish("hooked", {"x": 1})).code == 202
        assert (await client.recv_type("event"))["data"] == {"x": 1}
        await asyncio.wait_for(done.wait(), 5)
    finally:
        signals.subscribed.disconnect(failing)
        signals.subscribed.disconnect(on_subscribed)
        signals.event_published.disconnect(on_published)
    assert heard == [("sync", "hooked"), ("async", {"x": 1})]
    assert any("receiver bug" in record.exc_text for record in caplog.records
               if record.exc_text)


def test_hook_modules_are_imported_at_start(tmp_path):
    config = tmp_path / "squall.toml"
    config.write_text('hooks = ["examples.squall_hooks"]\n')
    with ServerProcess("--config", str(config)) as server:
        import websockets.sync.client as ws

        with ws.connect(f"ws://127.0.0.1:{server.port}/v1/ws?topic=demo") as socket:
            assert json.loads(socket.recv(timeout=5))["type"] == "subscribed"
    assert any("subscribed to demo" in line for line in server.log)


@pytest.mark.parametrize(("toml", "message"), [
    ('hooks = ["no.such.module"]\n', "module 'no.such.module' failed to import"),
    ('[[webhooks]]\nurl = "ftp://x"\nsecret = "s"\nsignals = ["subscribed"]\n',
     "webhooks[0]"),
    ('[[webhooks]]\nurl = "http://x"\nsecret = "s"\nsignals = ["nope"]\n', "unknown signals"),
    ('[[webhooks]]\nurl = "http://x"\nsecret = "s"\nsignals = ["subscribed"]\ncolour = 1\n',
     "unknown keys"),
])
def test_bad_extension_settings_stop_the_start(tmp_path, toml, message):
    config = tmp_path / "squall.toml"
    config.write_text(toml)
    server = ServerProcess("--config", str(config))
    with pytest.raises(RuntimeError, match="did not start"):
        server.start()
    assert server.process is not None and server.process.returncode == 2
    assert any(message in line for line in server.log)
