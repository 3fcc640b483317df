"""The authorization webhook against a real HTTP receiver: allow, deny, fail closed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port
from tornado.web import Application, RequestHandler

from server.auth import OPEN, Forbidden, Grant
from server.authhook import AuthHook
from server.signals import ClientInfo
from server.webhooks import verify_signature

SECRET = "hook-secret"
CLIENT = ClientInfo(id="c-1", sub=None, ip="127.0.0.1")


class Backend:
    """A team's backend: answers each question with the next planned reply."""

    def __init__(self) -> None:
        self.questions: list[dict[str, Any]] = []
        self.replies: list[tuple[int, Any]] = []
        self.hang = asyncio.Event()

    def handler(self) -> type[RequestHandler]:
        backend = self

        class Answer(RequestHandler):
            async def post(self) -> None:
                assert verify_signature(SECRET, self.request.body,
                                        self.request.headers.get("X-Squall-Signature"))
                backend.questions.append(json.loads(self.request.body))
                status, reply = backend.replies.pop(0)
                if reply == "hang":
                    await backend.hang.wait()
                    return
                self.set_status(status)
                self.finish(reply if isinstance(reply, str) else json.dumps(reply))

        return Answer


@pytest.fixture
def backend(io_loop: Any) -> Iterator[tuple[Backend, str]]:
    backend = Backend()
    sock, port = bind_unused_port()
    server = HTTPServer(Application([(r"/authorize", backend.handler())]))
    server.add_sockets([sock])
    yield backend, f"http://127.0.0.1:{port}/authorize"
    backend.hang.set()
    server.stop()


def hook(url: str, timeout: float = 2.0) -> AuthHook:
    return AuthHook(url, SECRET, timeout, node="n1")


@pytest.mark.gen_test(timeout=10)
async def test_connect_allowed_with_rights_from_the_backend(backend):
    server, url = backend
    server.replies.append((200, {"allow": True, "sub": "alice", "subscribe": ["chat.*"],
                                 "publish": ["chat.room1"]}))
    grant = await hook(url).connect(CLIENT, OPEN, {"Cookie": "session=s1", "Origin": "o"},
                                    {"room": ["42"], "token": ["secret-token"]})
    assert (grant.sub, grant.subscribe, grant.publish) == ("alice", ("chat.*",), ("chat.room1",))
    [question] = server.questions
    assert question == {"action": "connect", "node": "n1", "client": CLIENT.as_dict(),
                        "request": {"cookie": "session=s1", "origin": "o",
                                    "query": {"room": ["42"]}}}


@pytest.mark.gen_test(timeout=10)
async def test_connect_allowed_keeps_the_grant_when_the_backend_names_no_rights(backend):
    server, url = backend
    server.replies.append((200, {"allow": True}))
    grant = Grant(sub="bob", subscribe=("a.>",))
    assert await hook(url).connect(CLIENT, grant, {}, {}) is grant


@pytest.mark.gen_test(timeout=10)
@pytest.mark.parametrize(("status", "reply", "message"), [
    (200, {"allow": False, "reason": "banned"}, "banned"),
    (200, {"allow": False}, "connect denied"),
    (500, {"allow": True}, "unavailable"),
    (403, {"allow": True}, "unavailable"),
    (200, "not json", "unavailable"),
    (200, {"allow": "yes"}, "unavailable"),
    (200, {"allow": True, "subscribe": ["a..b"]}, "bad pattern"),
])
async def test_connect_denied_or_failed_closed(backend, status, reply, message):
    server, url = backend
    server.replies.append((status, reply))
    with pytest.raises(Forbidden, match=message):
        await hook(url).connect(CLIENT, OPEN, {}, {})


@pytest.mark.gen_test(timeout=10)
async def test_a_hanging_backend_fails_closed_within_the_timeout(backend):
    server, url = backend
    server.replies.append((200, "hang"))
    started = asyncio.get_running_loop().time()
    with pytest.raises(Forbidden, match="unavailable"):
        await hook(url, timeout=0.3).connect(CLIENT, OPEN, {}, {})
    assert asyncio.get_running_loop().time() - started < 2


@pytest.mark.gen_test(timeout=10)
async def test_an_unreachable_backend_fails_closed(io_loop):
    sock, port = bind_unused_port()
    sock.close()  # nothing listens there
    with pytest.raises(Forbidden, match="unavailable"):
        await hook(f"http://127.0.0.1:{port}/authorize").connect(CLIENT, OPEN, {}, {})


@pytest.mark.gen_test(timeout=10)
async def test_subscribe_asks_only_beyond_the_grant(backend):
    server, url = backend
    grant = Grant(sub="carol", subscribe=("news.>",))
    checker = hook(url)
    await checker.subscribe(CLIENT, grant, "news.today")
    assert server.questions == []
    server.replies.extend([(200, {"allow": True}), (200, {"allow": False})])
    await checker.subscribe(CLIENT, grant, "orders.eu")
    with pytest.raises(Forbidden):
        await checker.subscribe(CLIENT, grant, "orders.us")
    assert [q["topic"] for q in server.questions] == ["orders.eu", "orders.us"]
    assert (checker.failures, checker.denials) == (0, 1)
