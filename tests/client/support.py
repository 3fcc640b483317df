"""What the client tests share: running scenarios, taking items, a faulty proxy.

The servers are real ``run.py`` processes (tests/server_process.py); the client is
the real ``squall_client``; faults are real too: a TCP proxy that loses an answer
or refuses connections, a server restarted on its port, a Redis stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import urllib.request
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from squall_client import Backoff, Event, Gap, Subscriber
from tests.server_process import ServerProcess, run_async

T = TypeVar("T")

# reconnects and retries fast enough for tests
FAST = Backoff(0.02, 0.2)
SCENARIO_TIMEOUT = 60.0
TAKE_TIMEOUT = 15.0


def run(scenario: Coroutine[Any, Any, T], timeout: float = SCENARIO_TIMEOUT) -> T:
    """Run an async scenario on a loop of its own, failing it after ``timeout``."""
    return run_async(asyncio.wait_for(scenario, timeout))


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ws_url(server: ServerProcess) -> str:
    return f"ws://127.0.0.1:{server.port}"


async def take(subscriber: Subscriber, count: int,
               timeout: float = TAKE_TIMEOUT) -> list[Event | Gap]:
    """The next ``count`` items of the iteration."""

    async def collect() -> list[Event | Gap]:
        items: list[Event | Gap] = []
        async for item in subscriber:
            items.append(item)
            if len(items) == count:
                break
        return items

    return await asyncio.wait_for(collect(), timeout)


def data_of(items: list[Event | Gap]) -> list[Any]:
    """Each item's data, and each gap as ("gap", topic, reason)."""
    return [item.data if isinstance(item, Event) else ("gap", item.topic, item.reason)
            for item in items]


def post_json(server: ServerProcess, path: str, body: Any, api_key: str) -> Any:
    request = urllib.request.Request(
        server.url + path, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def history(server: ServerProcess, topic: str, api_key: str | None = None) -> list[Any]:
    """The data of the retained events of ``topic``, oldest first."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(f"{server.url}/v1/topics/{topic}/events",
                                     headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        found = json.load(response)
    return [event["data"] for event in found["events"]]


class LogRecords(logging.Handler):
    """Records of one logger, for waiting on what the client reports it did."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def saw(self, text: str) -> bool:
        return any(text in message for message in self.messages)


@contextlib.contextmanager
def client_log() -> Iterator[LogRecords]:
    logger = logging.getLogger("squall_client")
    records = LogRecords()
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(records)
    try:
        yield records
    finally:
        logger.removeHandler(records)
        logger.setLevel(previous)


class FaultyProxy:
    """A TCP proxy in front of a server, on the test's loop, that can lose one answer
    (the request reaches the server, which acts on it; the client sees the
    connection drop) and can refuse connections while ``blocked``."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.blocked = False
        self.drop_next_answer = False
        self.dropped = asyncio.Event()
        self.refused = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self.blocked:
                self.refused += 1
                return
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1",
                                                                     self.upstream_port)
            except OSError:
                self.refused += 1
                return
            pumps = {asyncio.create_task(self._pump(reader, up_writer, answers=False)),
                     asyncio.create_task(self._pump(up_reader, writer, answers=True))}
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
                up_writer.close()
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter,
                    answers: bool) -> None:
        """Copy until either side ends (or an answer is to be lost)."""
        while data := await _read(source):
            if answers and self.drop_next_answer:
                self.drop_next_answer = False
                self.blocked = True  # the retry must wait for the test to let it through
                self.dropped.set()
                return
            sink.write(data)
            try:
                await sink.drain()
            except OSError:
                return


async def _read(source: asyncio.StreamReader) -> bytes:
    try:
        return await source.read(65536)
    except OSError:
        return b""
