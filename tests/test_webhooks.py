"""Webhooks: signed JSON POSTs to real HTTP receivers, retries, isolation of endpoints."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from tornado.httputil import HTTPHeaders
from tornado.ioloop import IOLoop
from tornado.testing import bind_unused_port
from tornado.web import Application, RequestHandler

from server import signals
from server.signals import ClientInfo
from server.webhooks import (
    WebhookDispatcher,
    WebhookEndpoint,
    sign,
    verify_signature,
    webhook_body,
)

SECRET = "s3cret-for-tests"
CLIENT = ClientInfo(id="c-8f2a", sub="alice", ip="203.0.113.7")
FAST_RETRY = {"backoff_base": 0.001, "backoff_cap": 0.005}


@dataclass
class Hit:
    headers: HTTPHeaders
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """What the test server was sent, and what it answers.

    ``/hooks/<digits>`` answers that status; ``/hooks/hang`` waits for ``release``;
    a name with scripted ``answers`` pops them in turn; anything else answers 200.
    """

    def __init__(self) -> None:
        self.hits: dict[str, list[Hit]] = {}
        self.answers: dict[str, list[int]] = {}
        self.release = asyncio.Event()
        self.quiet = asyncio.Event()
        self.quiet.set()
        self._hanging = 0
        self._changed = asyncio.Event()

    def record(self, name: str, hit: Hit) -> None:
        self.hits.setdefault(name, []).append(hit)
        self._changed.set()

    def answer(self, name: str) -> int:
        if self.answers.get(name):
            return self.answers[name].pop(0)
        return int(name) if name.isdigit() else 200

    async def hang(self) -> None:
        self._hanging += 1
        self.quiet.clear()
        try:
            await self.release.wait()
        finally:
            self._hanging -= 1
            if not self._hanging:
                self.quiet.set()

    def count(self, name: str) -> int:
        return len(self.hits.get(name, []))

    async def wait_hits(self, name: str, count: int, timeout: float = 5) -> list[Hit]:
        async with asyncio.timeout(timeout):
            while self.count(name) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.hits[name]


class HookHandler(RequestHandler):
    def initialize(self, receiver: Receiver) -> None:
        self.receiver = receiver

    async def post(self, name: str) -> None:
        self.receiver.record(name, Hit(self.request.headers, self.request.body))
        if name == "hang":
            await self.receiver.hang()
        self.set_status(self.receiver.answer(name))


@pytest.fixture
def receiver() -> Receiver:
    return Receiver()


@pytest.fixture
def app(receiver: Receiver) -> Application:
    return Application([(r"/hooks/(\w+)", HookHandler, {"receiver": receiver})])


@pytest.fixture
def url(http_server: object, http_port: int, receiver: Receiver,
        io_loop: IOLoop) -> Iterator[Callable[[str], str]]:
    """The URL of a hook on the test server; hanging hooks are let go at the end."""
    yield lambda name: f"http://127.0.0.1:{http_port}/hooks/{name}"
    receiver.release.set()
    io_loop.run_sync(lambda: asyncio.wait_for(receiver.quiet.wait(), 5))


@pytest.fixture
def dispatcher(url: Callable[[str], str],
               io_loop: IOLoop) -> Iterator[Callable[..., WebhookDispatcher]]:
    """Makes started dispatchers and closes them at the end."""
    made: list[WebhookDispatcher] = []

    def make(*endpoints: WebhookEndpoint, node: str = "squall-1") -> WebhookDispatcher:
        made.append(WebhookDispatcher(endpoints, node))
        made[-1].start()
        return made[-1]

    yield make
    for each in made:
        io_loop.run_sync(functools.partial(each.close, 0.1))


def endpoint(url: str, *names: str, **options: Any) -> WebhookEndpoint:
    return WebhookEndpoint(url=url, secret=SECRET, signals=names or ("subscribed",), **options)


def webhook_logs(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "squall.webhooks" and r.levelno == level]


def expected_signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@pytest.mark.gen_test(timeout=10)
async def test_delivery_body_and_signature(dispatcher: Callable[..., WebhookDispatcher],
                                           url: Callable[[str], str],
                                           receiver: Receiver) -> None:
    hooks = dispatcher(endpoint(url("ok")))
    before = int(time.time() * 1000)
    signals.subscribed.send(None, client=CLIENT, topic="orders.*")
    [hit] = await receiver.wait_hits("ok", 1)
    assert hit.headers["Content-Type"] == "application/json"
    assert hit.headers["X-Squall-Signature"] == expected_signature(SECRET, hit.body)
    assert len(hit.headers["X-Squall-Delivery"]) == 32
    body = hit.json()
    assert before <= body.pop("ts") <= int(time.time() * 1000)
    assert body == {"signal": "subscribed", "node": "squall-1",
                    "client": {"id": "c-8f2a", "sub": "alice", "ip": "203.0.113.7",
                               "info": None},
                    "topic": "orders.*", "reason": None}
    assert await hooks.join(5)
    assert (hooks.stats[0].delivered, hooks.stats[0].failed, hooks.stats[0].dropped) == (1, 0, 0)


@pytest.mark.gen_test(timeout=10)
async def test_each_endpoint_signs_with_its_own_secret_and_hears_only_its_signals(
        dispatcher: Callable[..., WebhookDispatcher], url: Callable[[str], str],
        receiver: Receiver) -> None:
    hooks = dispatcher(
        endpoint(url("subs"), "subscribed", "unsubscribed"),
        WebhookEndpoint(url("conns"), "other-secret", ("client_connected",)))
    signals.client_connected.send(None, client=CLIENT)
    signals.unsubscribed.send(None, client=CLIENT, topic="a")
    signals.event_published.send(None, event=SampleEvent("a", "e-1", 1, None))
    assert await hooks.join(5)
    assert [h.json()["signal"] for h in receiver.hits["subs"]] == ["unsubscribed"]
    assert [h.json()["signal"] for h in receiver.hits["conns"]] == ["client_connected"]
    [conns] = receiver.hits["conns"]
    assert conns.headers["X-Squall-Signature"] == expected_signature("other-secret", conns.body)


@pytest.mark.gen_test(timeout=10)
async def test_5xx_is_retried_then_dropped_with_a_warning(
        dispatcher: Callable[..., WebhookDispatcher], url: Callable[[str], str],
        receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    hooks = dispatcher(endpoint(url("500"), max_attempts=3, **FAST_RETRY))
    signals.subscribed.send(None, client=CLIENT, topic="t")
    assert await hooks.join(5)
    hits = receiver.hits["500"]
    assert len(hits) == 3
    assert len({(h.body, h.headers["X-Squall-Delivery"]) for h in hits}) == 1
    assert (hooks.stats[0].delivered, hooks.stats[0].failed, hooks.stats[0].dropped) == (0, 3, 1)
    [warning] = webhook_logs(caplog, logging.WARNING)
    assert "after 3 attempt(s)" in warning and "answered 500" in warning
    assert all(SECRET not in r.getMessage() for r in caplog.records)


@pytest.mark.gen_test(timeout=10)
async def test_a_retry_that_succeeds_counts_as_delivered(
        dispatcher: Callable[..., WebhookDispatcher], url: Callable[[str], str],
        receiver: Receiver) -> None:
    receiver.answers["flaky"] = [503, 500]
    hooks = dispatcher(endpoint(url("flaky"), **FAST_RETRY))
    signals.subscribed.send(None, client=CLIENT, topic="t")
    assert await hooks.join(5)
    assert receiver.count("flaky") == 3
    assert (hooks.stats[0].delivered, hooks.stats[0].failed, hooks.stats[0].dropped) == (1, 2, 0)


@pytest.mark.parametrize(("status", "attempts"), [
    (502, 2), (503, 2), (408, 2), (429, 2),
    (400, 1), (401, 1), (404, 1), (410, 1), (302, 1),
])
@pytest.mark.gen_test(timeout=10)
async def test_which_answers_are_retried(
        dispatcher: Callable[..., WebhookDispatcher], url: Callable[[str], str],
        receiver: Receiver, status: int, attempts: int) -> None:
    hooks = dispatcher(endpoint(url(str(status)), max_attempts=2, **FAST_RETRY))
    signals.subscribed.send(None, client=CLIENT, topic="t")
    assert await hooks.join(5)
    assert receiver.count(str(status)) == attempts
    assert (hooks.stats[0].failed, hooks.stats[0].dropped) == (attempts, 1)


@pytest.mark.gen_test(timeout=10)
async def test_connection_refused_is_retried_then_dropped(
        dispatcher: Callable[..., WebhookDispatcher], caplog: pytest.LogCaptureFixture) -> None:
    sock, port = bind_unused_port()
    sock.close()
    hooks = dispatcher(endpoint(f"http://127.0.0.1:{port}/gone", max_attempts=2, **FAST_RETRY))
    signals.subscribed.send(None, client=CLIENT, topic="t")
    assert await hooks.join(5)
    assert (hooks.stats[0].failed, hooks.stats[0].dropped) == (2, 1)
    [warning] = webhook_logs(caplog, logging.WARNING)
    assert "after 2 attempt(s)" in warning


@pytest.mark.gen_test(timeout=10)
async def test_an_endpoint_that_does_not_answer_times_out(
        dispatcher: Callable[..., WebhookDispatcher], url: Callable[[str], str],
        receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    hooks = dispatcher(endpoint(url("hang"), timeout=0.2, max_attempts=1))
    signals.subscribed.send(None, client=CLIENT, topic="t")
    assert await hooks.join(5)
    assert receiver.count("hang") == 1
    assert (hooks.stats[0].failed, hooks.stats[0].dropped) == (1, 1)
    [warning] = webhook_logs(caplog, logging.WARNING)
    assert "Timeout" in warning


@pytest.mark.gen_test(timeout=10)
async def test_a_hanging_endpoint_does_not_delay_another(
        dispatcher: Callable[..., WebhookDispatcher], url: Callable[[str], str],
        receiver: Receiver) -> None:
    hooks = dispatcher(endpoint(url("hang"), timeout=30), endpoint(url("ok")))
    for n in range(3):
        signals.subscribed.send(None, client=CLIENT, topic=f"t{n}")
    delivered = await receiver.wait_hits("ok", 3)
    assert [h.json()["topic"] for h in delivered] == ["t0", "t1", "t2"]
    assert receiver.count("hang") == 1
    assert not await hooks.join(0.05)
    await hooks.close(0.05)
    assert (hooks.stats[0].delivered, hooks.stats[0].dropped) == (0, 3)
    assert (hooks.stats[1].delivered, hooks.stats[1].dropped) == (3, 0)
    assert not signals.subscribed.has_receivers


@pytest.mark.gen_test(timeout=10)
async def test_a_full_endpoint_queue_drops_and_counts(
        dispatcher: Callable[..., WebhookDispatcher], url: Callable[[str], str],
        caplog: pytest.LogCaptureFixture) -> None:
    hooks = dispatcher(endpoint(url("hang"), timeout=30, max_queue=2))
    for n in range(5):
        signals.subscribed.send(None, client=CLIENT, topic=f"t{n}")
    assert hooks.stats[0].dropped == 3
    [warning] = webhook_logs(caplog, logging.WARNING)
    assert "full" in warning


@dataclass(frozen=True)
class SampleEvent:
    topic: str
    id: str
    ts: int
    data: Any


BASE = {"client": CLIENT.as_dict(), "topic": None, "reason": None}


@pytest.mark.parametrize(("signal", "kwargs", "expected"), [
    ("client_connected", {"client": CLIENT}, BASE),
    ("client_disconnected", {"client": CLIENT, "code": 1001, "reason": "shutdown"},
     {**BASE, "reason": "shutdown", "code": 1001}),
    ("client_disconnected", {"client": CLIENT, "code": None, "reason": None},
     {**BASE, "code": None}),
    ("subscribed", {"client": CLIENT, "topic": "orders.*"}, {**BASE, "topic": "orders.*"}),
    ("unsubscribed", {"client": CLIENT, "topic": "a.b"}, {**BASE, "topic": "a.b"}),
    ("event_published", {"event": SampleEvent("a.b", "k-1", 1763720000123, {"x": [1]})},
     {"client": None, "topic": "a.b", "reason": None,
      "event": {"topic": "a.b", "id": "k-1", "ts": 1763720000123, "data": {"x": [1]}}}),
    ("slow_consumer_closed", {"client": CLIENT, "queued_bytes": 1048577},
     {**BASE, "queued_bytes": 1048577}),
])
def test_webhook_body(signal: str, kwargs: dict[str, Any], expected: dict[str, Any]) -> None:
    assert webhook_body(signal, "n1", 7, kwargs) == {
        "signal": signal, "ts": 7, "node": "n1", **expected}


def test_signatures() -> None:
    body = b'{"signal":"subscribed"}'
    assert sign(SECRET, body) == expected_signature(SECRET, body)
    assert verify_signature(SECRET, body, expected_signature(SECRET, body))
    assert not verify_signature(SECRET, body + b" ", expected_signature(SECRET, body))
    assert not verify_signature("other", body, expected_signature(SECRET, body))
    assert not verify_signature(SECRET, body, None)


@pytest.mark.parametrize(("options", "problem"), [
    ({"url": "ftp://host/x"}, "http:// or https://"),
    ({"url": "/relative"}, "http:// or https://"),
    ({"secret": ""}, "secret must not be empty"),
    ({"signals": ()}, "at least one signal"),
    ({"signals": ("subscribed", "nope")}, "unknown signals ['nope']"),
    ({"timeout": 0}, "timeout must be positive"),
    ({"max_queue": 0}, "max_queue"),
    ({"max_attempts": 0}, "max_attempts"),
    ({"backoff_base": -1}, "backoff_base"),
    ({"backoff_base": 2, "backoff_cap": 1}, "backoff_cap"),
])
def test_endpoint_validation(options: dict[str, Any], problem: str) -> None:
    settings = {"url": "https://hooks.example/squall", "secret": SECRET,
                "signals": ("subscribed",), **options}
    with pytest.raises(ValueError, match=r"^webhook .*: ") as error:
        WebhookEndpoint(**settings)
    assert problem in str(error.value)
    assert SECRET not in str(error.value)


def test_endpoint_keeps_secrets_out_of_repr_and_urls_for_logs() -> None:
    hook = WebhookEndpoint("https://user:pw@hooks.example:8443/in?token=t#f", SECRET,
                           ["subscribed"])  # type: ignore[arg-type]
    assert hook.signals == ("subscribed",)
    assert hook.safe_url == "https://hooks.example:8443/in"
    assert SECRET not in repr(hook)


def test_backoff_is_full_jitter_under_the_cap() -> None:
    hook = endpoint("https://hooks.example/x", backoff_base=1, backoff_cap=5)
    for attempt, ceiling in [(1, 1), (2, 2), (3, 4), (4, 5), (10, 5)]:
        delays = [hook.backoff(attempt) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2
