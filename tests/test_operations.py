"""Operations: metrics that move, readiness, logs, graceful shutdown of a real process."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time

import pytest
import websockets

from tests.server_process import ServerProcess, run_async


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert found, f"{name} not in metrics"
    return float(found.group(1))


@pytest.mark.gen_test(timeout=30)
async def test_metrics_move_as_events_flow(http_client, base_url, ws_connect, publish):
    async def scrape() -> str:
        response = await http_client.fetch(base_url + "/metrics")
        assert response.headers["Content-Type"].startswith("text/plain")
        return response.body.decode()

    before = await scrape()
    assert metric(before, "squall_connections") == 0
    clients = [await ws_connect(query="topic=m.a") for _ in range(3)]
    for client in clients:
        await client.recv_type("subscribed")
    for n in range(5):  # each fanned out before the next: one fan-out each
        await publish("m.a", n)
        for client in clients:
            await client.events(1)
    after = await scrape()
    assert metric(after, "squall_connections") == 3
    assert metric(after, "squall_subscriptions") == 3
    assert metric(after, "squall_events_published_total") == 5
    assert metric(after, "squall_events_delivered_total") == 15
    assert metric(after, "squall_publish_duration_seconds_count") == 5
    assert metric(after, "squall_fanout_duration_seconds_count") == 5
    assert metric(after, "squall_broker_up") == 1
    assert 'squall_http_requests_total{status="202"} 5.0' in after
    assert "topic=" not in after  # no per-topic labels


@pytest.mark.gen_test(timeout=30)
async def test_readiness_turns_off_when_shutting_down(http_client, base_url, node):
    ready = await http_client.fetch(base_url + "/readyz", raise_error=False)
    assert ready.code == 200
    await node.stop()
    response = await http_client.fetch(base_url + "/readyz", raise_error=False)
    assert response.code == 503
    assert json.loads(response.body)["reason"] == "shutting down"
    assert (await http_client.fetch(base_url + "/healthz", raise_error=False)).code == 200


async def _subscribe(port: int) -> websockets.ClientConnection:
    socket = await websockets.connect(f"ws://127.0.0.1:{port}/v1/ws?topic=bye")
    assert json.loads(await socket.recv())["type"] == "subscribed"
    return socket


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_closes_websockets_with_1001_and_exits_0(signum):
    server = ServerProcess("--log-format", "json", "--shutdown-timeout", "5").start()

    async def scenario() -> int | None:
        sockets = [await _subscribe(server.port) for _ in range(3)]
        assert server.process is not None
        server.process.send_signal(signum)
        codes = []
        for socket in sockets:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(socket.recv(), 10)
            codes.append(closed.value.rcvd.code if closed.value.rcvd else None)
        return codes[0] if len(set(codes)) == 1 else None

    try:
        started = time.monotonic()
        assert run_async(scenario()) == 1001
        assert server.process is not None
        assert server.process.wait(10) == 0
        assert time.monotonic() - started < 8
    finally:
        server.stop()
    lines = [json.loads(line) for line in server.log if line.startswith("{")]
    assert any(line["message"].startswith("shutting down") for line in lines)
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in lines)


def test_one_access_line_per_request_none_per_frame():
    server = ServerProcess("--log-format", "json", "--access-log", "true").start()

    async def scenario() -> None:
        socket = await _subscribe(server.port)
        for n in range(20):
            await socket.send(json.dumps({"type": "ping", "ref": n}))
            await socket.recv()
        await socket.close()

    try:
        run_async(scenario())
        server.get_json("/healthz")
    finally:
        server.stop()
    access = [json.loads(line) for line in server.log
              if line.startswith("{") and '"squall.access"' in line]
    assert [(line["method"], line["path"], line["status"]) for line in access] == [
        ("GET", "/v1/ws", 101), ("GET", "/healthz", 200)]


@pytest.mark.gen_test
async def test_the_tests_run_on_the_event_loop_production_runs_on():
    from config.settings import Settings

    loop = asyncio.get_running_loop()
    expected = Settings().event_loop
    assert type(loop).__module__.split(".")[0] == ("uvloop" if expected == "uvloop"
                                                    else "asyncio")
