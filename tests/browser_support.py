"""Headless Chromium for the browser tests, driven by Playwright's async API.

``Chromium`` launches one browser per test on the running asyncio loop (the test's
IOLoop), so the pytest-tornado server keeps serving while a test waits on the page.
Every page it opens fakes its timers with Playwright's clock (time still flows until
a test jumps it), records uncaught page errors, and logs each WebSocket it opens with
the frames sent and received.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page, Playwright, WebSocket

T = TypeVar("T")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
WAIT_MS = 10_000
# fast enough for tests; resetAfter keeps the attempt count for the whole test
FAST_BACKOFF = {"initial": 20, "max": 100, "factor": 2, "resetAfter": 600_000}

# Test pages that load squall.js one way or the other (served by the test app).
LOADERS = {
    "classic": '<script src="/static/squall.js"></script>'
               "<script>window.SquallUnderTest = window.Squall;</script>",
    "module": '<script type="module">import Squall, {Squall as Named} from "/static/squall.mjs";'
              "window.SquallUnderTest = Squall; window.namedExport = Named;</script>",
}

# Starts window.client with the options given, recording everything it reports.
# follow(topic, options) subscribes and records the events into record.events[topic];
# record.journal has every event and gap of every subscription, in the order reported.
START_CLIENT = """({topics, options, tokens}) => {
  const record = {events: {}, states: [], transitions: [], closes: [], recoveryFailed: [],
                  callbacks: [], tokenRequests: [], errors: [], journal: []};
  const settings = Object.assign({}, options);
  if (tokens) {
    settings.getToken = (why) => {
      record.tokenRequests.push(why);
      return Promise.resolve(tokens.shift() || null);
    };
  }
  const client = new window.SquallUnderTest(settings.url, settings);
  client.on("state", (change) => {
    record.states.push(change.state);
    record.transitions.push(change);
  });
  client.on("close", (close) => record.closes.push(close));
  client.on("recovery_failed", (failure) => record.recoveryFailed.push(failure));
  client.on("error", (error) => record.errors.push(error.code || String(error)));
  window.client = client;
  window.record = record;
  window.subs = {};
  window.follow = (topic, extra) => {
    record.events[topic] = [];
    const options = Object.assign({onRecoveryFailed: (f) => {
      record.callbacks.push(f);
      record.journal.push(`gap ${topic}`);
    }}, extra);
    subs[topic] = client.subscribe(topic, (event) => {
      record.events[topic].push(event);
      record.journal.push(`${topic} ${event.data}`);
    }, options);
    return subs[topic].ready;
  };
  for (const topic of topics) follow(topic);
}"""


def harness_html(loading: str) -> str:
    return f"<!doctype html><meta charset=utf-8><title>harness</title>{LOADERS[loading]}"


def harness_app(node: Any) -> Any:
    """The node's application plus the test pages that load squall.js
    (``/harness/classic.html``, ``/harness/module.html``), served by the node itself:
    Chromium refuses a WebSocket to loopback from a page that did not come from it."""
    from tornado.web import RequestHandler

    from server.app import make_app

    class HarnessHandler(RequestHandler):
        def get(self, loading: str) -> None:
            self.set_header("Content-Type", "text/html; charset=utf-8")
            self.write(harness_html(loading))

    application = make_app(node)
    application.add_handlers(r".*", [(r"/harness/(classic|module)\.html", HarnessHandler)])
    return application


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright)"
    if chromium_executable() is None:
        return "no chromium executable on PATH (apt-get install -y chromium)"
    return None


def chromium_executable() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def require_browser() -> str:
    """The Chromium executable; skips loudly without one, and fails under CI."""
    missing = missing_browser()
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests cannot run in CI: {missing}", pytrace=False)
        pytest.skip(f"BROWSER TESTS SKIPPED: {missing}")
    executable = chromium_executable()
    assert executable is not None
    return executable


@dataclass
class SocketLog:
    """One WebSocket a page opened, and its text frames, parsed."""

    socket: WebSocket
    sent: list[Any] = field(default_factory=list)
    received: list[Any] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.socket.url

    def sent_of_type(self, kind: str) -> list[dict[str, Any]]:
        return [frame for frame in self.sent if frame.get("type") == kind]

    def received_of_type(self, kind: str) -> list[dict[str, Any]]:
        return [frame for frame in self.received if frame.get("type") == kind]


class Tab:
    """A page and the WebSockets it opened (reported by Playwright as they happen)."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.sockets: list[SocketLog] = []
        self._changed = asyncio.Event()
        page.on("websocket", self._opened)

    def _opened(self, socket: WebSocket) -> None:
        log = SocketLog(socket)
        self.sockets.append(log)
        socket.on("framesent", lambda payload: self._record(log.sent, payload))
        socket.on("framereceived", lambda payload: self._record(log.received, payload))
        self._changed.set()

    def _record(self, frames: list[Any], payload: str | bytes) -> None:
        frames.append(_parsed(payload))
        self._changed.set()

    async def until(self, check: Callable[[], T]) -> T:
        """The first truthy ``check()``, re-checked as sockets and frames are reported."""

        async def poll() -> T:
            while not (result := check()):
                self._changed.clear()
                await self._changed.wait()
            return result

        return await asyncio.wait_for(poll(), WAIT_MS / 1000)

    async def eval(self, expression: str, arg: Any = None) -> Any:
        """Evaluate in the page; a returned promise must settle within the wait limit."""
        return await asyncio.wait_for(self.page.evaluate(expression, arg), WAIT_MS / 1000)

    async def wait(self, expression: str, arg: Any = None) -> None:
        await self.page.wait_for_function(expression, arg=arg, polling=20, timeout=WAIT_MS)

    async def open_harness(self, origin: str, loading: str = "classic") -> None:
        """Load a test page that loads squall.js as a classic script or as a module."""
        await self.page.goto(f"{origin}/harness/{loading}.html")
        await self.wait("window.SquallUnderTest !== undefined")

    async def start_client(self, origin: str, topics: tuple[str, ...] = (),
                           tokens: list[str] | None = None, **options: Any) -> None:
        """window.client on <origin>/v1/ws, fast backoff unless told otherwise."""
        options = {"url": f"{origin.replace('http', 'ws', 1)}/v1/ws", "backoff": FAST_BACKOFF,
                   **options}
        await self.eval(START_CLIENT, {"topics": list(topics), "options": options,
                                       "tokens": tokens})

    async def wait_open(self, times: int = 1) -> None:
        """Until the client has been open ``times`` times (the first connect counts)."""
        await self.wait("(n) => record.states.filter((s) => s === 'open').length >= n", times)

    async def all_subscribed(self) -> Any:
        return await self.eval("Promise.all(Object.values(subs).map((s) => s.ready))")

    async def assert_stays_closed(self) -> None:
        """Jump the page's clock past every backoff and timeout: nothing may reconnect."""
        states = await self.eval("record.states.length")
        sockets = len(self.sockets)
        await self.page.clock.run_for(10 * 60 * 1000)
        assert await self.eval("[client.state, record.states.length]") == ["closed", states]
        assert len(self.sockets) == sockets


class Chromium:
    """One headless Chromium per test; ``close`` ends it. Use on the test's IOLoop."""

    def __init__(self, executable: str) -> None:
        self.executable = executable
        self.playwright: Playwright | None = None
        self.browser: Browser | None = None
        self.page_errors: list[str] = []

    async def tab(self, width: int = 1280, height: int = 800) -> Tab:
        if self.browser is None:
            from playwright.async_api import async_playwright

            self.playwright = await async_playwright().start()
            self.browser = await self.playwright.chromium.launch(
                executable_path=self.executable, args=FLAGS)
        context = await self.browser.new_context(viewport={"width": width, "height": height})
        page = await context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        await page.clock.install()
        return Tab(page)

    async def close(self) -> None:
        if self.browser is not None:
            await self.browser.close()
        if self.playwright is not None:
            await self.playwright.stop()


def _parsed(payload: str | bytes) -> Any:
    return json.loads(payload)
