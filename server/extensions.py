"""Extension points wired from settings: hook modules, webhooks, the authorization hook.

Everything here is checked before the server listens, so a bad hook module or a bad
webhook table stops the start with one line naming it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import fields
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric

from config.settings import Settings, SettingsError
from server import signals
from server.authhook import AuthHook
from server.webhooks import WebhookDispatcher, WebhookEndpoint

_ENDPOINT_KEYS = {spec.name for spec in fields(WebhookEndpoint)}
_REQUIRED_KEYS = ("url", "secret", "signals")


def load_hooks(modules: Sequence[str]) -> None:
    """Import each hook module; importing it connects its receivers."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any error in user code stops the start
            raise SettingsError(f"setting hooks: module {name!r} failed to import: "
                                f"{type(exc).__name__}: {exc}") from None


def webhook_endpoints(tables: Sequence[Mapping[str, Any]],
                      origin: str | None = None) -> list[WebhookEndpoint]:
    """The ``[[webhooks]]`` tables of the settings as endpoints; ``SettingsError`` if bad,
    naming the table and, when given, where the tables came from (``origin``)."""
    endpoints = []
    for index, table in enumerate(tables):
        where = f"setting webhooks[{index}]" + (f" (from {origin})" if origin else "")
        if not isinstance(table, Mapping):
            raise SettingsError(f"{where} must be a table with url, secret and signals")
        unknown = sorted(set(table) - _ENDPOINT_KEYS)
        if unknown:
            raise SettingsError(f"{where} has unknown keys {unknown}; known: "
                                f"{sorted(_ENDPOINT_KEYS)}")
        missing = [key for key in _REQUIRED_KEYS if key not in table]
        if missing:
            raise SettingsError(f"{where} lacks {' and '.join(missing)}: a [[webhooks]] "
                                "table needs url, secret and signals")
        if not isinstance(table["signals"], list | tuple):
            raise SettingsError(f"{where}: signals must be a list, such as "
                                '["subscribed", "unsubscribed"]')
        try:
            endpoints.append(WebhookEndpoint(**table))
        except TypeError:
            raise SettingsError(f"{where} has a value of the wrong type: url and secret are "
                                "text, signals a list, the others numbers") from None
        except ValueError as exc:
            raise SettingsError(f"{where}: {exc}") from None
    return endpoints


def webhook_dispatcher(settings: Settings, node_name: str) -> WebhookDispatcher | None:
    endpoints = webhook_endpoints(settings.webhooks)
    return WebhookDispatcher(endpoints, node_name) if endpoints else None


def auth_hook(settings: Settings, node_name: str) -> AuthHook | None:
    if not settings.auth_webhook_url:
        return None
    return AuthHook(settings.auth_webhook_url, settings.auth_webhook_secret,
                    settings.auth_webhook_timeout, node_name)


def prepare(settings: Settings) -> None:
    """Everything that may fail at start, before the server listens."""
    signals.configure(max_queue=settings.signal_queue)
    webhook_endpoints(settings.webhooks)
    load_hooks(settings.hooks)


def extension_metrics(dispatcher: WebhookDispatcher | None,
                      hook: AuthHook | None) -> Iterator[Metric]:
    """Webhook, authorization hook and signal counters, summed (no per-URL labels)."""
    stats = dispatcher.stats if dispatcher is not None else []
    yield CounterMetricFamily("squall_webhook_deliveries", "Webhook deliveries made",
                              value=sum(s.delivered for s in stats))
    yield CounterMetricFamily("squall_webhook_failures", "Webhook attempts that failed",
                              value=sum(s.failed for s in stats))
    yield CounterMetricFamily("squall_webhook_dropped", "Webhook deliveries given up",
                              value=sum(s.dropped for s in stats))
    yield CounterMetricFamily("squall_signal_calls_dropped", "Async receiver calls dropped "
                              "because the signal queue was full",
                              value=sum(signal.dropped for signal in signals.SIGNALS.values()))
    yield CounterMetricFamily("squall_auth_webhook_failures", "Authorization webhook calls "
                              "that failed (and were denied)",
                              value=hook.failures if hook is not None else 0)
