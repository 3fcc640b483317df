"""Who may connect: one admission for every transport.

In this order: an ``Origin`` that ``allowed_origins`` refuses (WebSocket and SSE
only: browsers send it), a bad credential (``?token=`` or ``Authorization``), a
connection over ``max_connections`` or ``max_connections_per_ip``, and, when an
authorization webhook is configured, the backend's verdict. Each refusal names the
close code a WebSocket or TCP client gets and the HTTP status an SSE request gets.

An admitted client is counted in the node's connection limits until its session
releases it (``Admitted.release``, idempotent).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from server import signals
from server.auth import Grant
from server.errors import SquallError
from server.node import Node

CLOSE_UNAUTHORIZED = 4001
CLOSE_FORBIDDEN = 4003
CLOSE_RATE_LIMITED = 4029


class Refused(SquallError):
    """A client that may not connect; ``close_code`` for WebSocket and TCP clients,
    the error's ``status`` for an SSE request."""

    def __init__(self, code: str, message: str, close_code: int) -> None:
        super().__init__(code, message)
        self.close_code = close_code


@dataclass
class Request:
    """What a transport knows of a client when it connects."""

    ip: str
    token: str | None = None  # ?token=
    authorization: str | None = None  # the Authorization header
    origin: str | None = None
    host: str = ""
    headers: Mapping[str, str] | None = None  # for the authorization webhook
    query: Mapping[str, Sequence[str]] | None = None


class Admitted:
    """An admitted client: its grant and identity, counted until ``release``."""

    __slots__ = ("_node", "counted_ip", "info", "rights")

    def __init__(self, node: Node, rights: Grant, info: signals.ClientInfo,
                 counted_ip: str | None) -> None:
        self._node = node
        self.rights = rights
        self.info = info
        self.counted_ip = counted_ip

    def release(self) -> None:
        """Count the client out of the connection limits (once)."""
        if self.counted_ip is not None:
            self._node.limits.connections.release(self.counted_ip)
            self.counted_ip = None


async def admit(node: Node, request: Request) -> Admitted:
    """Admit a client or raise ``Refused``."""
    if request.origin is not None and not node.auth.origin_allowed(request.origin, request.host):
        raise Refused("forbidden", "origin not allowed", CLOSE_FORBIDDEN)
    try:
        rights = node.auth.ws_grant(request.token, request.authorization)
    except SquallError as exc:
        raise Refused(exc.code, exc.message, CLOSE_UNAUTHORIZED) from None
    refused = node.limits.connections.admit(request.ip)
    if refused is not None:
        raise Refused("rate_limited", refused, CLOSE_RATE_LIMITED)
    info = signals.ClientInfo(id=node.new_client_id(), sub=rights.sub, ip=request.ip,
                              info=rights.info, connected_at=int(time.time() * 1000))
    admitted = Admitted(node, rights, info, request.ip)
    hook = node.auth_hook
    if hook is None:
        return admitted
    try:
        admitted.rights = await hook.connect(info, rights, request.headers or {},
                                             request.query or {})
        admitted.info = replace(info, sub=admitted.rights.sub, info=admitted.rights.info)
    except SquallError as exc:
        admitted.release()
        raise Refused("forbidden", exc.message, CLOSE_FORBIDDEN) from None
    except BaseException:
        admitted.release()
        raise
    return admitted
