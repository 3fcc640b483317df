"""Server pings: one keepalive task for the node (server/keepalive.py), the tick logic
on its own, then its behaviour on real sockets; and what an open connection keeps."""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from tornado.httputil import HTTPServerRequest
from tornado.ioloop import IOLoop

from server.keepalive import Keepalive
from tests.rawws import RawSocket, close_code
from tests.waiting import eventually
from transports.websocket import WebSocketHandler

live = pytest.mark.gen_test(timeout=20)

PING, PONG, CLOSE = 0x9, 0xA, 0x8


class Ticks:
    """Drives a keepalive tick by tick; ``now`` is the number of the last tick."""

    def __init__(self, keepalive: Keepalive) -> None:
        self.keepalive = keepalive
        self.now = 0

    def run(self, count: int) -> None:
        for _ in range(count):
            self.now += 1
            self.keepalive.tick()


class FakePeer:
    """Records at which ticks the keepalive pinged it and closed it."""

    def __init__(self, ticks: Ticks, answers: bool = False) -> None:
        self.ticks = ticks
        self.answers = answers
        self.pinged: list[int] = []
        self.timed_out: list[int] = []

    def send_ping(self) -> None:
        self.pinged.append(self.ticks.now)
        if self.answers:
            self.ticks.keepalive.answered(self)

    def ping_timed_out(self) -> None:
        self.timed_out.append(self.ticks.now)


def test_each_peer_is_pinged_once_per_interval() -> None:
    ticks = Ticks(Keepalive(interval=4.0, timeout=4.0, slots=4))
    early = FakePeer(ticks, answers=True)
    ticks.keepalive.add(early)
    ticks.run(1)
    late = FakePeer(ticks, answers=True)
    ticks.keepalive.add(late)
    ticks.run(11)
    assert early.pinged == [4, 8, 12]
    assert late.pinged == [5, 9]
    assert early.timed_out == late.timed_out == []


# the ticks at which a peer added at tick 0 is pinged and closed, in 12 ticks of 1 s
@pytest.mark.parametrize(("timeout", "answers", "pinged", "timed_out"), [
    (4.0, False, [4], [8]),  # the whole interval: closed instead of the next ping
    (2.0, False, [4], [6]),
    (0.5, False, [4], [5]),  # less than a tick: closed at the next one
    (2.0, True, [4, 8, 12], []),
    (0.0, False, [4, 8, 12], []),  # no timeout: pinged, never closed
    (9.0, False, [4], [8]),  # above the interval: as long as it
])
def test_unanswered_pings_close_after_the_timeout(timeout: float, answers: bool,
                                                  pinged: list[int],
                                                  timed_out: list[int]) -> None:
    ticks = Ticks(Keepalive(interval=4.0, timeout=timeout, slots=4))
    peer = FakePeer(ticks, answers)
    ticks.keepalive.add(peer)
    ticks.run(12)
    assert (peer.pinged, peer.timed_out) == (pinged, timed_out)


def test_removed_peers_are_neither_pinged_nor_closed() -> None:
    ticks = Ticks(Keepalive(interval=4.0, timeout=2.0, slots=4))
    peer = FakePeer(ticks)
    ticks.keepalive.add(peer)
    ticks.run(4)
    ticks.keepalive.remove(peer)
    ticks.run(8)
    assert (peer.pinged, peer.timed_out, len(ticks.keepalive)) == ([4], [], 0)


@live
async def test_interval_zero_disables_it() -> None:
    keepalive = Keepalive(interval=0.0, timeout=5.0)
    peer = FakePeer(Ticks(keepalive))
    keepalive.add(peer)
    keepalive.start()
    keepalive.tick()
    assert peer.pinged == []
    assert len(keepalive) == 0
    assert "keepalive" not in {task.get_name() for task in asyncio.all_tasks()}
    await keepalive.stop()


# -- on real sockets ---------------------------------------------------------------

RawConnect = Callable[[], Awaitable[RawSocket]]


@pytest.fixture
def raw_connect(http_server: Any, http_port: int, io_loop: IOLoop) -> Iterator[RawConnect]:
    """Open raw WebSocket clients, closed after the test."""
    opened: list[RawSocket] = []

    async def connect() -> RawSocket:
        client = await RawSocket.connect(http_port)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


async def frames_until_close(client: RawSocket, answer: bool,
                             pings: int = 1000) -> list[tuple[int, float, bytes]]:
    """(opcode, arrival, payload) of each frame until a close or the ``pings``-th ping;
    answers pings if ``answer``."""
    frames = []
    while True:
        opcode, payload = await client.read_frame(timeout=5)
        frames.append((opcode, time.monotonic(), payload))
        if opcode == PING and answer:
            client.send_frame(payload, opcode=PONG)
        if opcode == CLOSE or [frame[0] for frame in frames].count(PING) == pings:
            return frames


@live
@pytest.mark.settings(ping_interval=1.0, ping_timeout=0.3)
async def test_answering_clients_stay_and_silent_ones_close_with_1001(raw_connect):
    answering = await raw_connect()
    silent = await raw_connect()
    answered, unanswered = await asyncio.gather(frames_until_close(answering, True, pings=3),
                                                frames_until_close(silent, False))
    assert [opcode for opcode, _, _ in answered] == [PING] * 3
    times = [at for _, at, _ in answered]
    assert all(later - earlier > 0.8 for earlier, later in itertools.pairwise(times))

    [(first, pinged_at, _), (last, closed_at, payload)] = unanswered
    assert (first, last) == (PING, CLOSE)
    assert (close_code(payload), payload[2:]) == (1001, b"ping timed out")
    assert 0.25 < closed_at - pinged_at < 0.9  # the timeout, not the next ping
    answering.send_json({"type": "ping"})  # still served
    assert await answering.read_message() == {"type": "pong"}


@live
@pytest.mark.settings(ping_interval=0.1, ping_timeout=0)
async def test_without_timeout_silent_clients_get_pings_and_stay(raw_connect):
    silent = await raw_connect()
    frames = await frames_until_close(silent, False, pings=3)
    assert [opcode for opcode, _, _ in frames] == [PING] * 3


@live
@pytest.mark.settings(ping_interval=0)
async def test_without_interval_no_pings_come(raw_connect):
    client = await raw_connect()
    with pytest.raises(asyncio.TimeoutError):
        await client.read_frame(timeout=0.5)
    client.send_json({"type": "ping"})
    assert await client.read_message() == {"type": "pong"}


@live
@pytest.mark.settings(ping_interval=10, ping_timeout=10)  # no tick removes anyone here
async def test_closed_connections_leave_the_keepalive(ws_connect, raw_connect, node):
    client = await ws_connect()
    raw = await raw_connect()
    await client.send({"type": "ping"})
    await client.recv_type("pong")
    raw.send_json({"type": "ping"})
    assert await raw.read_message() == {"type": "pong"}
    assert len(node.keepalive) == 2
    await client.socket.close()
    await eventually(lambda: len(node.keepalive) == 1)
    raw.send_frame(b"\x03\xe8", opcode=CLOSE)
    await eventually(lambda: len(node.keepalive) == 0)


def handshake_objects() -> list[object]:
    return [o for o in gc.get_objects() if isinstance(o, (WebSocketHandler, HTTPServerRequest))]


@live
async def test_an_open_connection_keeps_no_handshake_objects(ws_connect):
    gc.collect()
    gc.disable()  # what is released must be released without the cycle collector
    try:
        earlier = handshake_objects()  # other tests' (a hung request, say)
        clients = [await ws_connect(query="topic=kept") for _ in range(3)]
        for client in clients:
            await client.recv_type("subscribed")
        await clients[0].send({"type": "ping"})
        await clients[0].recv_type("pong")
        kept = [type(o).__name__ for o in handshake_objects()
                if not any(o is other for other in earlier)]
    finally:
        gc.enable()
    assert kept == []
