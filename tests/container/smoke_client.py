"""Client side of the container smoke test (scripts/container/smoke.sh).

Talks to a running Squall container through its published port, using only the
standard library and the ``websockets`` package (>= 13).

    python smoke_client.py health BASE_URL        # GET /healthz == 200 {"status": "ok"}
    python smoke_client.py ready BASE_URL         # GET /readyz == 200
    python smoke_client.py roundtrip BASE_URL     # publish over HTTP, receive over WebSocket
    python smoke_client.py hold BASE_URL SECONDS  # subscribe, print READY, expect close 1001

Each command prints one line and exits 0 on success, 1 on failure.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.typing import Subprotocol

SUBPROTOCOL = Subprotocol("squall.v1.json")
TIMEOUT = 5.0
# Never send loopback traffic through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class CheckError(Exception):
    pass


def http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with _OPENER.open(req, timeout=TIMEOUT) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def ws_url(base: str, topic: str) -> str:
    return base.replace("http://", "ws://", 1).rstrip("/") + f"/v1/ws?topic={topic}"


async def recv_json(ws: Any) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), TIMEOUT)
    frame = json.loads(raw)
    if not isinstance(frame, dict):
        raise CheckError(f"frame is not a JSON object: {raw!r}")
    return frame


async def subscribe(base: str, topic: str) -> Any:
    ws = await connect(ws_url(base, topic), subprotocols=[SUBPROTOCOL], open_timeout=TIMEOUT)
    if ws.subprotocol != SUBPROTOCOL:
        raise CheckError(f"server chose subprotocol {ws.subprotocol!r}, want {SUBPROTOCOL!r}")
    frame = await recv_json(ws)
    if frame.get("type") != "subscribed" or frame.get("topic") != topic:
        raise CheckError(f"first frame is not 'subscribed' to {topic!r}: {frame}")
    return ws


def cmd_health(base: str) -> str:
    status, body = http("GET", base + "/healthz")
    if status != 200 or body != {"status": "ok"}:
        raise CheckError(f"GET /healthz -> {status} {body!r}")
    return "GET /healthz -> 200 {'status': 'ok'}"


def cmd_ready(base: str) -> str:
    status, body = http("GET", base + "/readyz")
    if status != 200:
        raise CheckError(f"GET /readyz -> {status} {body!r}")
    return "GET /readyz -> 200"


async def cmd_roundtrip(base: str) -> str:
    topic = f"smoke.{uuid.uuid4().hex[:12]}"
    payload = {"nonce": uuid.uuid4().hex, "n": [1, 2.5, None, True], "text": "héllo"}
    ws = await subscribe(base, topic)
    try:
        started = time.monotonic()
        status, body = await asyncio.to_thread(
            http, "POST", f"{base}/v1/topics/{topic}/events", payload
        )
        if status != 202 or not isinstance(body, dict):
            raise CheckError(f"POST /v1/topics/{topic}/events -> {status} {body!r}")
        if body.get("topic") != topic or not isinstance(body.get("id"), str):
            raise CheckError(f"publish answer lacks topic/id: {body}")
        while True:
            frame = await recv_json(ws)
            if frame.get("type") == "event":
                break
        elapsed_ms = (time.monotonic() - started) * 1000
        want = {"type": "event", "topic": topic, "id": body["id"], "data": payload}
        got = {k: frame.get(k) for k in want}
        if got != want:
            raise CheckError(f"event frame {frame} does not match {want}")
        if not isinstance(frame.get("ts"), int):
            raise CheckError(f"event ts is not an integer (ms): {frame}")
    finally:
        await ws.close()
    return f"published {body['id']} on {topic}; subscriber got it in {elapsed_ms:.0f} ms"


async def cmd_hold(base: str, seconds: float) -> str:
    ws = await subscribe(base, "smoke.shutdown")
    print("READY", flush=True)
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await asyncio.wait_for(ws.recv(), deadline - time.monotonic())
    except ConnectionClosed:
        pass
    except TimeoutError as err:
        raise CheckError(f"connection still open after {seconds:.0f} s") from err
    code = ws.close_code
    if code != 1001:
        raise CheckError(f"WebSocket closed with {code} ({ws.close_reason!r}), want 1001")
    return f"WebSocket closed with 1001 ({ws.close_reason!r})"


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, base = argv[0], argv[1].rstrip("/")
    try:
        if cmd == "health":
            msg = cmd_health(base)
        elif cmd == "ready":
            msg = cmd_ready(base)
        elif cmd == "roundtrip":
            msg = asyncio.run(cmd_roundtrip(base))
        elif cmd == "hold":
            msg = asyncio.run(cmd_hold(base, float(argv[2]) if len(argv) > 2 else 15.0))
        else:
            print(f"unknown command {cmd!r}", file=sys.stderr)
            return 2
    except (CheckError, OSError, TimeoutError, WebSocketException, ValueError) as err:
        print(f"{type(err).__name__}: {err}")
        return 1
    print(msg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
