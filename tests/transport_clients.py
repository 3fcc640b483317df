"""One client interface over the three transports, for the shared session suite.

Each client speaks its transport on raw asyncio streams (so a test can stall it with
a small receive buffer) and shows the server's messages as the WebSocket JSON frames
would be: ``recv`` returns ``{"type": ...}`` dicts, the close (a WebSocket close frame,
an SSE ``close`` event, a TCP ``close`` line) as ``{"type": "close", "code", "reason"}``.
``connect`` subscribes to the topics given (WebSocket: ``?topic=`` or ``subscribe``
frames when resuming; SSE: the query; TCP: ``subscribe`` frames, after an ``auth``
frame when there is a token). An SSE request refused before its stream starts
raises ``HttpRefused`` with its status and JSON body.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlencode

from tests.rawws import RawSocket, close_code, open_stream

TIMEOUT = 10.0
KINDS = ("ws", "sse", "tcp")


class HttpRefused(Exception):
    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {body}")
        self.status = status
        self.body = body
        self.headers = headers or {}  # (names in lower case)

    @property
    def code(self) -> str:
        return str(self.body["error"]["code"])


class TransportClient:
    """What every transport's client can do."""

    kind = ""
    can_send = True

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        raise NotImplementedError

    async def send(self, frame: dict[str, Any]) -> None:
        raise NotImplementedError

    async def recv_type(self, kind: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        frame = await self.recv(timeout)
        assert frame["type"] == kind, frame
        return frame

    async def events(self, count: int) -> list[dict[str, Any]]:
        return [await self.recv_type("event") for _ in range(count)]

    async def closed_with(self, timeout: float = TIMEOUT) -> int | None:
        """Read until the server's close: its code."""
        while True:
            frame = await self.recv(timeout)
            if frame["type"] == "close":
                return int(frame["code"])

    async def ends(self, timeout: float = TIMEOUT) -> bool:
        """Whether the server ends the connection (EOF) after its close."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), timeout):
                pass
        except (ConnectionError, TimeoutError):
            return False
        return True

    def close(self) -> None:
        self.writer.close()


class WsClient(TransportClient):
    kind = "ws"

    def __init__(self, raw: RawSocket) -> None:
        super().__init__(raw.reader, raw.writer)
        self.raw = raw

    @classmethod
    async def connect(cls, port: int, topics: tuple[str, ...] = (), since: str | None = None,
                      token: str | None = None, **options: Any) -> WsClient:
        query = [("topic", topic) for topic in topics if since is None]
        query += [("token", token)] if token else []
        path = "/v1/ws" + (f"?{urlencode(query)}" if query else "")
        client = cls(await RawSocket.connect(port, path, **options))
        if since is not None:
            for topic in topics:
                await client.send({"type": "subscribe", "topic": topic, "since": since})
        return client

    async def send(self, frame: dict[str, Any]) -> None:
        self.raw.send_json(frame)

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        while True:
            opcode, payload = await self.raw.read_frame(timeout)
            if opcode == 0x8:
                return {"type": "close", "code": close_code(payload),
                        "reason": payload[2:].decode()}
            if opcode in (0x1, 0x2):
                value: dict[str, Any] = json.loads(payload)
                return value


class SseClient(TransportClient):
    kind = "sse"
    can_send = False

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 headers: dict[str, str]) -> None:
        super().__init__(reader, writer)
        self.headers = headers
        self.raw: list[tuple[str | None, str | None, str]] = []  # (event, id, data)
        self.retry: int | None = None
        self.comments = 0

    @classmethod
    async def connect(cls, port: int, topics: tuple[str, ...] = (), since: str | None = None,
                      token: str | None = None, last_event_id: str | None = None,
                      headers: dict[str, str] | None = None, **options: Any) -> SseClient:
        reader, writer = await open_stream(port, **options)
        query = [("topic", topic) for topic in topics]
        query += [("since", since)] if since is not None else []
        query += [("token", token)] if token else []
        lines = [f"GET /v1/sse?{urlencode(query)} HTTP/1.1", f"Host: 127.0.0.1:{port}",
                 "Accept: text/event-stream"]
        if last_event_id is not None:
            lines.append(f"Last-Event-ID: {last_event_id}")
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ")[1])
        found = {}
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                found[name.strip().lower()] = value.strip()
        if status != 200:
            body = await asyncio.wait_for(reader.readexactly(int(found["content-length"])),
                                          TIMEOUT)
            writer.close()
            raise HttpRefused(status, json.loads(body), found)
        return cls(reader, writer, found)

    async def event(self, timeout: float = TIMEOUT) -> tuple[str | None, str | None, str]:
        """The next event: (name, id, data); comments and ``retry:`` are noted."""
        name = event_id = None
        data: list[str] = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), timeout)).decode()
            if not line:
                raise EOFError("the stream ended")
            line = line.rstrip("\n")
            if not line:
                if data:
                    self.raw.append((name, event_id, "\n".join(data)))
                    return name, event_id, "\n".join(data)
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "":
                self.comments += 1
            elif field == "event":
                name = value
            elif field == "id":
                event_id = value
            elif field == "data":
                data.append(value)
            elif field == "retry":
                self.retry = int(value)

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        name, event_id, data = await self.event(timeout)
        frame: dict[str, Any] = json.loads(data)
        expected = None if frame["type"] == "event" else frame["type"]
        assert name == expected, (name, frame)  # events unnamed, the rest by type
        if frame["type"] == "event":
            assert event_id == frame["id"]
        return frame


class TcpClient(TransportClient):
    kind = "tcp"

    @classmethod
    async def connect(cls, port: int, topics: tuple[str, ...] = (), since: str | None = None,
                      token: str | None = None, **options: Any) -> TcpClient:
        reader, writer = await open_stream(port, **options)
        client = cls(reader, writer)
        if token:
            await client.send({"type": "auth", "token": token, "ref": "auth"})
            reply = await client.recv()
            if reply["type"] != "authed":
                client.with_first(reply)  # the test sees the refusal, then the rest
        for topic in topics:
            frame: dict[str, Any] = {"type": "subscribe", "topic": topic}
            if since is not None:
                frame["since"] = since
            await client.send(frame)
        return client

    def with_first(self, frame: dict[str, Any]) -> TcpClient:
        self._first = frame
        return self

    async def send(self, frame: dict[str, Any]) -> None:
        self.writer.write(json.dumps(frame).encode() + b"\n")

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        first = getattr(self, "_first", None)
        if first is not None:
            del self._first
            return first  # type: ignore[no-any-return]
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        if not line:
            raise EOFError("the connection ended")
        assert line.endswith(b"\n")
        value: dict[str, Any] = json.loads(line)
        return value


CLIENTS: dict[str, type[WsClient] | type[SseClient] | type[TcpClient]] = {
    "ws": WsClient, "sse": SseClient, "tcp": TcpClient}
