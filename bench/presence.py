"""Presence on Redis, measured: two Squall nodes on one redis-server, real WebSocket clients.

    .venv/bin/python bench/presence.py [--members 10000] [--storm 5000] [--storm-frames 1000]

What it measures, each against a reference taken in the same run:

- **query**: ``GET /v1/topics/{topic}/presence`` with ``--members`` subscribers of one
  topic spread over the two nodes (an answer of 1000 entries, ``truncated``); median
  and p99 of ``--queries`` sequential requests, against ``GET /healthz`` on the same
  connection (the HTTP floor) and the presence script alone, called from here.
- **memory**: Redis ``used_memory`` with the members present minus after they left,
  per member (each with a token whose ``squall.info`` is about 30 bytes).
- **join/leave latency**: a watcher on node a, a client on node b that subscribes and
  unsubscribes ``--rounds`` times (a presence topic): from the ``subscribe`` frame
  sent to the ``join`` frame received, and from ``unsubscribe`` to ``leave``; against
  an event published over the same connection, sent to received.
- **reconnect storm**: ``--storm`` clients of one topic on node a drop at once and
  reconnect at once: time until every one has its ``subscribed`` reply and the
  presence count is back, node a's peak RSS (``VmHWM``, reset before), and the Redis
  commands of the storm (``INFO commandstats``: the script calls the nodes made, and
  every command those scripts ran). Then ``--storm-frames`` clients of a presence
  topic, where every reconnecting client also gets the joins of those after it.

Node a runs on core 0, node b and redis-server on core 1 (``--no-pin``: anywhere);
this process runs where the kernel puts it. Writes ``bench/results/presence.json``
and prints a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import jwt
import redis
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rawproto import Url, WebSocketClient, encode_client_frame, open_websocket
from servers import (
    BENCH_DIR,
    HOST,
    Server,
    ServerError,
    find_redis_server,
    free_port,
    pinned,
    start_squall,
)

from server.broker.redis_presence import SINGLE_WIRE
from server.broker.redis_presence_lua import LIST, LIVE
from tests.waiting import eventually

API_KEY = "bench-api-key-0123456789abcdef"
SECRET = "bench-jwt-secret-0123456789abcdef0123456789"
CONNECT_AT_ONCE = 500  # handshakes under way at a time
WAIT = 120.0


def member_token() -> str:
    return jwt.encode({"sub": "member", "exp": int(time.time()) + 7200,
                       "squall": {"subscribe": [">"], "publish": [">"],
                                  "info": {"name": "Member", "tier": "gold"}}},
                      SECRET, algorithm="HS256")


class Member:
    """One WebSocket client subscribed to one topic (``?topic=``), listening from its
    first byte (its ``subscribed`` may come right after the handshake)."""

    def __init__(self, url: Url, on_frame: Callable[[bytes, int], None] | None) -> None:
        self.client = WebSocketClient(url)
        self.subscribed = asyncio.get_running_loop().create_future()
        self.on_frame = on_frame
        self.client.on_message = self._message

    @classmethod
    async def join(cls, url: Url, on_frame: Callable[[bytes, int], None] | None) -> Member:
        loop = asyncio.get_running_loop()
        member = cls(url, on_frame)
        await asyncio.wait_for(loop.create_connection(lambda: member.client, url.host,
                                                      url.port), WAIT)
        await asyncio.wait_for(asyncio.shield(member.client.opened), WAIT)
        return member

    def _message(self, payload: bytes, now: int) -> None:
        if not self.subscribed.done() and payload.startswith(b'{"type":"subscribed"'):
            self.subscribed.set_result(now)
        elif self.on_frame is not None:
            self.on_frame(payload, now)


async def connect_members(port: int, topic: str, count: int, token: str,
                          on_frame: Callable[[bytes, int], None] | None = None,
                          ) -> list[Member]:
    """``count`` members of ``topic`` on the node at ``port``, each subscribed."""
    url = Url(HOST, port, f"/v1/ws?topic={topic}&token={token}")
    members: list[Member] = []
    for start in range(0, count, CONNECT_AT_ONCE):
        members += await asyncio.gather(*(Member.join(url, on_frame) for _ in range(
            min(CONNECT_AT_ONCE, count - start))))
    await asyncio.wait_for(asyncio.gather(*(m.subscribed for m in members)), WAIT)
    return members


async def close_members(members: Sequence[Member]) -> None:
    for member in members:
        member.client.close()
    await asyncio.gather(*(m.client.closed for m in members))


class Http:
    """One keep-alive HTTP connection to a node (blocking: the clients are idle meanwhile)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connection = http.client.HTTPConnection(HOST, port, timeout=30)

    def get(self, path: str) -> tuple[float, Any]:
        try:
            return self._get(path)
        except (http.client.RemoteDisconnected, ConnectionError):  # idle past header_timeout
            self.connection.close()
            self.connection = http.client.HTTPConnection(HOST, self.port, timeout=30)
            return self._get(path)

    def _get(self, path: str) -> tuple[float, Any]:
        started = time.perf_counter()
        self.connection.request("GET", path, headers={"Authorization": f"Bearer {API_KEY}"})
        response = self.connection.getresponse()
        body = response.read()
        took = time.perf_counter() - started
        assert response.status == 200, body[:200]
        return took, json.loads(body)

    def count(self, topic: str) -> int:
        return int(self.get(f"/v1/topics/{topic}/presence")[1]["count"])

    def metric(self, name: str) -> float:
        self.connection.request("GET", "/metrics")
        text = self.connection.getresponse().read().decode()
        return next(float(line.split()[1]) for line in text.splitlines()
                    if line.startswith(name + " "))


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


# -- the measurements -----------------------------------------------------------------------


async def measure_query(nodes: Sequence[Server], admin: redis.Redis, members: int,
                        queries: int) -> dict[str, Any]:
    token = member_token()
    before = int(admin.info("memory")["used_memory"])
    started = time.perf_counter()
    clients = []
    for node in nodes:
        clients += await connect_members(node.port, "bench.query", members // len(nodes), token)
    connected = time.perf_counter() - started
    http = Http(nodes[0].port)
    await eventually(lambda: http.count("bench.query") == len(clients), WAIT,
                     what="every member present")
    present = int(admin.info("memory")["used_memory"])
    took = [http.get("/v1/topics/bench.query/presence")[0] for _ in range(queries)]
    _, answer = http.get("/v1/topics/bench.query/presence")
    floor = [http.get("/healthz")[0] for _ in range(queries)]
    live, listing = admin.register_script(LIVE), admin.register_script(LIST)
    base = SINGLE_WIRE.name_keys("bench.query")
    alone = []
    for _ in range(queries):
        at = time.perf_counter()
        listing(keys=[base + "node:" + node.decode() for node in live(keys=[base + "nodes"])],
                args=[1000])
        alone.append(time.perf_counter() - at)
    await close_members(clients)
    await eventually(lambda: http.count("bench.query") == 0, WAIT, what="every member gone")
    after = int(admin.info("memory")["used_memory"])
    return {
        "members": len(clients), "connect_s": round(connected, 2),
        "answer": {"count": answer["count"], "entries": len(answer["clients"]),
                   "truncated": answer["truncated"],
                   "entry_json_bytes": len(json.dumps(answer["clients"][0],
                                                      separators=(",", ":")))},
        "query_ms": {"p50": ms(statistics.median(took)), "p90": ms(percentile(took, 0.9)),
                     "p99": ms(percentile(took, 0.99)), "first": ms(took[0])},
        "healthz_ms": {"p50": ms(statistics.median(floor))},
        "script_alone_ms": {"p50": ms(statistics.median(alone))},
        "redis_bytes_per_member": round((present - after) / len(clients), 1),
        "redis_used_memory": {"before": before, "present": present, "after": after},
    }


async def measure_latency(nodes: Sequence[Server], rounds: int) -> dict[str, Any]:
    token = member_token()
    arrived: dict[str, asyncio.Future[int]] = {}

    def on_frame(payload: bytes, now: int) -> None:
        kind = json.loads(payload)["type"]
        waiter = arrived.pop(kind, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(now)

    [watcher] = await connect_members(nodes[0].port, "room.lat", 1, token, on_frame)
    url = Url(HOST, nodes[1].port, f"/v1/ws?token={token}")
    mover = await open_websocket(url)
    loop = asyncio.get_running_loop()
    times: dict[str, list[float]] = {"join": [], "leave": [], "event": []}
    frames = {"join": {"type": "subscribe", "topic": "room.lat"},
              "leave": {"type": "unsubscribe", "topic": "room.lat"},
              "event": {"type": "publish", "topic": "room.lat", "data": "x"}}
    try:
        for _ in range(rounds):
            for kind in ("join", "event", "leave"):
                waiter = arrived[kind] = loop.create_future()
                sent = time.monotonic_ns()
                mover.send_frame(encode_client_frame(json.dumps(frames[kind]).encode()))
                received = await asyncio.wait_for(waiter, 10)
                times[kind].append((received - sent) / 1e9)
                await asyncio.sleep(0.005)
    finally:
        mover.close()
        watcher.client.close()
    return {kind: {"p50": ms(statistics.median(values)), "p99": ms(percentile(values, 0.99)),
                   "max": ms(max(values))} for kind, values in times.items()} | {
        "rounds": rounds}


def peak_rss_reset(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def rss(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def command_calls(admin: redis.Redis) -> dict[str, int]:
    stats = admin.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


async def measure_storm(node: Server, admin: redis.Redis, count: int, topic: str,
                        ) -> dict[str, Any]:
    token = member_token()
    frames = [0]

    def counted(payload: bytes, now: int) -> None:
        frames[0] += 1

    http = Http(node.port)
    started = time.perf_counter()
    members = await connect_members(node.port, topic, count, token, counted)
    first = time.perf_counter() - started
    await eventually(lambda: http.count(topic) == count, WAIT, what="the first members present")
    pid = node.pids[0]
    peak_rss_reset(pid)
    resting = rss(pid, "VmRSS")
    writes = http.metric("squall_presence_writes_total")
    admin.config_resetstat()
    frames[0] = 0
    started = time.perf_counter()
    for member in members:
        member.client.close()
    again = await connect_members(node.port, topic, count, token, counted)
    subscribed = time.perf_counter() - started
    await eventually(lambda: http.count(topic) == count, WAIT, what="the members present again")
    present = time.perf_counter() - started
    calls = command_calls(admin)
    writes = http.metric("squall_presence_writes_total") - writes
    peak = rss(pid, "VmHWM")
    await close_members(again)
    await eventually(lambda: http.count(topic) == 0, WAIT, what="the members gone")
    scripts = calls.get("evalsha", 0) + calls.get("eval", 0)
    inner = {name: n for name, n in calls.items()
             if name not in ("evalsha", "eval", "info", "config|resetstat")}
    return {"members": count, "topic": topic, "first_connect_s": round(first, 2),
            "all_subscribed_s": round(subscribed, 2),
            "presence_back_s": round(present, 2), "rss_before_mb": round(resting / 2**20, 1),
            "peak_rss_mb": round(peak / 2**20, 1), "script_calls": scripts,
            "presence_batches": int(writes),
            "commands_in_scripts": sum(inner.values()), "frames_received": frames[0],
            "commands": dict(sorted(inner.items(), key=lambda item: -item[1])[:12])}


# -- running it -----------------------------------------------------------------------------


def start_redis(cpu: int | None, log_dir: Path) -> tuple[Any, int]:
    import subprocess

    binary = find_redis_server()
    if binary is None:
        raise ServerError("no redis-server")
    port = free_port()
    with (log_dir / "redis.log").open("wb") as log:
        process = subprocess.Popen(pinned([binary, "--port", str(port), "--bind", HOST,
                                           "--save", "", "--appendonly", "no"], cpu),
                                   stdout=log, stderr=subprocess.STDOUT)
    admin = redis.Redis(host=HOST, port=port)
    for _ in range(100):
        try:
            admin.ping()
            return process, port
        except redis.ConnectionError:
            time.sleep(0.05)
    process.kill()
    raise ServerError("redis-server did not answer")


async def run(options: argparse.Namespace, nodes: list[Server], admin: redis.Redis,
              ) -> dict[str, Any]:
    results: dict[str, Any] = {}
    steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = []
    if options.members:
        steps.append(("query", lambda: measure_query(nodes, admin, options.members,
                                                     options.queries)))
    if options.rounds:
        steps.append(("latency", lambda: measure_latency(nodes, options.rounds)))
    if options.storm:
        steps.append(("storm", lambda: measure_storm(nodes[0], admin, options.storm,
                                                     "bench.storm")))
    if options.storm_frames:
        steps.append(("storm_frames", lambda: measure_storm(
            nodes[0], admin, options.storm_frames, "room.storm")))
    for name, step in steps:
        print(f"measuring {name} ...", flush=True)
        results[name] = await step()
        print(json.dumps(results[name]), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--members", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--storm", type=int, default=5000)
    parser.add_argument("--storm-frames", type=int, default=1000)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--out", default=str(BENCH_DIR / "results" / "presence.json"))
    options = parser.parse_args(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    log_dir = Path(tempfile.mkdtemp(prefix="bench-presence-"))
    cpus = (None, None, None) if options.no_pin else (0, 1, 1)
    redis_process, redis_port = start_redis(cpus[2], log_dir)
    flags = ["--broker", f"redis://{HOST}:{redis_port}/0", "--presence-topics", "room.>",
             "--api-keys", API_KEY, "--jwt-secret", SECRET, "--ping-interval", "0",
             "--max-connections", "0"]
    nodes: list[Server] = []
    try:
        for index, name in enumerate(("a", "b")):
            nodes.append(start_squall(cpus[index], log_dir, [*flags, "--node-name", name],
                                      name=f"squall-{name}"))
        admin = redis.Redis(host=HOST, port=redis_port)
        results = uvloop.run(run(options, nodes, admin))
    finally:
        for node in nodes:
            node.stop()
        redis_process.terminate()
        redis_process.wait(10)
    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}; server logs in {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
