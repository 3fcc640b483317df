"""``GET /v1/ws``: the WebSocket transport (RFC 6455), on Tornado's public API only.

``WebSocketHandler`` checks the handshake, answers it (101, written by hand after
``RequestHandler.detach()``), admits the client (server/admission.py) and hands it
to a ``Session``. An admission refusal is sent as a close code after the handshake,
which a browser can see (a refused handshake shows it only 1006): 4003 for an origin
or the authorization webhook, 4001 for a bad token, 4029 over the connection limits.
Requests that are no valid handshake get the API's JSON errors (400, 405, and 426
for a version other than 13). Once ``get`` returns, the handler, its request and
headers are released: an open client keeps only its transport and session.

``WebSocketTransport`` reads frames itself: client frames must be masked; RSV bits,
reserved opcodes, fragmented or oversized control frames, continuation frames out of
place and invalid close codes fail the connection with 1002, invalid UTF-8 in a text
message or a close reason with 1007 (as soon as a fragment shows it), a message over
``max_frame_bytes`` with 1009. Pings are answered with pongs (only the last one while
a write is pending, as RFC 6455 5.5.3 allows); pongs tell the keepalive. A close from
the client is answered and the server then closes the TCP connection; a close from
the server waits up to ``CLOSE_TIMEOUT`` for the client's answer. Why a reader of its
own instead of Tornado's: see docs/transports.md.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import logging
import struct
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from tornado.iostream import IOStream

from handlers.base import ApiHandler
from server.admission import Request
from server.auth import Auth
from server.errors import SquallError
from server.node import Node
from server.wire import (
    BY_SUBPROTOCOL,
    OPCODE_BINARY,
    OPCODE_CLOSE,
    OPCODE_PING,
    OPCODE_PONG,
    OPCODE_TEXT,
    WS_JSON,
    WireFormat,
    ws_frame,
)
from transports.stream import READ_CHUNK, StreamTransport, open_session, take_stream

log = logging.getLogger("squall.ws")

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OPCODE_CONTINUATION = 0x0
CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009
MAX_CONTROL_PAYLOAD = 125
MAX_REASON_BYTES = 123
_DATA_OPCODES = (OPCODE_CONTINUATION, OPCODE_TEXT, OPCODE_BINARY)
_WHOLE_DATA = (0x80 | OPCODE_TEXT, 0x80 | OPCODE_BINARY)  # first bytes of unfragmented messages

_websocket_mask: Callable[[bytes, bytes], bytes] | None
try:  # Tornado's own masking in C (tornado.speedups is absent from a pure-Python build)
    from tornado.speedups import websocket_mask as _websocket_mask
except ImportError:
    _websocket_mask = None
_CONTROL_OPCODES = (OPCODE_CLOSE, OPCODE_PING, OPCODE_PONG)


def valid_close_code(code: int) -> bool:
    """Whether a client may send ``code`` (RFC 6455 7.4 and the IANA registry)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def close_payload(code: int | None, reason: str = "") -> bytes:
    """A close frame's payload: the code and at most 123 bytes of reason, cut on a
    character boundary."""
    if code is None:
        return b""
    encoded = reason.encode()[:MAX_REASON_BYTES].decode("utf-8", "ignore").encode()
    return struct.pack("!H", code) + encoded


def unmask(payload: bytes, mask: bytes) -> bytes:
    """``payload`` XOR the 4-byte ``mask`` repeated: Tornado's C function when it was
    built with its extension, else one big-integer operation."""
    if _websocket_mask is not None:
        return _websocket_mask(mask, payload)
    return _unmask(payload, mask)


def _unmask(payload: bytes, mask: bytes) -> bytes:
    size = len(payload)
    if not size:
        return b""
    key = (mask * (size // 4 + 1))[:size]
    value = int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")
    return value.to_bytes(size, "little")


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


class ProtocolError(Exception):
    """The client broke RFC 6455: fail the connection with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class WebSocketTransport(StreamTransport):
    """One WebSocket connection's frames, both ways."""

    __slots__ = ("_buffer", "_decoder", "_fragments", "_kind", "_pong", "_size",
                 "_skipping", "max_message_size", "text_as_bytes")

    def __init__(self, stream: IOStream, max_message_size: int,
                 text_as_bytes: bool = False) -> None:
        """``text_as_bytes``: a whole text message reaches the sink as its UTF-8 bytes,
        checked, not decoded (a JSON session parses bytes without encoding them again)."""
        super().__init__(stream)
        self.max_message_size = max_message_size
        self.text_as_bytes = text_as_bytes
        self._buffer = b""
        # a fragmented message under way: its bytes so far, in one buffer (a frame adds
        # its payload, nothing more: empty fragments cost no memory)
        self._fragments: bytearray | None = None
        self._kind = 0  # its opcode
        self._size = 0  # its bytes so far
        self._decoder: codecs.IncrementalDecoder | None = None
        self._pong: bytes | None = None  # the last ping's payload, while a pong waits
        self._skipping = False  # after a framing error: nothing more can be parsed

    # -- closing ----------------------------------------------------------------------------

    def closing_bytes(self, code: int, reason: str) -> bytes:
        return ws_frame(close_payload(code, reason), OPCODE_CLOSE)

    def after_closing(self) -> None:
        """Wait for the client's close frame (``_on_close`` ends it then), unless no more
        frames can be parsed: then half-close."""
        if self._skipping:
            super().after_closing()

    def fail(self, error: ProtocolError) -> None:
        log.debug("failing a WebSocket with %d: %s", error.code, error.reason)
        self.close(error.code, error.reason)

    # -- reading ------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._skipping:
            self.read()
            return
        buffer = self._buffer + data if self._buffer else data
        used, missing = self._frames(buffer)
        self._buffer = buffer[used:] if used < len(buffer) else b""
        if self.stream.closed():
            return
        if missing > READ_CHUNK:
            self.read(missing, partial=False)  # a large frame: let the stream gather it
        else:
            self.read()

    def _frames(self, buffer: bytes) -> tuple[int, int]:
        """Handle every complete frame in ``buffer``: (bytes used, bytes the next frame
        still lacks)."""
        position, end = 0, len(buffer)
        while end - position >= 2 and not self._skipping:
            first, second = buffer[position], buffer[position + 1]
            length, head = second & 0x7F, 2
            if length >= 126:
                head += 2 if length == 126 else 8
            masked = bool(second & 0x80)
            head += 4 if masked else 0
            if end - position < head:
                return position, head - (end - position)
            if length >= 126:
                length = int.from_bytes(buffer[position + 2:position + head - 4 * masked], "big")
            if not self.closing and (first not in _WHOLE_DATA or not masked
                                     or self._size + length > self.max_message_size):
                error = self._header_error(first, masked, length)  # else it has none
                if error is not None:
                    self.fail(error)  # then read on as a closing connection
            if length > self.max_message_size:  # not worth reading: drop all that comes
                self._skip()
                return end, 0
            if end - position < head + length:
                return position, head + length - (end - position)
            payload = buffer[position + head:position + head + length]
            if masked:
                payload = unmask(payload, buffer[position + head - 4:position + head])
            position += head + length
            try:
                self._frame(first & 0x0F, bool(first & 0x80), payload)
            except ProtocolError as error:
                self.fail(error)
            if self.stream.closed():
                return position, 0
        return position, 2 - (end - position)

    def _header_error(self, first: int, masked: bool, length: int) -> ProtocolError | None:
        opcode = first & 0x0F
        if first & 0x70:
            return ProtocolError(CLOSE_PROTOCOL_ERROR, "reserved bits set")
        if not masked:
            return ProtocolError(CLOSE_PROTOCOL_ERROR, "client frames must be masked")
        if opcode in _CONTROL_OPCODES:
            if not first & 0x80:
                return ProtocolError(CLOSE_PROTOCOL_ERROR, "fragmented control frame")
            if length > MAX_CONTROL_PAYLOAD:
                return ProtocolError(CLOSE_PROTOCOL_ERROR, "control frame over 125 bytes")
        elif opcode not in _DATA_OPCODES:
            return ProtocolError(CLOSE_PROTOCOL_ERROR, f"reserved opcode {opcode}")
        elif self._size + length > self.max_message_size:
            return ProtocolError(CLOSE_TOO_BIG, "message too big")
        return None

    def _skip(self) -> None:
        """Nothing more can be parsed: drop what comes until the client closes."""
        self._skipping = True
        self._buffer = b""
        if self.closing:
            super().after_closing()

    def _frame(self, opcode: int, final: bool, payload: bytes) -> None:
        if opcode == OPCODE_CLOSE:
            self._on_close(payload)
        elif self.closing:
            return  # after our close: wait for theirs
        elif opcode == OPCODE_PING:
            self._on_ping(payload)
        elif opcode == OPCODE_PONG:
            if self.sink is not None:
                self.sink.answered()
        elif opcode == OPCODE_CONTINUATION:
            if self._fragments is None:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "continuation frame without a message")
            self._fragment(payload, final)
        elif self._fragments is not None:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "a new message inside a fragmented one")
        elif final:
            if opcode != OPCODE_TEXT:
                self._deliver(payload)
            elif self.text_as_bytes:
                if not payload.isascii():
                    _text(payload)  # valid UTF-8, or the close with 1007
                self._deliver(payload)
            else:
                self._deliver(_text(payload))
        else:
            self._fragments, self._kind, self._size = bytearray(), opcode, 0
            if opcode == OPCODE_TEXT:
                self._decoder = codecs.getincrementaldecoder("utf-8")()
            self._fragment(payload, final)

    def _fragment(self, payload: bytes, final: bool) -> None:
        fragments = self._fragments
        assert fragments is not None
        self._size += len(payload)
        decoder = self._decoder
        if decoder is not None:  # checked as it comes, so bad UTF-8 fails fast
            try:
                decoder.decode(payload, final)
            except UnicodeDecodeError:
                raise ProtocolError(CLOSE_INVALID_DATA, "invalid UTF-8 in a text message") from None
        fragments += payload
        if not final:
            return
        self._fragments, self._decoder, self._size = None, None, 0
        if decoder is None or self.text_as_bytes:  # (text: valid UTF-8, checked above)
            self._deliver(bytes(fragments))
        else:
            self._deliver(fragments.decode())

    def _deliver(self, message: str | bytes) -> None:
        if self.sink is not None:
            self.sink.received(message)

    def _on_ping(self, payload: bytes) -> None:
        if self._pong is not None:  # a pong already waits for the stream: answer the last
            self._pong = payload
            return
        if not self.stream.writing():
            self.write(ws_frame(payload, OPCODE_PONG))
            return
        self._pong = payload
        self.stream.write(b"").add_done_callback(self._send_pong)  # once the stream drained

    def _send_pong(self, _: object) -> None:
        payload, self._pong = self._pong, None
        if payload is not None:
            self.write(ws_frame(payload, OPCODE_PONG))

    def _on_close(self, payload: bytes) -> None:
        if self.closing:  # the answer to ours: the handshake is done
            self.abort()
            return
        code, reason = _close_frame(payload)
        self.end_code, self.end_reason = (code or CLOSE_NO_STATUS), reason
        self.closing = True
        self._start_close_timer()
        written = self._send(ws_frame(close_payload(code, reason), OPCODE_CLOSE))
        if written is None:
            self.abort()  # the server closes the TCP connection first
        else:
            written.add_done_callback(lambda _: self.abort())


def _text(payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(CLOSE_INVALID_DATA, "invalid UTF-8 in a text message") from None


def _close_frame(payload: bytes) -> tuple[int | None, str]:
    """The code and reason of a client's close frame; ``ProtocolError`` if invalid."""
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "close frame of one byte")
    (code,) = struct.unpack("!H", payload[:2])
    if not valid_close_code(code):
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        return code, payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(CLOSE_INVALID_DATA, "invalid UTF-8 in the close reason") from None


# -- the handshake ----------------------------------------------------------------------------


SinkFactory = Callable[[WebSocketTransport, WireFormat], Any]


class WebSocketHandler(ApiHandler):
    """The handshake of one WebSocket client; then its session takes over.

    ``sink_factory`` (a route argument) replaces the session with another sink, for
    tests of the protocol itself (an echo for the Autobahn cases).
    """

    def initialize(self, node: Node, auth: Auth, sink_factory: SinkFactory | None = None) -> None:
        super().initialize(node, auth)
        self.sink_factory = sink_factory

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc_info = kwargs.get("exc_info")
        error = exc_info[1] if exc_info else None
        status = error.status if isinstance(error, SquallError) else status_code
        if status == 426:
            self.set_header("Sec-WebSocket-Version", "13")
        elif status == 405:
            self.set_header("Allow", "GET, OPTIONS")
        super().write_error(status_code, **kwargs)

    def prepare(self) -> None:
        """Anything that is no version-13 WebSocket handshake gets a JSON error."""
        if self.request.method not in ("GET", "OPTIONS"):
            raise SquallError("method_not_allowed", "this path takes WebSocket handshakes "
                              "(GET) only")
        headers = self.request.headers
        if self.request.method == "OPTIONS":
            return
        if "websocket" not in _tokens(headers.get("Upgrade", "")):
            raise SquallError("invalid_body", "this path takes WebSocket handshakes only")
        if "upgrade" not in _tokens(headers.get("Connection", "")):
            raise SquallError("invalid_body", "a WebSocket handshake needs 'Connection: Upgrade'")
        if headers.get("Sec-WebSocket-Version") != "13":
            raise SquallError("upgrade_required", "this server speaks WebSocket version 13 "
                              "(Sec-WebSocket-Version: 13)")
        if not _valid_key(headers.get("Sec-WebSocket-Key", "")):
            raise SquallError("invalid_body", "Sec-WebSocket-Key must be 16 bytes in base64")
        if "Origin" in headers and not _is_url(headers["Origin"]):
            raise SquallError("invalid_body", "the Origin header is malformed")
        if not _is_utf8(self.request.query_arguments):
            # checked here: Tornado's own error would quote the value, maybe a token
            raise SquallError("invalid_body", "a query parameter is not UTF-8")

    async def get(self) -> None:
        request = self.request
        wire, offered = self._wire_format()
        headers = [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                   ("Sec-WebSocket-Accept", accept_key(request.headers["Sec-WebSocket-Key"]))]
        if offered is not None:
            headers.append(("Sec-WebSocket-Protocol", offered))
        client = Request(
            ip=request.remote_ip or "", token=self.get_query_argument("token", None),
            authorization=request.headers.get("Authorization"),
            origin=request.headers.get("Origin"), host=request.host, headers=request.headers,
            query={key: [value.decode() for value in values]
                   for key, values in request.query_arguments.items()})
        topics = self.get_query_arguments("topic")
        max_size = self.node.settings.max_frame_bytes
        transport = WebSocketTransport(take_stream(self, 101, "Switching Protocols", headers),
                                       max_size, text_as_bytes=(wire is WS_JSON
                                                                and self.sink_factory is None))
        if self.sink_factory is not None:  # a test's own sink (an echo, say)
            transport.sink = self.sink_factory(transport, wire)
            transport.read()
            return
        await open_session(self.node, transport, wire, client,
                           ({"type": "subscribe", "topic": topic} for topic in topics))

    def _wire_format(self) -> tuple[WireFormat, str | None]:
        """The first offered subprotocol this server speaks (JSON when none is)."""
        offered = ",".join(self.request.headers.get_list("Sec-WebSocket-Protocol"))
        for name in (part.strip() for part in offered.split(",")):
            if name in BY_SUBPROTOCOL:
                return BY_SUBPROTOCOL[name], name
        return WS_JSON, None




def _tokens(value: str) -> list[str]:
    return [part.strip().lower() for part in value.split(",")]


def _valid_key(key: str) -> bool:
    try:
        return len(base64.b64decode(key.strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def _is_utf8(arguments: dict[str, list[bytes]]) -> bool:
    try:
        for values in arguments.values():
            for value in values:
                value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _is_url(text: str) -> bool:
    try:
        urlsplit(text)
    except ValueError:
        return False
    return True
