"""The Python client against raw references, measured in the same run.

- Publishing: events/s of ``squall_client.Publisher.publish`` against raw keep-alive
  ``http.client`` POSTs from the same process (one request in flight, the same body
  and headers, Idempotency-Key included, so the server does the same work for both),
  with urllib3 and httpx's sync client for comparison; then ``publish_many`` against
  raw batch POSTs. Target: Publisher / raw >= 0.90.
- Subscribing: events/s one ``Subscriber`` connection receives, through the
  iterator, against a bare ``websockets`` loop that only decodes each frame. The
  server replays a retained history (``since``), which it sends faster than it can
  ingest new events, so the client is what is measured. Target: >= 50,000 events/s.

The server runs pinned to core 0 and this process to core 1 (unless ``--no-pin``).
Publishers take turns of 100 requests; the target is checked on the median of the
per-turn ratios (each turn against the reference's turn beside it), which a busy
neighbour on the machine disturbs least. Subscribers take turns by round.

    .venv/bin/python bench/client.py                 # about a minute
    .venv/bin/python bench/client.py --rounds 3 --requests 1000 --events 50000
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.servers import HOST, start_squall
from squall_client import Publisher, Subscriber


class Contender(Protocol):
    def __call__(self, count: int) -> None: ...

    def close(self) -> None: ...


BODY = {"order": 42, "status": "paid", "customer": "c-1234", "note": "x" * 40}
TOPIC = "bench.publish"
REPLAY_TOPIC = "bench.replay"
PUBLISHER_TARGET = 0.90
SUBSCRIBER_TARGET = 50_000


# -- publishing --------------------------------------------------------------------------
# Each contender publishes ``count`` events when called, on a connection it keeps open
# between calls; ``close`` releases it.

class RawPosts:
    """Keep-alive ``http.client``: the floor any HTTP client adds to."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection(HOST, port)
        self.path = f"/v1/topics/{TOPIC}/events"
        self.body = json.dumps(BODY).encode()

    def __call__(self, count: int) -> None:
        connection = self.connection
        for _ in range(count):
            headers = {"Content-Type": "application/json", "Accept": "application/json",
                       "Idempotency-Key": os.urandom(16).hex()}
            connection.request("POST", self.path, self.body, headers)
            response = connection.getresponse()
            json.loads(response.read())
            assert response.status == 202, response.status

    def close(self) -> None:
        self.connection.close()


class PublisherPosts:
    def __init__(self, port: int) -> None:
        self.publisher = Publisher(f"http://{HOST}:{port}")

    def __call__(self, count: int) -> None:
        publish = self.publisher.publish
        for _ in range(count):
            publish(TOPIC, BODY)

    def close(self) -> None:
        self.publisher.close()


class Urllib3Posts:
    def __init__(self, port: int) -> None:
        import urllib3

        self.pool = urllib3.HTTPConnectionPool(HOST, port, maxsize=1)
        self.body = json.dumps(BODY).encode()

    def __call__(self, count: int) -> None:
        for _ in range(count):
            headers = {"Content-Type": "application/json", "Accept": "application/json",
                       "Idempotency-Key": os.urandom(16).hex()}
            response = self.pool.urlopen("POST", f"/v1/topics/{TOPIC}/events", body=self.body,
                                         headers=headers)
            json.loads(response.data)

    def close(self) -> None:
        self.pool.close()


class HttpxPosts:
    def __init__(self, port: int) -> None:
        import httpx

        self.client = httpx.Client(base_url=f"http://{HOST}:{port}")
        self.body = json.dumps(BODY).encode()

    def __call__(self, count: int) -> None:
        for _ in range(count):
            headers = {"Content-Type": "application/json",
                       "Idempotency-Key": os.urandom(16).hex()}
            self.client.post(f"/v1/topics/{TOPIC}/events", content=self.body,
                             headers=headers).json()

    def close(self) -> None:
        self.client.close()


BATCH = 100


class RawBatches(RawPosts):
    """Raw batch POSTs of ``BATCH`` events (the body built per request, keys included)."""

    def __call__(self, count: int) -> None:
        connection = self.connection
        for _ in range(count // BATCH):
            body = json.dumps({"events": [
                {"topic": TOPIC, "data": BODY, "idempotency_key": os.urandom(16).hex()}
                for _ in range(BATCH)]}).encode()
            connection.request("POST", "/v1/events", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            json.loads(response.read())
            assert response.status == 202, response.status


class PublisherBatches(PublisherPosts):
    def __call__(self, count: int) -> None:
        for _ in range(count // BATCH):
            self.publisher.publish_many([(TOPIC, BODY)] * BATCH)


def interleaved(contenders: dict[str, Contender], chunks: int,
                chunk: int) -> dict[str, list[float]]:
    """Seconds each contender took for each of ``chunks`` turns of ``chunk`` events.

    They take turns (the order rotating), so that all of them see the same machine:
    it is shared, and its speed drifts within seconds.
    """
    spent: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for contender in contenders.values():
        contender(chunk)  # warm up: connect, fill caches
    for index in range(chunks):
        for name in names[index % len(names):] + names[:index % len(names)]:
            started = time.perf_counter()
            contenders[name](chunk)
            spent[name].append(time.perf_counter() - started)
    return spent


# -- subscribing -------------------------------------------------------------------------

def fill_history(port: int, count: int) -> str:
    """Retain ``count`` events on REPLAY_TOPIC; the id to replay them from."""
    with Publisher(f"http://{HOST}:{port}", max_batch_events=1000) as publisher:
        first = publisher.publish(REPLAY_TOPIC, {"first": True})
        for start in range(0, count, 10_000):
            size = min(10_000, count - start)
            publisher.publish_many([(REPLAY_TOPIC, {**BODY, "n": n})
                                    for n in range(start, start + size)])
    return first.id


async def raw_websocket(port: int, since: str, count: int) -> float:
    from websockets.asyncio.client import connect
    from websockets.typing import Subprotocol

    started = time.perf_counter()
    async with connect(f"ws://{HOST}:{port}/v1/ws", compression=None,
                       subprotocols=[Subprotocol("squall.v1.json")]) as socket:
        await socket.send(json.dumps({"type": "subscribe", "topic": REPLAY_TOPIC,
                                      "since": since}))
        received = 0
        while received < count:
            frame = json.loads(await socket.recv())
            if frame["type"] == "event":
                received += 1
    return count / (time.perf_counter() - started)


async def subscriber(port: int, since: str, count: int, msgpack: bool = False) -> float:
    started = time.perf_counter()
    async with Subscriber(f"ws://{HOST}:{port}", msgpack=msgpack, buffer_size=count + 10,
                          replay_size=count + 10) as sub:
        await sub.subscribe(REPLAY_TOPIC, since=since)
        received = 0
        async for _item in sub:
            received += 1
            if received == count:
                break
        assert sub.overflows == 0
    return count / (time.perf_counter() - started)


# -- the run -----------------------------------------------------------------------------

@dataclass
class Publishing:
    """Events/s of each contender per round, and, per turn, its speed relative to the
    reference's turn beside it (the median of those is the least disturbed ratio)."""

    rates: dict[str, list[float]]
    turn_ratios: dict[str, list[float]]


def publishing(port: int, makers: dict[str, Callable[[int], Contender]], reference: str,
               rounds: int, chunks: int, chunk: int) -> Publishing:
    result = Publishing({name: [] for name in makers}, {name: [] for name in makers})
    for _ in range(rounds):
        contenders = {name: make(port) for name, make in makers.items()}
        try:
            spent = interleaved(contenders, chunks, chunk)
        finally:
            for contender in contenders.values():
                contender.close()
        for name, seconds in spent.items():
            result.rates[name].append(chunks * chunk / sum(seconds))
            result.turn_ratios[name] += [ref / mine for mine, ref in
                                         zip(seconds, spent[reference], strict=True)]
    return result


def receiving(scenarios: dict[str, Callable[[], Awaitable[float]]],
              rounds: int) -> dict[str, list[float]]:
    """Events/s per round of each scenario, the order rotating between rounds."""
    results: dict[str, list[float]] = {name: [] for name in scenarios}
    names = list(scenarios)
    for index in range(rounds):
        for name in names[index % len(names):] + names[:index % len(names)]:
            results[name].append(asyncio.run(scenarios[name]()))
    return results


def table(title: str, results: dict[str, list[float]], reference: str,
          turn_ratios: dict[str, list[float]] | None = None) -> list[str]:
    """Medians, every round, each contender's ratio to ``reference`` per round and,
    for interleaved runs, the median of its per-turn ratios."""
    header = f"| client | events/s (median) | per round | vs {reference}, per round |"
    rule = "|---|---|---|---|"
    if turn_ratios is not None:
        header, rule = header + " vs it, turn by turn (median) |", rule + "---|"
    lines = [f"### {title}", "", header, rule]
    base = results[reference]
    for name, values in results.items():
        ratios = [value / ref for value, ref in zip(values, base, strict=True)]
        row = (f"| {name} | {statistics.median(values):,.0f} | "
               f"{', '.join(f'{value:,.0f}' for value in values)} | "
               f"{', '.join(f'{ratio:.2f}' for ratio in ratios)} "
               f"(median {statistics.median(ratios):.2f}x) |")
        if turn_ratios is not None:
            row += f" **{statistics.median(turn_ratios[name]):.2f}x** |"
        lines.append(row)
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000,
                        help="single POSTs per contender per round")
    parser.add_argument("--events", type=int, default=100_000,
                        help="events replayed to each subscriber per round")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to cores 0 and 1")
    options = parser.parse_args(argv)
    server_cpu = None if options.no_pin else 0
    if not options.no_pin and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {1})
    history = ["--history-size", str(options.events + 10), "--history-ttl", "0",
               "--history-max-bytes", str(2 * 1024**3), "--max-replay-events",
               str(options.events + 10), "--access-log", "false"]
    with tempfile.TemporaryDirectory() as logs:
        server = start_squall(server_cpu, Path(logs), history)
        try:
            report = measure(server.port, options)
        finally:
            server.stop()
    print("\n".join(report))
    return 0


def measure(port: int, options: argparse.Namespace) -> list[str]:
    single: dict[str, Callable[[int], Contender]] = {
        "raw http.client": RawPosts, "squall_client.Publisher": PublisherPosts}
    for module, name, make in (("urllib3", "urllib3", Urllib3Posts),
                               ("httpx", "httpx (sync)", HttpxPosts)):
        try:
            __import__(module)
        except ImportError:
            continue
        single[name] = make
    chunk = 100
    chunks = max(1, options.requests // chunk)
    singles = publishing(port, single, "raw http.client", options.rounds, chunks, chunk)
    batches = publishing(port, {"raw http.client": RawBatches,
                                "Publisher.publish_many": PublisherBatches},
                         "raw http.client", options.rounds, chunks, 10 * BATCH)
    events = options.events
    since = fill_history(port, events)
    received = receiving({
        "raw websockets + json.loads": lambda: raw_websocket(port, since, events),
        "squall_client.Subscriber": lambda: subscriber(port, since, events),
        "Subscriber, msgpack": lambda: subscriber(port, since, events, msgpack=True),
    }, options.rounds)
    publisher_ratio = statistics.median(singles.turn_ratios["squall_client.Publisher"])
    rate = statistics.median(received["squall_client.Subscriber"])
    verdict = [
        f"Publisher / raw http.client: {publisher_ratio:.2f}x (target {PUBLISHER_TARGET:.2f}x): "
        + ("met" if publisher_ratio >= PUBLISHER_TARGET else "MISSED"),
        f"Subscriber: {rate:,.0f} events/s on one connection (target {SUBSCRIBER_TARGET:,}): "
        + ("met" if rate >= SUBSCRIBER_TARGET else "MISSED"),
    ]
    return [*table(f"Single publishes ({chunks * chunk} per contender per round, one in "
                   f"flight, taking turns {chunk} at a time)", singles.rates,
                   "raw http.client", singles.turn_ratios),
            *table(f"Batches of {BATCH} events ({chunks * 10} per contender per round, "
                   "taking turns 10 at a time)", batches.rates, "raw http.client",
                   batches.turn_ratios),
            *table(f"Receiving a replay of {events:,} events on one connection", received,
                   "raw websockets + json.loads"),
            *verdict]


if __name__ == "__main__":
    sys.exit(main())
