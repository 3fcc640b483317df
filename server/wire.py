"""Wire formats: the bytes one kind of client gets for a message or an event.

A ``WireFormat`` pairs a codec (how values are encoded, and how the client's own
messages are decoded) with the framing of its transport:

- ``WS_JSON`` and ``WS_MSGPACK``: one unmasked WebSocket frame per message (text and
  binary frames, RFC 6455 5.2), for the subprotocols ``squall.v1.json`` and
  ``squall.v1.msgpack``;
- ``SSE``: one Server-Sent Event per message; an event is unnamed and carries its
  id (``id:``), any other message is named after its ``type`` (``subscribed``,
  ``error``, ...); ``data`` is the JSON message on one line;
- ``LINES``: one JSON message per line, for the TCP line protocol.

Every format of one event is built once (``Event.frame``) and shared by every
subscriber and replay on that format. Formats are singletons compared by identity.
A format also says how its transport keeps an idle connection alive: ``ping`` is
what the server sends on the keepalive interval (None: nothing), and
``answers_pings`` whether the client answers it (then silence closes it).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from server.codec import JSON, MSGPACK, Codec

if TYPE_CHECKING:
    from server.events import Event

OPCODE_TEXT = 0x1
OPCODE_BINARY = 0x2
OPCODE_CLOSE = 0x8
OPCODE_PING = 0x9
OPCODE_PONG = 0xA
FIN = 0x80


def ws_frame(payload: bytes, opcode: int) -> bytes:
    """A single final server-to-client frame (RFC 6455 5.2): header plus payload."""
    first = FIN | opcode
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", first, length)
    elif length < 65536:
        header = struct.pack("!BBH", first, 126, length)
    else:
        header = struct.pack("!BBQ", first, 127, length)
    return header + payload


class WireFormat:
    """How messages and events look on one kind of connection."""

    __slots__ = ("answers_pings", "codec", "name", "ping")

    def __init__(self, name: str, codec: Codec, ping: bytes | None = None,
                 answers_pings: bool = False) -> None:
        self.name = name
        self.codec = codec
        self.ping = ping
        self.answers_pings = answers_pings

    def frame(self, message: dict[str, Any]) -> bytes:
        """The bytes carrying one message (a reply, an error, an event as a dict)."""
        return self.wrap(self.codec.dumps(message), message)

    def event_frame(self, event: Event) -> bytes:
        """The bytes carrying ``event`` (called once per event by ``Event.frame``)."""
        return self.wrap_event(event.payload(self.codec), event)

    def wrap(self, payload: bytes, message: dict[str, Any]) -> bytes:
        raise NotImplementedError

    def wrap_event(self, payload: bytes, event: Event) -> bytes:
        return self.wrap(payload, {"type": "event", "id": event.id})

    def __repr__(self) -> str:
        return f"WireFormat({self.name!r})"


class _WebSocket(WireFormat):
    __slots__ = ("opcode", "subprotocol")

    def __init__(self, name: str, codec: Codec, opcode: int) -> None:
        super().__init__(name, codec, ping=ws_frame(b"", OPCODE_PING), answers_pings=True)
        self.opcode = opcode
        self.subprotocol = codec.subprotocol

    def wrap(self, payload: bytes, message: dict[str, Any]) -> bytes:
        return ws_frame(payload, self.opcode)

    def wrap_event(self, payload: bytes, event: Event) -> bytes:
        return ws_frame(payload, self.opcode)


class _ServerSentEvents(WireFormat):
    __slots__ = ()

    def wrap(self, payload: bytes, message: dict[str, Any]) -> bytes:
        kind = message.get("type")
        if kind == "event":
            return b"id: %s\ndata: %s\n\n" % (str(message["id"]).encode(), payload)
        return b"event: %s\ndata: %s\n\n" % (str(kind).encode(), payload)

    def wrap_event(self, payload: bytes, event: Event) -> bytes:
        return b"id: %s\ndata: %s\n\n" % (event.id.encode(), payload)


class _Lines(WireFormat):
    __slots__ = ()

    def wrap(self, payload: bytes, message: dict[str, Any]) -> bytes:
        return payload + b"\n"

    def wrap_event(self, payload: bytes, event: Event) -> bytes:
        return payload + b"\n"


WS_JSON: WireFormat = _WebSocket("websocket-json", JSON, OPCODE_TEXT)
WS_MSGPACK: WireFormat = _WebSocket("websocket-msgpack", MSGPACK, OPCODE_BINARY)
SSE: WireFormat = _ServerSentEvents("sse", JSON, ping=b": ping\n\n")
LINES: WireFormat = _Lines("lines", JSON)
FORMATS = (WS_JSON, WS_MSGPACK, SSE, LINES)
BY_SUBPROTOCOL = {JSON.subprotocol: WS_JSON, MSGPACK.subprotocol: WS_MSGPACK}
