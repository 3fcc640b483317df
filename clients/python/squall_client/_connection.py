"""The subscriber's WebSocket: where it goes, how it opens, what a close means, and
the subprotocol's wire form of frames.

Close codes follow docs/protocol.md: after 1000, 4003 and 4010 the client stops; after
1009 and 4000 (and the protocol errors 1002, 1003, 1007, 1008) it stops with an
error; 4001 asks for a new token; any other code, and any network failure,
reconnects with backoff (1001, 4008, 4009, 4029, 1006, 1011, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin, Subprotocol

from squall_client.errors import Disconnected

JSON_PROTOCOL = Subprotocol("squall.v1.json")
MSGPACK_PROTOCOL = Subprotocol("squall.v1.msgpack")
CLOSE_UNAUTHORIZED = 4001
CLOSE_ABNORMAL = 1006

# close code -> (code in words, what it means): the client stops after these
_FINAL = {
    1000: ("normal_close", "the server closed the connection"),
    4003: ("forbidden", "the server refused this client (forbidden)"),
    4010: ("disconnected", "the backend disconnected this client"),
    1002: ("protocol_error", "the server saw a WebSocket protocol error"),
    1003: ("unsupported_data", "the server cannot take this kind of data"),
    1007: ("invalid_data", "the server got data it could not decode"),
    1008: ("policy_violation", "the server refused a message (policy violation)"),
    1009: ("message_too_big", "a message was larger than the server takes"),
    4000: ("protocol_abuse", "the server closed after too many bad frames"),
}


class After(enum.Enum):
    """What the subscriber does after its connection closed."""

    STOP = "stop"
    NEW_TOKEN = "new token"
    RECONNECT = "reconnect"


def after_close(code: int | None) -> After:
    if code in _FINAL:
        return After.STOP
    if code == CLOSE_UNAUTHORIZED:
        return After.NEW_TOKEN
    return After.RECONNECT


def stopped(code: int | None, reason: str) -> Disconnected:
    """The exception that ends the iteration after a final close."""
    name, meaning = _FINAL.get(code or 0, ("unauthorized", "the token was refused or "
                                            "expired, and no new one could be had"))
    shown = f"{meaning} (close code {code}" + (f": {reason})" if reason else ")")
    return Disconnected(name, shown, code, reason)


def socket_url(url: str) -> str:
    """``ws(s)://host[:port][/prefix]`` (or ``http(s)://``) to the ``/v1/ws`` endpoint."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"expected a ws://, wss://, http:// or https:// URL, got {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/v1/ws"):
        path += "/v1/ws"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def refused_handshake(error: Exception) -> Disconnected | None:
    """The final error for a handshake that retrying cannot fix, or None to retry.

    A 4xx answer (other than 408 and 429) means a wrong URL or a proxy that refuses:
    stop. 5xx, timeouts and network errors may pass: retry.
    """
    if isinstance(error, InvalidStatus):
        status = error.response.status_code
        if 400 <= status < 500 and status not in (408, 429):
            body = error.response.body[:200].decode("utf-8", "replace") if error.response.body \
                else ""
            return Disconnected(f"http_{status}", f"the WebSocket handshake was refused with "
                                f"HTTP {status} {body}".strip(), None)
    if isinstance(error, websockets.exceptions.InvalidURI):
        return Disconnected("invalid_url", str(error), None)
    return None


async def open_socket(url: str, *, subprotocol: Subprotocol, token: str | None,
                      origin: str | None, headers: Mapping[str, str], open_timeout: float,
                      close_timeout: float, ping_interval: float, ping_timeout: float,
                      max_message_bytes: int, user_agent: str) -> ClientConnection:
    """An open WebSocket that speaks ``subprotocol``; raises what ``connect`` raises."""
    sent = dict(headers)
    if token:
        sent["Authorization"] = f"Bearer {token}"
    socket = await connect(url, subprotocols=[subprotocol], additional_headers=sent,
                           origin=Origin(origin) if origin else None,
                           compression=None, open_timeout=open_timeout,
                           ping_interval=ping_interval or None,
                           ping_timeout=ping_timeout or None, close_timeout=close_timeout,
                           max_size=max_message_bytes, user_agent_header=user_agent)
    chosen = socket.subprotocol or JSON_PROTOCOL  # JSON is the default without one
    if chosen != subprotocol:
        await socket.close()
        raise Disconnected("unsupported_subprotocol", f"the server does not speak "
                           f"{subprotocol} (it chose {socket.subprotocol!r})", None)
    return socket


async def close_discarding(socket: ClientConnection, reason: str, timeout: float = 5.0) -> None:
    """Close with 1000, discarding what still arrives: the close frame comes after it,
    and the library stops reading while its queue of unread messages is full. A peer
    that does not answer within ``timeout`` is cut off."""
    closing = asyncio.ensure_future(socket.close(1000, reason))

    async def discard() -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await socket.recv()

    try:
        await asyncio.wait_for(asyncio.gather(closing, discard()), timeout)
    except (TimeoutError, OSError):
        socket.transport.abort()


class Codec:
    """Frames to and from the subprotocol's wire form."""

    def __init__(self, use_msgpack: bool) -> None:
        self.protocol = MSGPACK_PROTOCOL if use_msgpack else JSON_PROTOCOL
        self.decode: Callable[[str | bytes], Any]
        self.encode: Callable[[dict[str, Any]], str | bytes]
        if not use_msgpack:
            self.decode = json.loads
            self.encode = json.dumps
            return
        try:
            import msgpack
        except ImportError:
            raise ImportError("msgpack=True needs the msgpack package: "
                              "pip install 'squall-client[msgpack]'") from None

        def decode(message: str | bytes) -> Any:
            if isinstance(message, str):
                raise ValueError("a text frame on the msgpack subprotocol")
            try:
                return msgpack.unpackb(message)
            except (msgpack.UnpackException, ValueError) as exc:
                raise ValueError(str(exc)) from None

        self.decode = decode
        self.encode = msgpack.packb
