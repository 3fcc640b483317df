"""A seeded generator of hostile inputs for every surface a client reaches, and the
checks that every answer keeps the protocol's promises.

HTTP cases are whole requests on raw sockets: methods, paths, query strings, headers
and bodies drawn from what fuzzers and attackers send (percent-encoded NULs and
non-ASCII digits, deep and huge values, non-finite numbers, broken msgpack, bad
``Content-Length`` and chunked encodings, malformed request lines). WebSocket cases
are frames on both subprotocols: random text and bytes, commands with random fields,
frames over the size limit, the wrong frame kind for the subprotocol.

The promises checked: no 5xx, every error a JSON ``{"error": {"code", "message"}}``,
every request answered (never a connection dropped without a response), every
WebSocket either answering each frame or closing with a protocol close code (never
without one), a bystander subscriber that keeps receiving, and no traceback or error
line in the server's log. The same seed gives the same cases.
"""

from __future__ import annotations

import asyncio
import json
import random
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgpack
import websockets

TIMEOUT = 10.0
ALLOWED_CLOSES = {1000, 1002, 1007, 1009, 4000, 4029}

_SEGMENT = string.ascii_letters + string.digits + "_-:@"
_ODD = ["%00", "%FF", "%C2%B2", "%E2%91%A0", "%2F", "..", "%", "%zz", "\u00e9", "*", ">",
        " ", "%0d%0a", "\\", "'", '"', "<script>"]


def topic(rng: random.Random) -> str:
    """A topic or pattern, valid or not, as it would appear in a path or a frame."""
    kind = rng.random()
    if kind < 0.4:
        return ".".join("".join(rng.choice(_SEGMENT) for _ in range(rng.randint(1, 8)))
                        for _ in range(rng.randint(1, 4)))
    if kind < 0.55:
        return rng.choice(["a.*", "a.>", "*", ">", "a..b", ".a", "a.", "a.>.b", "", "fz.calm"])
    if kind < 0.65:
        return "a" * rng.choice([255, 256, 1000])
    return "".join(rng.choice([*_ODD, *_SEGMENT]) for _ in range(rng.randint(1, 12)))


def value(rng: random.Random, depth: int = 0) -> Any:
    """A JSON-ish value: sometimes deep, huge, or out of any codec's range."""
    kind = rng.random()
    if depth > 3 or kind < 0.35:
        return rng.choice([None, True, False, 0, -1, 2**63 - 1, 2**64, -(2**70), 1.5, 1e308,
                           "", "x" * rng.randint(0, 50), "\u00e9\u4e2d", "\U0001f600"])
    if kind < 0.45:
        return _deep(rng.choice([63, 64, 65, 100, 400]))
    if kind < 0.7:
        return [value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["a", "data", "", "topic", "\u00e9"]) + str(i): value(rng, depth + 1)
            for i in range(rng.randint(0, 4))}


def _deep(levels: int) -> Any:
    nested: Any = 1
    for _ in range(levels):
        nested = [nested]
    return nested


def json_text(rng: random.Random) -> bytes:
    """JSON, or text that is almost JSON."""
    kind = rng.random()
    if kind < 0.6:
        return json.dumps(value(rng)).encode()
    return rng.choice([b"", b"{", b"1e999", b"[1e400]", b"NaN", b"-Infinity", b"\xff\xfe",
                       b'"\\ud800"', b"[" * 5000, b'{"a": 1,}', b"null", b"\x00",
                       json.dumps({"events": [{"topic": topic(rng), "data": value(rng)}
                                              for _ in range(rng.randint(0, 3))]}).encode(),
                       json.dumps({"events": "x"}).encode()])


def msgpack_bytes(rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        try:
            return msgpack.packb(value(rng), use_bin_type=rng.random() < 0.5)
        except (ValueError, OverflowError):
            return b"\xc1"
    return rng.choice([b"\xc1", b"\xd9\xff", b"\x92\x01", b"\xcb\x7f\xf0\0\0\0\0\0\0",
                       b"\xc7\x01\x05\x00", bytes(rng.randrange(256) for _ in range(20)),
                       msgpack.packb(float("nan")), msgpack.packb({"events": [
                           {"topic": topic(rng), "data": b"\x00\x01"}]})])


def query(rng: random.Random) -> str:
    pairs = []
    for _ in range(rng.randint(0, 3)):
        name = rng.choice(["since", "limit", "token", "topic", "api_key", "x", "%FF", ""])
        raw = rng.choice(["1", "-1", "0", "10001", "\u00b2", "%C2%B2", "%E2%91%A0", "%FF",
                          "a-1", "zzzz-99", "99999999999999999999999", topic(rng), ""])
        pairs.append(f"{name}={raw}")
    return ("?" + "&".join(pairs)) if pairs else ""


PATHS = ["/v1/topics/{t}/events", "/v1/events", "/v1/topics", "/healthz", "/readyz",
         "/metrics", "/v1/ws", "/v1/openapi.json", "/", "/static/{f}", "/v1/topics/{t}",
         "/nowhere/{t}", "/v1/topics/{t}/events/extra", "/v1/sse", "/v1/topics/{t}/presence",
         "/v1/disconnect"]
STATIC = ["squall.js", "%00", "squall.js%00.png", "../run.py", "..%2f..%2frun.py", "index.html",
          "nope", "%FF", ""]
METHODS = ["GET", "POST", "POST", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "FOO",
           "get", "CONNECT", "TRACE"]
CONTENT_TYPES = ["application/json", "application/msgpack", "application/x-msgpack",
                 "application/x-www-form-urlencoded", "text/plain", "", "application/json; "
                 "charset=latin-1", "\u00e9", "multipart/form-data; boundary=x"]


@dataclass
class HttpCase:
    raw: bytes
    head_only: bool  # HEAD: the answer has no body


def http_case(rng: random.Random) -> HttpCase:
    """One complete request (never one the server must wait on)."""
    if rng.random() < 0.08:
        return HttpCase(malformed(rng), False)
    method = rng.choice(METHODS)
    path = rng.choice(PATHS).replace("{t}", topic(rng)).replace("{f}", rng.choice(STATIC))
    headers = {"Host": "fuzz", "Connection": "close"}
    for name, choices in [
        ("Content-Type", CONTENT_TYPES), ("Accept", ["application/msgpack", "*/*", "x"]),
        ("Authorization", ["Bearer x", "Bearer ", "Basic eDp5", "x" * 9000, "Bearer a.b.c"]),
        ("Idempotency-Key", ["", "k", "k" * 300, "\u00e9"]),
        ("Origin", ["null", "http://evil.example", "::::", "http://[", "http://127.0.0.1"]),
        ("Upgrade", ["websocket", "h2c"]), ("X-Forwarded-For", ["1.2.3.4", "garbage"]),
    ]:
        if rng.random() < 0.15:
            headers[name] = rng.choice(choices)
    body = b""
    if method in ("POST", "PUT", "PATCH") or rng.random() < 0.05:
        body = msgpack_bytes(rng) if "msgpack" in headers.get("Content-Type", "") \
            else json_text(rng)
    chunked = rng.random() < 0.1
    if chunked:
        headers["Transfer-Encoding"] = "chunked"
        body = _chunked(rng, body)
    elif rng.random() < 0.05:
        headers["Content-Length"] = rng.choice(["abc", "-1", "\u0661\u0662", "1, 2", "+5",
                                                "99999999999999999999", " 0"])
        body = b""
    else:
        headers["Content-Length"] = str(len(body))
    head = f"{method} {path}{query(rng)} HTTP/1.1\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    return HttpCase(head.encode("utf-8", "surrogateescape") + body, method == "HEAD")


def _chunked(rng: random.Random, body: bytes) -> bytes:
    if rng.random() < 0.5:
        return f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    return rng.choice([b"zz\r\nab\r\n0\r\n\r\n", b"-1\r\n\r\n0\r\n\r\n",
                       b"0x5\r\nab\r\n0\r\n\r\n", b"+2\r\nab\r\n0\r\n\r\n"])


def malformed(rng: random.Random) -> bytes:
    return rng.choice([
        b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
        b"GET / HTTP/1.1\r\n: empty\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70000
        + b"\r\n\r\n", b"\r\n\r\n", b"GET  HTTP/1.1\r\n\r\n",
        b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"GET /%%%% HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"])


def ws_frame(rng: random.Random, binary: bool) -> str | bytes:
    """One client frame for a connection on the JSON (text) or msgpack (binary) codec."""
    kind = rng.random()
    if kind < 0.5:
        frame: dict[str, Any] = {"type": rng.choice(["subscribe", "unsubscribe", "publish",
                                                     "ping", "other", 1, None])}
        for name in ("topic", "since", "data", "ref", "idempotency_key"):
            if rng.random() < 0.6:
                frame[name] = topic(rng) if name == "topic" and rng.random() < 0.7 \
                    else value(rng)
        if binary:
            try:
                return msgpack.packb(frame)
            except (ValueError, OverflowError):
                return b"\xc1"
        return json.dumps(frame)
    if kind < 0.7:
        return msgpack_bytes(rng) if binary else json_text(rng).decode("utf-8", "replace")
    if kind < 0.8:
        return rng.choice(["text on msgpack", "{}"]) if binary else msgpack_bytes(rng)
    if kind < 0.85:
        return "x" * 140_000 if rng.random() < 0.5 else b"\x00" * 140_000  # over the limit
    return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randint(0, 40)))


@dataclass
class Figures:
    """What a run sent and got."""

    http_cases: int = 0
    ws_frames: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    closes: Counter[int | None] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def problem(self, what: str) -> None:
        if len(self.problems) < 50:
            self.problems.append(what)

    def summary(self) -> dict[str, Any]:
        return {"http_cases": self.http_cases, "ws_frames": self.ws_frames,
                "server_errors": sum(n for code, n in self.statuses.items() if code >= 500),
                "statuses": dict(sorted(self.statuses.items())),
                "closes": {str(code): n for code, n in sorted(
                    self.closes.items(), key=lambda item: item[0] or 0)},
                "problems": len(self.problems)}


async def send_http(port: int, case: HttpCase, figures: Figures) -> None:
    """One request on its own connection; checks the answer."""
    figures.http_cases += 1
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(case.raw)
        await writer.drain()
        try:
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        except asyncio.IncompleteReadError as exc:
            answer = exc.partial
        if not _opened_stream(answer):  # an SSE stream that opened never ends by itself
            answer += await asyncio.wait_for(reader.read(), TIMEOUT)
    except (ConnectionError, TimeoutError) as exc:
        figures.problem(f"no answer ({type(exc).__name__}) to {case.raw[:120]!r}")
        return
    finally:
        writer.close()
    check_http_answer(case, answer, figures)


def _opened_stream(head: bytes) -> bool:
    return head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head


def check_http_answer(case: HttpCase, answer: bytes, figures: Figures) -> None:
    if not answer:
        figures.problem(f"closed without an answer: {case.raw[:120]!r}")
        return
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    figures.statuses[status] += 1
    if status >= 500:
        figures.problem(f"{status} for {case.raw[:120]!r}")
    if status < 400 or case.head_only:
        return
    try:
        error = (msgpack.unpackb(body) if b"application/msgpack" in head
                 else json.loads(body))["error"]
        assert isinstance(error["code"], str) and isinstance(error["message"], str)
    except (ValueError, KeyError, TypeError, AssertionError, msgpack.UnpackException):
        figures.problem(f"{status} without the JSON error shape for {case.raw[:120]!r}: "
                        f"{body[:80]!r}")


async def ws_session(port: int, rng: random.Random, frames: int, figures: Figures) -> None:
    """Send ``frames`` frames over as many connections as the server's closes need."""
    sent = 0
    while sent < frames:
        binary = rng.random() < 0.5
        subprotocol = "squall.v1.msgpack" if binary else "squall.v1.json"
        async with websockets.connect(f"ws://127.0.0.1:{port}/v1/ws",
                                      subprotocols=[subprotocol], max_size=None,
                                      open_timeout=TIMEOUT, ping_interval=None) as socket:
            while sent < frames:
                sent += 1
                figures.ws_frames += 1
                if not await _one_frame(socket, ws_frame(rng, binary), binary, figures):
                    break


async def _one_frame(socket: Any, frame: str | bytes, binary: bool, figures: Figures) -> bool:
    """Send ``frame`` and a ping; False once the server closed (with a code, it must)."""
    ping = msgpack.packb({"type": "ping", "ref": "fz"}) if binary else '{"type":"ping","ref":"fz"}'
    try:
        await socket.send(frame)
        await socket.send(ping)
        while True:
            raw = await asyncio.wait_for(socket.recv(), TIMEOUT)
            reply = msgpack.unpackb(raw) if isinstance(raw, bytes) else json.loads(raw)
            if reply.get("type") == "error":
                figures.statuses[0] += 1  # an error frame
            if reply.get("type") == "pong" and reply.get("ref") == "fz":
                return True
    except websockets.ConnectionClosed as closed:
        code = closed.rcvd.code if closed.rcvd else None
        figures.closes[code] += 1
        if code not in ALLOWED_CLOSES:
            figures.problem(f"closed with {code} after {str(frame)[:80]!r}")
        return False
    except TimeoutError:
        figures.problem(f"no answer to a ping after {str(frame)[:80]!r}")
        return False
