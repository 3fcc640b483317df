"""A raw WebSocket client on asyncio streams, for what ordinary clients hide:
not reading at all, exact frame bytes, close codes, server pings."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
from typing import Any

TIMEOUT = 10.0


async def open_stream(port: int, rcvbuf: int | None = None,
                      local_addr: str | None = None) -> tuple[asyncio.StreamReader,
                                                             asyncio.StreamWriter]:
    """A TCP connection to the server on ``port``, from ``local_addr`` if given."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connect, so the window stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if local_addr is not None:
        sock.bind((local_addr, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    # a small limit: asyncio stops reading the socket once 2 * limit bytes wait unread
    return await asyncio.open_connection(sock=sock, limit=16 * 1024)


class RawSocket:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, path: str = "/v1/ws",
                      headers: dict[str, str] | None = None,
                      rcvbuf: int | None = None, local_addr: str | None = None) -> RawSocket:
        reader, writer = await open_stream(port, rcvbuf, local_addr)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                 "Sec-WebSocket-Version: 13"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        status = head.split(b" ", 2)[1]
        if status != b"101":
            raise ConnectionError(head.decode(errors="replace"))
        return cls(reader, writer)

    def send_frame(self, payload: bytes, opcode: int = 0x1) -> None:
        mask = os.urandom(4)
        length = len(payload)
        if length < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
        self.writer.write(header + mask + masked)

    def send_json(self, value: Any) -> None:
        self.send_frame(json.dumps(value).encode())

    async def read_frame(self, timeout: float = TIMEOUT) -> tuple[int, bytes]:
        """(opcode, payload) of the next frame; EOFError when the socket ends."""
        try:
            first, second = await asyncio.wait_for(self.reader.readexactly(2), timeout)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
            return first & 0x0F, await self.reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise EOFError from None

    async def read_message(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next text frame's JSON, skipping control frames."""
        while True:
            opcode, payload = await self.read_frame(timeout)
            if opcode == 0x1:
                return json.loads(payload)  # type: ignore[no-any-return]
            if opcode == 0x8:
                raise EOFError(f"closed with {close_code(payload)}")

    def close(self) -> None:
        self.writer.close()


def close_code(payload: bytes) -> int | None:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
