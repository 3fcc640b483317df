"""Clients that follow the protocol through faults, and the bookkeeping of what got lost.

``Resumer`` is a WebSocket subscriber that does what docs/protocol.md asks of a client:
after any close it reconnects and resubscribes each name with the id of the last
event that subscription delivered (or the ``last_id`` of its ``subscribed`` reply
when none came), retries a subscribe answered ``broker_unavailable``, and notes every
``recovered: false``. ``Publisher`` POSTs numbered events at a steady rate, each with
its own ``Idempotency-Key``, retrying 503s and connection errors with the same key
until it gets a 202. ``Readiness`` samples ``/readyz``. ``Outcome`` says, per
subscriber, which accepted events arrived. ``two_nodes`` runs all of them against two
real nodes on one broker through one fault; ``figures`` sums up what happened and
writes it to tests/artifacts/chaos.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websockets
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from server.topics import matches
from tests.server_process import ServerProcess

RETRY_PAUSE = 0.02
ARTIFACTS = Path(__file__).parent / "artifacts"
NAMES = (["chaos.a"], ["chaos.*"])
TOPICS = ["chaos.a", "chaos.b"]
SETTLE = 1.5  # seconds of publishing before the fault and after the broker is back
PUBLISHER_STOPS = 30.0  # seconds the publisher may take to get its last events accepted


class Resumer:
    """A subscriber of ``names`` on ``url`` that resumes after every close."""

    def __init__(self, url: str, names: list[str]) -> None:
        self.url = url
        self.names = names
        self.last: dict[str, str | None] = dict.fromkeys(names)
        self.received: list[tuple[str, Any]] = []  # (id, data), each id once
        self.ids: set[str] = set()
        self.duplicates = 0
        self.closes: list[int | None] = []
        # what a failure needs told: subscribes, replies, closes, each connection's first event
        self.trace: list[tuple[Any, ...]] = []
        self._first_event = True
        self.unrecovered: list[str] = []
        self.connected = asyncio.Event()
        self._fresh: set[str] = set()  # subscribes sent that have not delivered an event
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Resumer:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while not self._stopping:
            try:
                async with websockets.connect(self.url, open_timeout=5,
                                              close_timeout=1) as socket:
                    self._first_event = True
                    for name in self.names:
                        await self._subscribe(socket, name)
                    async for raw in socket:
                        await self._on_frame(socket, json.loads(raw))
            except websockets.ConnectionClosed as closed:
                self.closes.append(closed.rcvd.code if closed.rcvd else None)
            except (OSError, TimeoutError, websockets.InvalidHandshake):
                self.closes.append(None)
            self._note("closed", self.closes[-1])
            self.connected.clear()
            await asyncio.sleep(0.05)

    async def _subscribe(self, socket: Any, name: str) -> None:
        frame: dict[str, Any] = {"type": "subscribe", "topic": name, "ref": name}
        if self.last[name] is not None:
            frame["since"] = self.last[name]
        self._note("subscribe", name, self.last[name])
        self._fresh.add(name)
        await socket.send(json.dumps(frame))

    def _note(self, *what: Any) -> None:
        self.trace.append((round(time.monotonic(), 3), *what))

    async def _on_frame(self, socket: Any, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind != "event" or self._first_event:
            self._first_event = self._first_event and kind != "event"
            self._note(kind, *(frame.get(key) for key in ("id", "last_id", "recovered", "code")
                               if key in frame))
        if kind == "event":
            for name in self.names:
                if matches(name, frame["topic"]):
                    self.last[name] = frame["id"]
                    self._fresh.discard(name)
            if frame["id"] in self.ids:
                self.duplicates += 1
            else:
                self.ids.add(frame["id"])
                self.received.append((frame["id"], frame["data"]))
        elif kind == "subscribed":
            name = frame["topic"]
            if frame.get("recovered") is False:
                self.unrecovered.append(name)
            if name in self._fresh:
                self.last[name] = frame["last_id"]
                self._fresh.discard(name)
            if all(name not in self._fresh for name in self.names):
                self.connected.set()
        elif kind == "error" and frame.get("code") == "broker_unavailable":
            await asyncio.sleep(0.1)
            await self._subscribe(socket, frame["ref"])


@dataclass
class Accepted:
    n: int
    topic: str
    id: str
    at: float  # monotonic time of the 202


@dataclass
class Publisher:
    """Publishes event ``n`` to ``topics[n % len(topics)]`` on ``nodes[n % len(nodes)]``,
    ``concurrency`` at a time, ``rate`` a second in all."""

    nodes: list[str]
    topics: list[str]
    rate: float = 80.0
    timeout: float = 10.0
    accepted: list[Accepted] = field(default_factory=list)
    unavailable: int = 0  # 503 answers
    failed: int = 0  # connection errors and timeouts
    slowest_503: float = 0.0
    slowest: float = 0.0  # of any answered attempt
    _stopping: bool = False

    concurrency: int = 4  # publishes in flight at once, so some queue behind others

    async def run(self) -> None:
        client = AsyncHTTPClient()
        await asyncio.gather(*(self._worker(client, first)
                               for first in range(self.concurrency)))

    async def _worker(self, client: AsyncHTTPClient, n: int) -> None:
        pause = self.concurrency / self.rate
        while not self._stopping:
            started = time.monotonic()
            await self._publish_until_accepted(client, n)
            n += self.concurrency
            await asyncio.sleep(max(0.0, pause - (time.monotonic() - started)))

    def stop(self) -> None:
        self._stopping = True

    async def _publish_until_accepted(self, client: AsyncHTTPClient, n: int) -> None:
        topic = self.topics[n % len(self.topics)]
        url = f"{self.nodes[n % len(self.nodes)]}/v1/topics/{topic}/events"
        while True:
            sent = time.monotonic()
            try:
                response = await client.fetch(
                    url, method="POST", body=json.dumps({"n": n}), raise_error=False,
                    request_timeout=self.timeout,
                    headers={"Content-Type": "application/json", "Idempotency-Key": f"k{n}"})
            except (OSError, HTTPClientError):
                self.failed += 1
                await asyncio.sleep(RETRY_PAUSE)
                continue
            self.slowest = max(self.slowest, time.monotonic() - sent)
            if response.code == 202:
                body = json.loads(response.body)
                self.accepted.append(Accepted(n, topic, body["id"], time.monotonic()))
                return
            assert response.code in (503, 599), (response.code, response.body)
            if response.code == 503:
                self.unavailable += 1
                self.slowest_503 = max(self.slowest_503, time.monotonic() - sent)
            else:
                self.failed += 1
            await asyncio.sleep(RETRY_PAUSE)


class Readiness:
    """``/readyz`` of some nodes, sampled every few milliseconds."""

    def __init__(self, nodes: list[str], every: float = 0.02) -> None:
        self.nodes = nodes
        self.every = every
        self.samples: list[tuple[float, tuple[int, ...]]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Readiness:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        client = AsyncHTTPClient()
        while True:
            codes = []
            for node in self.nodes:
                try:
                    response = await client.fetch(f"{node}/readyz", raise_error=False,
                                                  request_timeout=2)
                    codes.append(response.code)
                except (OSError, HTTPClientError):
                    codes.append(0)
            self.samples.append((time.monotonic(), tuple(codes)))
            await asyncio.sleep(self.every)

    def first(self, after: float, all_ready: bool) -> float | None:
        """When every node was first ready (or all unready), after ``after``."""
        wanted = 200 if all_ready else 503
        for at, codes in self.samples:
            if at >= after and all(code == wanted for code in codes):
                return at
        return None


def epoch(event_id: str) -> str:
    return event_id.rpartition("-")[0]


@dataclass
class Outcome:
    """What one subscriber got of the accepted events it should have."""

    expected: int
    received: int
    missing: list[Accepted]

    @classmethod
    def of(cls, subscriber: Resumer, accepted: list[Accepted]) -> Outcome:
        wanted = [event for event in accepted
                  if any(matches(name, event.topic) for name in subscriber.names)]
        missing = [event for event in wanted if event.id not in subscriber.ids]
        return cls(len(wanted), len(wanted) - len(missing), missing)


async def received_all(subscriber: Resumer, accepted: list[Accepted], timeout: float) -> None:
    """Wait until ``subscriber`` has every one of ``accepted`` it subscribed to."""
    deadline = time.monotonic() + timeout
    while Outcome.of(subscriber, accepted).missing and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


Fault = Callable[[], Awaitable[tuple[float, float]]]


async def two_nodes(url: str, fault: Fault, broker_timeout: float, *flags: str,
                    topics: Sequence[str] = TOPICS,
                    names: Sequence[list[str]] = NAMES) -> dict[str, Any]:
    """Two nodes on the broker at ``url``, a subscriber of each of ``names`` on each
    node, a publisher to ``topics`` on the first, and one fault, which returns when
    it started and when it ended; what happened."""
    flags = ("--broker", url, "--broker-timeout", str(broker_timeout),
             "--ping-interval", "0", *flags)
    nodes = [ServerProcess(*flags, "--node-name", name) for name in ("node-a", "node-b")]
    for node in nodes:
        node.start()
    subscribers = [Resumer(f"ws://127.0.0.1:{node.port}/v1/ws", list(subscribed))
                   for node in nodes for subscribed in names]
    readiness = Readiness([node.url for node in nodes])
    publisher = Publisher([nodes[0].url], list(topics))
    try:
        for subscriber in subscribers:
            subscriber.start()
            await asyncio.wait_for(subscriber.connected.wait(), 10)
        readiness.start()
        publishing = asyncio.ensure_future(publisher.run())
        await asyncio.sleep(SETTLE)
        started, ended = await fault()
        await asyncio.sleep(SETTLE)
        publisher.stop()
        try:  # each worker stops once its event is accepted
            await asyncio.wait_for(publishing, PUBLISHER_STOPS)
        except TimeoutError:
            raise AssertionError("publishes are still refused long after the fault:\n"
                                 + "".join(nodes[0].log[-40:])) from None
        for subscriber in subscribers:
            await received_all(subscriber, [event for event in publisher.accepted
                                            if event.at > ended], 20)
        await asyncio.sleep(0.5)  # anything more (duplicates, say) would arrive by now
    finally:
        await readiness.stop()
        for subscriber in subscribers:
            await subscriber.stop()
        logs = ["".join(node.log) for node in nodes]
        for node in nodes:
            node.stop()
    return {"publisher": publisher, "subscribers": subscribers, "readiness": readiness,
            "fault": (started, ended), "logs": logs, "nodes": nodes}


def figures(name: str, outcome: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The run's figures, also written to tests/artifacts/chaos.json."""
    publisher: Publisher = outcome["publisher"]
    started, ended = outcome["fault"]
    readiness: Readiness = outcome["readiness"]
    unready = readiness.first(started, all_ready=False)
    ready = readiness.first(ended, all_ready=True)
    results = [Outcome.of(subscriber, publisher.accepted)
               for subscriber in outcome["subscribers"]]
    found = {
        "accepted": len(publisher.accepted), "answered_503": publisher.unavailable,
        "connection_errors": publisher.failed,
        "slowest_503_s": round(publisher.slowest_503, 3),
        "slowest_answer_s": round(publisher.slowest, 3),
        "delivered": sum(result.received for result in results),
        "expected": sum(result.expected for result in results),
        "lost_after_recovery": sum(1 for result in results for event in result.missing
                                   if event.at > ended),
        "lost_before_fault": sum(1 for result in results for event in result.missing
                                 if event.at <= ended),
        "duplicates": sum(subscriber.duplicates for subscriber in outcome["subscribers"]),
        "unready_after_s": None if unready is None else round(unready - started, 3),
        "ready_after_s": None if ready is None else round(ready - ended, 3),
        **extra,
    }
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "chaos.json"
    recorded = json.loads(path.read_text()) if path.exists() else {}
    recorded[name] = found
    path.write_text(json.dumps(recorded, indent=2) + "\n")
    print(name, found)
    return found


def lost(subscriber: Resumer, missing: list[Accepted], outcome: dict[str, Any]) -> str:
    """What an assertion about ``subscriber`` missing events should say."""
    return (f"{subscriber.names} on {subscriber.url} missed {len(missing)} accepted events, "
            f"first {missing[:1]}; what it did: {subscriber.trace}\nthe nodes' logs:\n"
            + "\n".join(outcome["logs"]))


def no_tracebacks(outcome: dict[str, Any]) -> None:
    for log in outcome["logs"]:
        assert "Traceback" not in log, log
