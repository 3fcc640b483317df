"""Client ids never repeat across ``--workers``: each worker's node makes its own after
the fork. Seen from the outside, in the ids the ``client_connected`` webhook reports."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from websockets.sync.client import connect

from tests.server_process import ServerProcess
from tests.waiting import eventually

pytest_plugins = ["tests.redis_server"]
pytestmark = pytest.mark.redis


class Hooks(BaseHTTPRequestHandler):
    """Records the client id of every webhook it gets."""

    ids: list[str]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.ids.append(json.loads(body)["client"]["id"])
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def hooks() -> Iterator[tuple[str, list[str]]]:
    ids: list[str] = []
    handler = type("RecordingHooks", (Hooks,), {"ids": ids})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks", ids
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_two_workers_never_give_out_the_same_client_id(redis_url, hooks, tmp_path: Path):
    url, ids = hooks
    config = tmp_path / "squall.toml"
    config.write_text(f'[[webhooks]]\nurl = "{url}"\nsecret = "test-secret"\n'
                      'signals = ["client_connected"]\n')
    server = ServerProcess("--broker", redis_url, "--workers", "2", "--config", str(config),
                           "--ping-interval", "0").start()
    clients: list[object] = []
    try:
        with contextlib.ExitStack() as opened:
            for _ in range(8):  # until clients landed on both workers
                for _ in range(10):
                    clients.append(opened.enter_context(connect(
                        f"ws://127.0.0.1:{server.port}/v1/ws", open_timeout=10,
                        ping_interval=None)))
                run(eventually(lambda: len(ids) == len(clients), what="every client reported"))
                if len({client_id[:14] for client_id in ids}) == 2:
                    break
    finally:
        server.stop()
    workers = {client_id[:14] for client_id in ids}  # "c-" and a worker's 48 random bits
    assert len(workers) == 2, f"every client landed on one worker: {ids}"
    assert len(set(ids)) == len(ids) == len(clients)


def run(coroutine: object) -> object:
    from tests.server_process import run_async

    return run_async(coroutine)  # type: ignore[arg-type]
