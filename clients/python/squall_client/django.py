"""Squall for Django: publish from views and models, mint subscriber tokens.

Settings (``settings.SQUALL``, a dict; only ``URL`` is required)::

    SQUALL = {
        "URL": "http://127.0.0.1:8888",      # Squall's HTTP API, for publishing
        "API_KEY": "...",                    # a key of the server's --api-keys
        "JWT_SECRET": "...",                 # the server's --jwt-secret, to mint tokens
        "SUBSCRIBE": ["orders.*", "user:{sub}.>"],  # what a user's token may subscribe to
        "PUBLISH": [],                       # ... and publish to
        "TOKEN_TTL": 600,                    # seconds a token is valid
        "WS_URL": "wss://events.example.com/v1/ws",  # what browsers connect to
        "TIMEOUT": 10, "DEADLINE": 30,       # per attempt, and for all retries
    }

In ``SUBSCRIBE`` and ``PUBLISH``, ``{sub}`` stands for the token's subject: by default
the user's primary key (``SUB`` names another attribute of the user, e.g.
``"username"``; its value must be a valid topic segment).

``publish`` sends now (from a request or a task: it blocks until the server
accepted, retrying within ``DEADLINE``). ``publish_on_commit`` sends once the
surrounding transaction commits, never after a rollback; its idempotency key is
made when it is called, so a retry never publishes twice. ``token_view`` answers
``{"token", "url", "expires_in"}`` for the signed-in user (403 for anonymous users):
route it and let the page's squall.js ``getToken`` fetch it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.db import transaction
from django.http import HttpRequest, JsonResponse

from squall_client._wire import BatchEntry, new_key
from squall_client.models import Published
from squall_client.publisher import Publisher
from squall_client.tokens import mint_token

__all__ = ["get_publisher", "publish", "publish_many", "publish_on_commit", "socket_url",
           "subscriber_token", "token_view"]

DEFAULT_TOKEN_TTL = 600


class _Shared:
    """The process's publisher, made on first use."""

    lock = threading.Lock()
    publisher: Publisher | None = None


def _config() -> Mapping[str, Any]:
    config = getattr(settings, "SQUALL", None)
    if not isinstance(config, Mapping) or not config.get("URL"):
        raise ImproperlyConfigured('settings.SQUALL must be a dict with at least "URL", '
                                   'e.g. {"URL": "http://127.0.0.1:8888", "API_KEY": "..."}')
    return config


def get_publisher() -> Publisher:
    """The process's ``Publisher`` for ``settings.SQUALL``, made on first use and shared
    by every thread (made again when the setting changes, as in tests)."""
    with _Shared.lock:
        if _Shared.publisher is None:
            config = _config()
            _Shared.publisher = Publisher(config["URL"], api_key=config.get("API_KEY"),
                                          timeout=float(config.get("TIMEOUT", 10.0)),
                                          deadline=float(config.get("DEADLINE", 30.0)))
        return _Shared.publisher


def _forget_publisher(*, setting: str, **kwargs: Any) -> None:
    if setting != "SQUALL":
        return
    with _Shared.lock:
        if _Shared.publisher is not None:
            _Shared.publisher.close()
        _Shared.publisher = None


setting_changed.connect(_forget_publisher)


def publish(topic: str, data: Any, *, idempotency_key: str | None = None) -> Published:
    """Publish now; raises ``SquallError`` (see ``Publisher.publish``)."""
    return get_publisher().publish(topic, data, idempotency_key=idempotency_key)


def publish_many(events: Iterable[BatchEntry]) -> list[Published]:
    """Publish a batch now (see ``Publisher.publish_many``)."""
    return get_publisher().publish_many(events)


def publish_on_commit(topic: str, data: Any, *, using: str | None = None,
                      robust: bool = False) -> str:
    """Publish once the transaction on ``using`` commits (at once outside of one);
    nothing is sent after a rollback. Returns the idempotency key it will use.

    ``data`` is encoded when the commit comes: pass values, not objects that may
    change meanwhile. A failure after the commit raises from the commit, as Django's
    ``on_commit`` callbacks do; ``robust=True`` logs it instead.
    """
    key = new_key()
    transaction.on_commit(lambda: _publish_committed(topic, data, key), using=using,
                          robust=robust)
    return key


def _publish_committed(topic: str, data: Any, key: str) -> None:
    publish(topic, data, idempotency_key=key)


def subscriber_token(user: Any, *, subscribe: Iterable[str] | None = None,
                     publish: Iterable[str] | None = None, ttl: float | None = None) -> str:
    """A JWT for ``user`` with the configured patterns (or those given), ``{sub}``
    in them replaced by the user's subject."""
    config = _config()
    secret = config.get("JWT_SECRET")
    if not secret:
        raise ImproperlyConfigured('settings.SQUALL["JWT_SECRET"] is needed to mint tokens')
    sub = str(getattr(user, str(config.get("SUB", "pk"))))
    patterns = {
        "subscribe": config.get("SUBSCRIBE", []) if subscribe is None else subscribe,
        "publish": config.get("PUBLISH", []) if publish is None else publish,
    }
    granted = {kind: [pattern.replace("{sub}", sub) for pattern in found]
               for kind, found in patterns.items()}
    return mint_token(secret, sub=sub, subscribe=granted["subscribe"],
                      publish=granted["publish"], ttl=_ttl(config) if ttl is None else ttl)


def token_view(request: HttpRequest) -> JsonResponse:
    """``GET``: ``{"token", "url", "expires_in"}`` for the signed-in user; 403 for an
    anonymous one. Never cached."""
    if request.method != "GET":
        response = JsonResponse({"error": {"code": "method_not_allowed",
                                           "message": "use GET"}}, status=405)
        response["Allow"] = "GET"
    elif not request.user.is_authenticated:
        response = JsonResponse({"error": {"code": "forbidden",
                                           "message": "sign in to subscribe"}}, status=403)
    else:
        config = _config()
        response = JsonResponse({"token": subscriber_token(request.user),
                                 "url": socket_url(config), "expires_in": _ttl(config)})
    response["Cache-Control"] = "no-store"
    return response


def socket_url(config: Mapping[str, Any] | None = None) -> str:
    """Where browsers connect: ``WS_URL``, else ``URL`` with ws(s):// and ``/v1/ws``."""
    config = config or _config()
    if config.get("WS_URL"):
        return str(config["WS_URL"])
    url = str(config["URL"]).rstrip("/")
    if url.startswith("http"):
        url = "ws" + url[len("http"):]
    return url + "/v1/ws"


def _ttl(config: Mapping[str, Any]) -> int:
    return int(config.get("TOKEN_TTL", DEFAULT_TOKEN_TTL))
