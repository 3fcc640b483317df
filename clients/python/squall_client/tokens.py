"""Subscriber and publisher tokens: JWTs with the claims docs/protocol.md describes."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import jwt


def mint_token(secret: str | bytes, *, sub: str, subscribe: Sequence[str] = (),
               publish: Sequence[str] = (), ttl: float = 3600,
               info: Mapping[str, Any] | None = None, algorithm: str = "HS256",
               claims: Mapping[str, Any] | None = None) -> str:
    """A JWT for ``sub`` that Squall accepts: it may subscribe to the ``subscribe``
    patterns and publish to the ``publish`` patterns for ``ttl`` seconds.

    ``secret`` is the server's ``--jwt-secret`` for HS256, or a PEM private key whose
    public half is the server's ``--jwt-public-key`` (``algorithm="RS256"`` or
    ``"ES256"``; needs ``cryptography``). ``info`` (at most 1 KiB as JSON) is shown in
    presence entries and webhooks; ``claims`` are added as they are.
    """
    if ttl <= 0:
        raise ValueError("ttl must be positive")
    now = int(time.time())
    grant: dict[str, Any] = {"subscribe": list(subscribe), "publish": list(publish)}
    if info is not None:
        grant["info"] = dict(info)
    payload = {**(claims or {}), "sub": sub, "iat": now, "exp": now + int(ttl),
               "squall": grant}
    return jwt.encode(payload, secret, algorithm=algorithm)
