"""Load generator for fan-out servers: Squall, the Tornado baseline and nchan.

Runs in its own process on uvloop with the raw protocols of ``rawproto``. It opens N
subscribers on one topic (WebSocket; for Squall also SSE or the TCP line protocol,
``--transport``) and publishes 100-byte JSON events through
keep-alive HTTP/1.1 POSTs, then prints one JSON line per measurement on stdout:

- ``fanout_max``: deliveries/s (messages received by all subscribers / time) while
  publishing as fast as the server answers; messages are counted, never parsed.
- ``fanout_latency``: publish-to-receive latency percentiles at a fixed delivery rate
  (publish rate = rate / N); each event carries its send time, parsed on receipt.
- ``idle``: server RSS per idle WebSocket connection.
- ``ingest``: events/s accepted through single POSTs, batch POSTs or WebSocket
  ``publish`` frames, with one subscriber.

Server CPU (utime + stime) and RSS come from ``/proc`` for the pids given with
``--server-pid``; the load generator reports its own CPU time as well, so a saturated
load generator is visible in the results. URL shapes are templates with ``{port}`` and
``{topic}``; ``--target`` picks a preset, explicit ``--*-url`` flags override it.

Example::

    python bench/loadgen.py --target squall --port 8888 --server-pid 1234 fanout -n 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from rawproto import (
    HttpClient,
    Subscriber,
    Url,
    WebSocketClient,
    encode_client_frame,
    open_http,
    open_subscriber,
    open_websocket,
    post_request,
)

EVENT_SIZE = 100
STAMP = re.compile(rb'"sent_ns":\s*(\d+)')
CLK_TCK = os.sysconf("SC_CLK_TCK")
MAX_CONNECTIONS = 9500  # the open-file cap (20000) is shared by sockets of both sides
MAX_REQUESTS = 10_000_000  # per publishing run, on top of its deadline

PRESETS: dict[str, dict[str, str]] = {
    "squall": {
        "sub_url": "ws://127.0.0.1:{port}/v1/ws?topic={topic}",
        "pub_url": "http://127.0.0.1:{port}/v1/topics/{topic}/events",
        "batch_url": "http://127.0.0.1:{port}/v1/events",
        "ws_pub_url": "ws://127.0.0.1:{port}/v1/ws",
        "subprotocol": "squall.v1.json",
    },
    "nchan": {
        "sub_url": "ws://127.0.0.1:{port}/sub/{topic}",
        "pub_url": "http://127.0.0.1:{port}/pub/{topic}",
        "batch_url": "",
        "ws_pub_url": "",
        "subprotocol": "",
    },
}
PRESETS["baseline"] = dict(PRESETS["squall"])
PRESETS["squall-logged"] = dict(PRESETS["squall"])
PRESETS["tornado-minimal"] = {**PRESETS["squall"], "batch_url": "", "ws_pub_url": ""}
PRESETS["squall-redis"] = dict(PRESETS["squall"])
PRESETS["squall-redis-apart"] = dict(PRESETS["squall"])
PRESETS["squall-cluster"] = dict(PRESETS["squall"])
PRESETS["squall-base"] = dict(PRESETS["squall"])
PRESETS["squall-sse"] = {**PRESETS["squall"],
                         "sub_url": "http://127.0.0.1:{port}/v1/sse?topic={topic}"}
PRESETS["squall-tcp"] = {**PRESETS["squall"], "sub_url": "tcp://127.0.0.1:{tcp_port}"}
# the subscribers' transport of each preset (ws unless named here)
TRANSPORTS = {"squall-sse": "sse", "squall-tcp": "tcp"}


def event_body(sent_ns: int = 0) -> bytes:
    """A JSON object of exactly ``EVENT_SIZE`` bytes carrying a send timestamp."""
    head = b'{"sent_ns":%d,"pad":"' % sent_ns
    return head + b"x" * (EVENT_SIZE - len(head) - 2) + b'"}'


def batch_body(topic: str, size: int) -> bytes:
    """A batch publish body of ``size`` events."""
    entry = b'{"topic":%s,"data":%s}' % (json.dumps(topic).encode(), event_body())
    return b'{"events":[' + b",".join([entry] * size) + b"]}"


def ndjson_body(topic: str, size: int) -> bytes:
    """A streaming batch (``application/x-ndjson``) body of ``size`` events."""
    line = b'{"topic":%s,"data":%s}\n' % (json.dumps(topic).encode(), event_body())
    return line * size


def publish_line(topic: str) -> bytes:
    """One TCP line-protocol ``publish`` command (the same bytes are reused)."""
    return b'{"type":"publish","topic":%s,"data":%s,"ref":1}\n' % (
        json.dumps(topic).encode(), event_body())


def ws_publish_frame(topic: str) -> bytes:
    """One encoded WebSocket ``publish`` frame (the same bytes are reused)."""
    payload = b'{"type":"publish","topic":%s,"data":%s,"ref":1}' % (
        json.dumps(topic).encode(),
        event_body(),
    )
    return encode_client_frame(payload)


# -- process statistics -------------------------------------------------------------------


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of ``pids``, in seconds."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def rss_kb(pids: Sequence[int]) -> int:
    """Sum of VmRSS of ``pids``, in KiB."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def machine_busy_seconds() -> float:
    """CPU time of all cores in processes (user, system) or stolen by the hypervisor.

    Interrupt time is left out: loopback traffic is processed there, on behalf of the
    benchmark itself.
    """
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:9]]
    user, nice, system, steal = fields[0], fields[1], fields[2], fields[7]
    return (user + nice + system + steal) / CLK_TCK


@dataclass(frozen=True)
class Snapshot:
    """Counters at one instant; two of them make a measurement window."""

    wall: float
    own_cpu: float
    machine_busy: float
    server_cpu: float | None
    server_rss_kb: int | None
    delivered: int
    accepted: int


def window(a: Snapshot, b: Snapshot) -> dict[str, Any]:
    """Rates and costs between two snapshots."""
    seconds = b.wall - a.wall
    delivered = b.delivered - a.delivered
    result: dict[str, Any] = {
        "seconds": round(seconds, 3),
        "deliveries": delivered,
        "deliveries_per_s": round(delivered / seconds, 1),
        "loadgen_cpu_util": round((b.own_cpu - a.own_cpu) / seconds, 3),
        "server_cpu_util": None,
        "server_cpu_us_per_delivery": None,
        "server_rss_mb": None,
    }
    others = b.machine_busy - a.machine_busy - (b.own_cpu - a.own_cpu)
    if a.server_cpu is not None and b.server_cpu is not None:
        cpu = b.server_cpu - a.server_cpu
        others -= cpu
        result["server_cpu_util"] = round(cpu / seconds, 3)
        if delivered:
            result["server_cpu_us_per_delivery"] = round(cpu / delivered * 1e6, 2)
    # CPU taken by everything else: other processes and hypervisor steal.
    result["other_cpu_util"] = round(max(0.0, others) / seconds, 3)
    if b.server_rss_kb is not None:
        result["server_rss_mb"] = round(b.server_rss_kb / 1024, 1)
    return result


# -- publishers ---------------------------------------------------------------------------


class HttpPublishers:
    """Keep-alive publisher connections, one request in flight on each.

    ``run_for`` keeps every connection busy with the same request until a deadline;
    ``send`` hands one request to an idle connection (for fixed-rate publishing).
    """

    def __init__(self, url: Url) -> None:
        self.url = url
        self.clients: list[HttpClient] = []
        self.accepted = 0
        self.rejected: Counter[int] = Counter()
        self.reconnects = 0
        self._idle: deque[HttpClient] = deque()
        self._idle_changed = asyncio.Event()
        self._loop_request = b""
        self._deadline = 0.0
        self._budget = 0
        self._replacing: set[asyncio.Task[None]] = set()

    async def connect(self, count: int) -> None:
        for _ in range(count):
            await self._add_client()

    async def _add_client(self) -> None:
        client = await open_http(self.url, self._on_response, self._on_lost)
        self.clients.append(client)
        self._next(client)

    def _on_lost(self, client: HttpClient) -> None:
        """Replace a connection the server closed; its request in flight is lost."""
        self.clients.remove(client)
        if client in self._idle:
            self._idle.remove(client)
        self.reconnects += 1
        task = asyncio.ensure_future(self._add_client())
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    def _on_response(self, client: HttpClient, status: int) -> None:
        if 200 <= status < 300:
            self.accepted += 1
        else:
            self.rejected[status] += 1
        self._next(client)

    def _next(self, client: HttpClient) -> None:
        """Keep ``client`` busy while a run lasts, else park it as idle."""
        if self._budget > 0 and time.monotonic() < self._deadline:
            self._budget -= 1
            client.send(self._loop_request)
            return
        self._idle.append(client)
        self._idle_changed.set()

    async def run_for(
        self, request: bytes, seconds: float, limit: int = MAX_REQUESTS, grace: float = 15.0
    ) -> None:
        """Publish ``request`` on every connection for ``seconds`` (at most ``limit`` times)."""
        self._loop_request, self._budget = request, limit
        self._deadline = time.monotonic() + seconds
        idle, self._idle = self._idle, deque()
        for client in idle:
            self._next(client)
        await self.wait_idle(seconds + grace)
        self._budget = 0

    async def send(self, request: bytes, timeout: float = 10.0) -> bool:
        """Send on the next idle connection; False if none frees up within ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self._idle:
            self._idle_changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await _wait_event(self._idle_changed, remaining):
                return False
        self._idle.popleft().send(request)
        return True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False on timeout."""
        deadline = time.monotonic() + timeout
        while len(self._idle) < len(self.clients):
            self._idle_changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await _wait_event(self._idle_changed, remaining):
                return False
        return True

    def close(self) -> None:
        for client in self.clients:
            client.close()


class _Windowed:
    """Connections that each keep ``window`` publishes unanswered: a reply sends the
    next one. Subclasses connect, and send ``message`` on a client with ``_send``."""

    def __init__(self, message: bytes, window: int) -> None:
        self.clients: list[Any] = []
        self.accepted = 0
        self.errors = 0
        self._message, self._window = message, window
        self._deadline = 0.0
        self._budget = 0
        self._in_flight = 0
        self._drained = asyncio.Event()

    def _send(self, client: Any, data: bytes) -> None:
        raise NotImplementedError

    def _replied(self, client: Any, reply: bytes) -> None:
        if b'"published"' in reply:
            self.accepted += 1
        else:
            self.errors += 1
        self._in_flight -= 1
        if self._budget > 0 and time.monotonic() < self._deadline:
            self._budget -= 1
            self._in_flight += 1
            self._send(client, self._message)
        elif self._in_flight <= 0:
            self._drained.set()

    async def run_for(self, seconds: float, limit: int = MAX_REQUESTS, grace: float = 15.0) -> None:
        """Publish for ``seconds`` (at most ``limit`` messages), then await the replies."""
        self._deadline = time.monotonic() + seconds
        self._budget = limit - self._window * len(self.clients)
        self._drained.clear()
        for client in self.clients:
            self._in_flight += self._window
            self._send(client, self._message * self._window)
        await _wait_event(self._drained, seconds + grace)

    def close(self) -> None:
        for client in self.clients:
            client.close()


class WsPublishers(_Windowed):
    """WebSocket connections sending ``publish`` frames."""

    async def connect(self, url: Url, subprotocol: str, count: int) -> None:
        for _ in range(count):
            client = await open_websocket(url, subprotocol)
            client.on_message = self._reply_handler(client)
            self.clients.append(client)

    def _reply_handler(self, client: WebSocketClient) -> Callable[[bytes, int], None]:
        def on_reply(payload: bytes, _now: int) -> None:
            self._replied(client, payload)

        return on_reply

    def _send(self, client: Any, data: bytes) -> None:
        client.send_frame(data)


class _LinePublisher(asyncio.Protocol):
    """One TCP line-protocol connection; ``on_reply`` gets each complete reply line."""

    def __init__(self, on_reply: Callable[[_LinePublisher, bytes], None]) -> None:
        self.on_reply = on_reply
        self.transport: asyncio.Transport | None = None
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        for line in lines:
            self.on_reply(self, line)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class LinePublishers(_Windowed):
    """TCP line-protocol connections sending ``publish`` lines."""

    async def connect(self, url: Url, count: int) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(count):
            _, client = await loop.create_connection(
                lambda: _LinePublisher(self._replied), url.host, url.port)
            self.clients.append(client)

    def _send(self, client: Any, data: bytes) -> None:
        client.send(data)


async def _wait_event(event: asyncio.Event, timeout: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return False
    return True


# -- subscribers --------------------------------------------------------------------------


async def connect_subscribers(bench: Bench, count: int) -> list[Subscriber]:
    """Open ``count`` subscribers, ``batch`` handshakes at a time (listen backlogs are short)."""
    clients: list[Subscriber] = []
    for start in range(0, count, bench.connect_batch):
        size = min(bench.connect_batch, count - start)
        clients.extend(await _connect_batch(bench, size))
    return clients


async def _connect_batch(bench: Bench, size: int, attempts: int = 3) -> list[Subscriber]:
    opened: list[Subscriber] = []
    failure: BaseException | None = None
    for _ in range(attempts):
        results = await asyncio.gather(
            *(open_subscriber(bench.transport, bench.sub_url, bench.subprotocol, bench.topic)
              for _ in range(size - len(opened))),
            return_exceptions=True,
        )
        opened.extend(r for r in results if not isinstance(r, BaseException))
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if len(opened) == size:
            return opened
        await asyncio.sleep(0.5)
    raise ConnectionError(f"{size - len(opened)} subscriber connects failed: {failure!r}")


def delivered(subscribers: Sequence[Subscriber]) -> int:
    return sum(client.messages for client in subscribers)


async def wait_until_registered(
    subscribers: Sequence[Subscriber],
    publishers: HttpPublishers,
    probe: bytes,
    timeout: float = 20.0,
) -> None:
    """Publish probe events until every subscriber has received a message.

    Squall and the baseline greet with ``subscribed``; nchan sends nothing until an
    event arrives, so only a delivered probe proves the subscription is in place.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(client.messages for client in subscribers):
            return
        await publishers.send(probe)
        await asyncio.sleep(0.2)
    missing = sum(1 for client in subscribers if not client.messages)
    raise TimeoutError(f"{missing} subscribers never received a probe event")


async def settle(
    subscribers: Sequence[Subscriber], quiet: float = 0.3, limit: float = 20.0
) -> None:
    """Wait until no message has arrived for ``quiet`` seconds (at most ``limit``)."""
    last, deadline = -1, time.monotonic() + limit
    while time.monotonic() < deadline:
        now = delivered(subscribers)
        if now == last:
            return
        last = now
        await asyncio.sleep(quiet)


async def drain(
    count: Callable[[], int], expected: int, stall: float = 2.0, limit: float = 30.0
) -> int:
    """Wait until ``count()`` reaches ``expected`` or stops growing; return the shortfall."""
    last, last_change, deadline = count(), time.monotonic(), time.monotonic() + limit
    while count() < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        now = count()
        if now != last:
            last, last_change = now, time.monotonic()
        elif time.monotonic() - last_change > stall:
            break
    return max(0, expected - count())


# -- measurements -------------------------------------------------------------------------


@dataclass
class Bench:
    """What every measurement needs: URLs, the server pids and the output label."""

    label: str
    topic: str
    sub_url: Url
    pub_url: Url
    batch_url: Url | None
    ws_pub_url: Url | None
    tcp_url: Url | None
    subprotocol: str
    server_pids: list[int]
    publishers: int
    connect_batch: int
    transport: str = "ws"
    subscribers: list[Subscriber] = field(default_factory=list)

    def snapshot(self, accepted: int = 0) -> Snapshot:
        pids = self.server_pids
        return Snapshot(
            wall=time.monotonic(),
            own_cpu=time.process_time(),
            machine_busy=machine_busy_seconds(),
            server_cpu=cpu_seconds(pids) if pids else None,
            server_rss_kb=rss_kb(pids) if pids else None,
            delivered=delivered(self.subscribers),
            accepted=accepted,
        )

    def emit(self, measure: str, **values: Any) -> None:
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
        line = {"target": self.label, "measure": measure, "loop": loop, **values}
        print(json.dumps(line), flush=True)

    def close(self) -> None:
        for client in self.subscribers:
            client.close()


async def fanout(bench: Bench, args: argparse.Namespace) -> None:
    """Max-rate repetitions, then latency at a fixed rate, on one set of subscribers."""
    started = time.monotonic()
    bench.subscribers = await connect_subscribers(bench, args.n)
    connect_s = time.monotonic() - started
    publishers = HttpPublishers(bench.pub_url)
    await publishers.connect(bench.publishers)
    await wait_until_registered(
        bench.subscribers, publishers, post_request(bench.pub_url, event_body())
    )
    for run in range(1, args.repeat + 1):
        result = await max_rate(bench, publishers, args)
        bench.emit("fanout_max", n=args.n, run=run + args.run_offset,
                   connect_s=round(connect_s, 2), **result)
    if args.latency_rate > 0:
        result = await latency(bench, publishers, args)
        bench.emit("fanout_latency", n=args.n, **result)
    publishers.close()


async def max_rate(
    bench: Bench, publishers: HttpPublishers, args: argparse.Namespace
) -> dict[str, Any]:
    """Publish as fast as the server answers; count deliveries in a steady window."""
    await settle(bench.subscribers)
    base_delivered, base_accepted = delivered(bench.subscribers), publishers.accepted
    base_rejected = Counter(publishers.rejected)
    request = post_request(bench.pub_url, event_body())
    if args.low_water > 1:
        for client in bench.subscribers:
            client.set_receive_low_water(args.low_water)
    running = asyncio.ensure_future(publishers.run_for(request, args.warmup + args.duration))
    await asyncio.sleep(args.warmup)
    first = bench.snapshot(publishers.accepted)
    await asyncio.sleep(args.duration)
    last = bench.snapshot(publishers.accepted)
    await running
    if args.low_water > 1:
        for client in bench.subscribers:
            client.set_receive_low_water(1)
    published = publishers.accepted - base_accepted
    expected = base_delivered + published * args.n
    missing = await drain(lambda: delivered(bench.subscribers), expected)
    return {
        **window(first, last),
        "publishes_per_s": round((last.accepted - first.accepted) / (last.wall - first.wall), 1),
        "published": published,
        "undelivered": missing,
        "rejected": dict(publishers.rejected - base_rejected),
        "subscribers_closed": sum(1 for c in bench.subscribers if not c.is_open),
        "publisher_reconnects": publishers.reconnects,
    }


class LatencyRecorder:
    """Collects receive time minus the ``sent_ns`` stamp carried in each event.

    Events stamped before ``since_ns`` (the max-rate runs' events, stamped 0, that a
    slow server may still be delivering) are left out.
    """

    def __init__(self, since_ns: int) -> None:
        self.since_ns = since_ns
        self.samples: list[int] = []

    def on_message(self, payload: bytes, now: int) -> None:
        match = STAMP.search(payload)
        if match is not None:
            sent = int(match.group(1))
            if sent >= self.since_ns:
                self.samples.append(now - sent)

    def summary(self) -> dict[str, float | int | None]:
        ordered = sorted(self.samples)
        if not ordered:
            return {"samples": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}

        def at(q: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6, 2)

        return {
            "samples": len(ordered),
            "p50_ms": at(0.50),
            "p90_ms": at(0.90),
            "p99_ms": at(0.99),
            "max_ms": round(ordered[-1] / 1e6, 2),
        }


async def latency(
    bench: Bench, publishers: HttpPublishers, args: argparse.Namespace
) -> dict[str, Any]:
    """Publish at ``latency_rate / N`` events/s and record publish-to-receive latency."""
    await settle(bench.subscribers)
    recorder = LatencyRecorder(time.monotonic_ns())
    for client in bench.subscribers:
        client.on_message = recorder.on_message
    publish_rate = args.latency_rate / args.n
    count = max(1, round(publish_rate * args.latency_duration))
    first = bench.snapshot(publishers.accepted)
    late = await publish_at_rate(publishers, bench.pub_url, publish_rate, count)
    missing = await drain(lambda: len(recorder.samples), count * args.n)
    last = bench.snapshot(publishers.accepted)
    for client in bench.subscribers:
        client.on_message = None
    return {
        **window(first, last),
        "target_deliveries_per_s": args.latency_rate,
        "publish_rate": round(publish_rate, 2),
        "published": count,
        "late_publishes": late,
        "undelivered": missing,
        **recorder.summary(),
    }


async def publish_at_rate(publishers: HttpPublishers, url: Url, rate: float, count: int) -> int:
    """Send ``count`` stamped events at ``rate``/s; return how many went out late (>5 ms)."""
    late, start = 0, time.monotonic()
    for index in range(count):
        delay = start + index / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.005:
            late += 1
        if not await publishers.send(post_request(url, event_body(time.monotonic_ns()))):
            late += count - index
            break
    await publishers.wait_idle(10.0)
    return late


async def idle(bench: Bench, args: argparse.Namespace) -> None:
    """RSS per idle subscriber: server RSS after N more connections minus before, over N."""
    warm = await connect_subscribers(bench, args.warm)
    await asyncio.sleep(args.settle)
    before = rss_kb(bench.server_pids)
    started = time.monotonic()
    bench.subscribers = await connect_subscribers(bench, args.n)
    connect_s = time.monotonic() - started
    await asyncio.sleep(args.settle)
    after = rss_kb(bench.server_pids)
    bench.emit(
        "idle",
        n=args.n,
        connect_s=round(connect_s, 2),
        connects_per_s=round(args.n / connect_s, 1),
        rss_before_mb=round(before / 1024, 1),
        rss_after_mb=round(after / 1024, 1),
        kb_per_connection=round((after - before) / args.n, 2),
        still_open=sum(1 for c in bench.subscribers if c.is_open),
    )
    for client in warm:
        client.close()


async def ingest(bench: Bench, args: argparse.Namespace) -> None:
    """Events/s accepted by each publish path, with ``--subscribers`` counting subscribers
    on the published topic (deliveries/s is theirs together)."""
    publishers = HttpPublishers(bench.pub_url)
    await publishers.connect(bench.publishers)
    if args.subscribers:
        bench.subscribers = await connect_subscribers(bench, args.subscribers)
        await wait_until_registered(
            bench.subscribers, publishers, post_request(bench.pub_url, event_body())
        )
    paths = {"batch": bench.batch_url, "ndjson": bench.batch_url, "ws": bench.ws_pub_url,
             "tcp": bench.tcp_url}
    for kind in args.kind:
        if paths.get(kind, bench.pub_url) is None:
            bench.emit("ingest", kind=kind, subscribers=args.subscribers,
                       skipped="no URL for this publish path")
            continue
        await settle(bench.subscribers)
        result = await _ingest_kind(bench, publishers, kind, args)
        bench.emit("ingest", kind=kind, subscribers=args.subscribers, **result)
    publishers.close()


async def _ingest_kind(
    bench: Bench, publishers: HttpPublishers, kind: str, args: argparse.Namespace
) -> dict[str, Any]:
    seconds = args.warmup + args.duration
    if kind == "ws":
        assert bench.ws_pub_url is not None
        pool = WsPublishers(ws_publish_frame(bench.topic), args.window)
        await pool.connect(bench.ws_pub_url, bench.subprotocol, args.streams)
        result = await _ingest_window(bench, lambda: pool.accepted, pool.run_for(seconds), args)
        pool.close()
        return {**result, "batch_size": 1, "ws_errors": pool.errors}
    if kind == "tcp":
        assert bench.tcp_url is not None
        lines = LinePublishers(publish_line(bench.topic), args.window)
        await lines.connect(bench.tcp_url, args.streams)
        result = await _ingest_window(bench, lambda: lines.accepted, lines.run_for(seconds),
                                      args)
        lines.close()
        return {**result, "batch_size": 1, "line_errors": lines.errors}
    url = bench.pub_url if kind == "single" else bench.batch_url
    assert url is not None
    per_request = {"single": 1, "ndjson": args.ndjson_lines}.get(kind, args.batch_size)
    if kind == "single":
        request = post_request(url, event_body())
    elif kind == "ndjson":
        request = post_request(url, ndjson_body(bench.topic, per_request),
                               "application/x-ndjson")
    else:
        request = post_request(url, batch_body(bench.topic, per_request))
    if kind == "ndjson":  # long requests: as many connections as the streaming paths
        streaming = HttpPublishers(url)
        await streaming.connect(args.streams)
        running = streaming.run_for(request, seconds)
        result = await _ingest_window(bench, lambda: streaming.accepted * per_request, running,
                                      args)
        streaming.close()
        return {**result, "batch_size": per_request, "rejected": dict(streaming.rejected)}
    before = Counter(publishers.rejected)
    running = publishers.run_for(request, seconds)
    result = await _ingest_window(bench, lambda: publishers.accepted * per_request, running, args)
    return {**result, "batch_size": per_request, "rejected": dict(publishers.rejected - before)}


async def _ingest_window(
    bench: Bench, accepted: Callable[[], int], running: Awaitable[None], args: argparse.Namespace
) -> dict[str, Any]:
    """Measure accepted events/s over the steady part of one publishing run."""
    task = asyncio.ensure_future(running)
    await asyncio.sleep(args.warmup)
    first = bench.snapshot(accepted())
    await asyncio.sleep(args.duration)
    last = bench.snapshot(accepted())
    await task
    accepted_events = last.accepted - first.accepted
    events_per_s = accepted_events / (last.wall - first.wall)
    result = {**window(first, last), "events_per_s": round(events_per_s, 1)}
    if first.server_cpu is not None and last.server_cpu is not None and accepted_events:
        cpu = last.server_cpu - first.server_cpu
        result["server_cpu_us_per_event"] = round(cpu / accepted_events * 1e6, 2)
    return result


# -- command line -------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=sorted(PRESETS), default="squall")
    parser.add_argument("--label", help="name in the output (default: the target)")
    parser.add_argument("--port", type=int, default=8888)
    parser.add_argument("--tcp-port", type=int, default=0, help="the server's --tcp-port")
    parser.add_argument("--transport", choices=("ws", "sse", "tcp"),
                        help="the subscribers' transport (default: the target's)")
    parser.add_argument("--topic", default="bench")
    for name in ("sub-url", "pub-url", "batch-url", "ws-pub-url"):
        parser.add_argument(f"--{name}", help="template with {port} and {topic}")
    parser.add_argument("--subprotocol")
    parser.add_argument("--server-pid", type=int, action="append", default=[])
    parser.add_argument("--publishers", type=int, default=64)
    parser.add_argument("--connect-batch", type=int, default=100)
    modes = parser.add_subparsers(dest="mode", required=True)
    fan = modes.add_parser("fanout", help="max deliveries/s, then latency at a fixed rate")
    fan.add_argument("-n", type=int, required=True, help="subscribers")
    fan.add_argument("--repeat", type=int, default=3)
    fan.add_argument("--run-offset", type=int, default=0, help="numbers runs from offset + 1")
    fan.add_argument("--duration", type=float, default=5.0)
    fan.add_argument("--warmup", type=float, default=1.0)
    fan.add_argument(
        "--low-water",
        type=int,
        default=1,
        help="SO_RCVLOWAT of subscribers at max rate (a diagnostic: a few KiB makes the load"
        " generator much cheaper, but changes the server's cost too)",
    )
    fan.add_argument("--latency-rate", type=float, default=10000.0, help="0 skips latency")
    fan.add_argument("--latency-duration", type=float, default=8.0)
    idl = modes.add_parser("idle", help="server RSS per idle WebSocket connection")
    idl.add_argument("-n", type=int, required=True, help="connections")
    idl.add_argument("--warm", type=int, default=100)
    idl.add_argument("--settle", type=float, default=2.0)
    ing = modes.add_parser("ingest", help="publish events/s with one subscriber")
    ing.add_argument("--kind", nargs="+", choices=("single", "batch", "ws", "tcp", "ndjson"),
                     default=["single"])
    ing.add_argument("--subscribers", type=int, default=1,
                     help="subscribers of the published topic (0: none)")
    ing.add_argument("--streams", type=int, default=16,
                     help="WebSocket or TCP publisher connections")
    ing.add_argument("--ndjson-lines", type=int, default=500,
                     help="events per streaming batch request")
    ing.add_argument("--duration", type=float, default=4.0)
    ing.add_argument("--warmup", type=float, default=1.0)
    ing.add_argument("--batch-size", type=int, default=100)
    ing.add_argument("--window", type=int, default=32, help="unanswered WebSocket publishes")
    return parser.parse_args(argv)


def make_bench(args: argparse.Namespace) -> Bench:
    preset = PRESETS[args.target]

    def url(name: str) -> Url | None:
        template = getattr(args, name) or preset[name]
        if not template:
            return None
        return Url.parse(template.format(port=args.port, tcp_port=args.tcp_port, topic=args.topic))

    sub_url, pub_url = url("sub_url"), url("pub_url")
    assert sub_url is not None and pub_url is not None
    return Bench(
        label=args.label or args.target,
        topic=args.topic,
        sub_url=sub_url,
        pub_url=pub_url,
        batch_url=url("batch_url"),
        ws_pub_url=url("ws_pub_url"),
        tcp_url=Url.parse(f"tcp://127.0.0.1:{args.tcp_port}") if args.tcp_port else None,
        subprotocol=preset["subprotocol"] if args.subprotocol is None else args.subprotocol,
        server_pids=args.server_pid,
        publishers=args.publishers,
        connect_batch=args.connect_batch,
        transport=args.transport or TRANSPORTS.get(args.target, "ws"),
    )


async def run(args: argparse.Namespace) -> None:
    bench = make_bench(args)
    modes = {"fanout": fanout, "idle": idle, "ingest": ingest}
    try:
        await modes[args.mode](bench, args)
    finally:
        bench.close()
        await asyncio.sleep(0.1)  # let the close frames and FINs go out


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed (the results say which loop ran)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one mode and print its JSON lines; exit status 1 on failure."""
    args = parse_args(argv)
    if getattr(args, "n", 0) > MAX_CONNECTIONS:
        print(f"at most {MAX_CONNECTIONS} connections fit the open-file limit", file=sys.stderr)
        return 2
    try:
        run_loop(run(args))
    except (OSError, TimeoutError) as exc:
        print(json.dumps({"target": args.label or args.target, "error": repr(exc)}), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
