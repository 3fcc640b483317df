"""squall_client.django with real Django (the example shop, sqlite) and a real server.

The example project under examples/django is what runs: its model's post_save
receiver publishes on commit, its token view mints subscriber tokens.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest

from squall_client import AsyncPublisher, Event, Subscriber, SubscriptionError
from tests.browser_support import Chromium, require_browser
from tests.client.support import data_of, free_port, history, run, take, ws_url
from tests.server_process import ROOT, ServerProcess

API_KEY = "django-test-api-key"
SECRET = "django-test-jwt-secret-0123456789abcdef"
EXAMPLE = ROOT / "examples" / "django"


# where the example is served for the browser; the module's Squall allows that origin
SHOP_PORT = free_port()


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Django set up with the example's settings (a fresh sqlite file, migrated), and
    ``SQUALL`` pointing at a server of this module's own."""
    pytest.importorskip("django")
    import django
    from django.core.management import call_command
    from django.test.utils import (
        override_settings,
        setup_test_environment,
        teardown_test_environment,
    )

    database = tmp_path_factory.mktemp("shop") / "shop.sqlite3"
    environment = {"DJANGO_SETTINGS_MODULE": "shop.settings", "SHOP_DATABASE": str(database)}
    previous = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)  # read once, by django.setup(); put back afterwards
    sys.path.insert(0, str(EXAMPLE))
    with ServerProcess("--api-keys", API_KEY, "--jwt-secret", SECRET, "--allowed-origins",
                       f"http://127.0.0.1:{SHOP_PORT}") as server:
        django.setup()
        setup_test_environment()  # the test client's host, an in-memory mail outbox
        call_command("migrate", verbosity=0)
        config = {"URL": server.url, "API_KEY": API_KEY, "JWT_SECRET": SECRET,
                  "SUBSCRIBE": ["orders.*", "user:{sub}.>"], "TOKEN_TTL": 120}
        try:
            with override_settings(SQUALL=config):
                yield server
        finally:
            teardown_test_environment()
            sys.path.remove(str(EXAMPLE))
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def make_user(name: str) -> Any:
    from django.contrib.auth.models import User

    return User.objects.create_user(name, password="secret-password")


def token_for(user: Any) -> str:
    from squall_client.django import subscriber_token

    return subscriber_token(user)


def test_a_saved_order_is_published_once_its_transaction_commits(shop: ServerProcess) -> None:
    from django.db import transaction
    from orders.models import Order

    user = make_user("committer")

    def create_order() -> tuple[int, list[Any]]:
        with transaction.atomic():
            order = Order.objects.create(owner=user, item="tea", quantity=2)
            before_commit = history(shop, "orders.created", API_KEY)
        return order.pk, before_commit

    async def scenario() -> None:
        async with Subscriber(ws_url(shop), token=token_for(user)) as subscriber:
            await subscriber.subscribe("orders.*")
            await subscriber.subscribe(f"user:{user.pk}.orders")
            pk, before_commit = await asyncio.to_thread(create_order)
            assert before_commit == []  # nothing was sent inside the transaction
            items = await take(subscriber, 2)
            expected = {"id": pk, "owner": user.pk, "item": "tea", "quantity": 2,
                        "status": "new"}
            assert data_of(items) == [expected, expected]
            assert {item.topic for item in items if isinstance(item, Event)} == {
                "orders.created", f"user:{user.pk}.orders"}

    run(scenario())


def test_a_rolled_back_order_is_never_published(shop: ServerProcess) -> None:
    from django.db import transaction
    from orders.models import Order

    user = make_user("rollbacker")

    class Abandoned(Exception):
        pass

    def create_and_roll_back() -> None:
        with pytest.raises(Abandoned), transaction.atomic():
            Order.objects.create(owner=user, item="never", quantity=1)
            raise Abandoned

    async def scenario() -> None:
        async with Subscriber(ws_url(shop), token=token_for(user)) as subscriber:
            await subscriber.subscribe("orders.*")
            await asyncio.to_thread(create_and_roll_back)
            async with AsyncPublisher(shop.url, api_key=API_KEY) as publisher:
                await publisher.publish("orders.marker", "after the rollback")
            assert data_of(await take(subscriber, 1)) == ["after the rollback"]
        created = history(shop, "orders.created", API_KEY)
        assert not any(order["item"] == "never" for order in created)

    run(scenario())


def test_publish_and_publish_on_commit_outside_a_transaction(shop: ServerProcess) -> None:
    from squall_client.django import publish, publish_on_commit

    published = publish("django.direct", {"n": 1})
    key = publish_on_commit("django.direct", {"n": 2})  # autocommit: sent at once
    assert published.topic == "django.direct" and len(key) == 32
    assert history(shop, "django.direct", API_KEY) == [{"n": 1}, {"n": 2}]


def test_the_token_view_mints_tokens_for_the_signed_in_user_only(shop: ServerProcess) -> None:
    from django.test import Client

    anonymous = Client().get("/squall/token")
    assert anonymous.status_code == 403
    assert anonymous.json()["error"]["code"] == "forbidden"
    user = make_user("viewer")
    other = make_user("someone-else")
    client = Client()
    client.force_login(user)
    answer = client.get("/squall/token")
    assert answer.status_code == 200 and answer["Cache-Control"] == "no-store"
    body = answer.json()
    assert body["url"] == f"ws://127.0.0.1:{shop.port}/v1/ws" and body["expires_in"] == 120
    assert client.post("/squall/token").status_code == 405

    async def scenario() -> None:
        async with Subscriber(body["url"], token=body["token"]) as subscriber:
            await subscriber.subscribe("orders.*")
            await subscriber.subscribe(f"user:{user.pk}.inbox")
            with pytest.raises(SubscriptionError) as refused:
                await subscriber.subscribe(f"user:{other.pk}.inbox")
            assert refused.value.code == "forbidden"

    run(scenario())


def test_the_example_page_loads_squall_js_from_squall(shop: ServerProcess) -> None:
    from django.test import Client

    client = Client()
    assert client.get("/").status_code == 302  # to the sign-in page
    client.force_login(make_user("page-viewer"))
    page = client.get("/").content.decode()
    assert f'src="http://127.0.0.1:{shop.port}/static/squall.js"' in page
    assert f'new Squall("ws://127.0.0.1:{shop.port}/v1/ws", {{getToken}})' in page


def test_posting_the_form_publishes_after_the_request_transaction(shop: ServerProcess) -> None:
    """The example runs every request in a transaction (ATOMIC_REQUESTS)."""
    from django.test import Client

    user = make_user("form-poster")
    client = Client()
    client.force_login(user)

    async def scenario() -> None:
        async with Subscriber(ws_url(shop), token=token_for(user)) as subscriber:
            await subscriber.subscribe("orders.created")
            answer = await asyncio.to_thread(client.post, "/", {"item": "coffee",
                                                                "quantity": "3"})
            assert answer.status_code == 302
            [event] = await take(subscriber, 1)
            assert isinstance(event, Event)
            assert (event.data["item"], event.data["quantity"]) == ("coffee", 3)

    run(scenario())



class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def served_shop(shop: ServerProcess) -> Iterator[str]:
    """The example served over HTTP (wsgiref, in a thread), as a browser needs it."""
    from django.core.wsgi import get_wsgi_application

    httpd = make_server("127.0.0.1", SHOP_PORT, get_wsgi_application(),
                        handler_class=_QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{SHOP_PORT}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.mark.browser
def test_the_example_page_shows_a_saved_order_live_in_chromium(served_shop: str) -> None:
    """The whole example: a signed-in page loads squall.js from Squall, gets its token
    from the token view, subscribes; an order saved in Django appears on it."""
    from django.test import Client
    from orders.models import Order

    executable = require_browser()
    user = make_user("browser-user")
    signed_in = Client()
    signed_in.force_login(user)
    session = signed_in.cookies["sessionid"].value

    async def scenario() -> None:
        chromium = Chromium(executable)
        try:
            tab = await chromium.tab()
            await tab.page.context.add_cookies([{"name": "sessionid", "value": session,
                                                 "url": served_shop}])
            await tab.page.goto(served_shop + "/")
            await tab.wait("document.getElementById('state').textContent === 'open'")
            await tab.until(lambda: any(log.sent_of_type("subscribe") for log in tab.sockets))
            [socket] = tab.sockets
            await tab.until(lambda: socket.received_of_type("subscribed"))
            await asyncio.to_thread(Order.objects.create, owner=user, item="live tea",
                                    quantity=4)
            await tab.wait("document.querySelector('#orders').textContent"
                           ".includes('4 x live tea (new)')")
            assert chromium.page_errors == []
        finally:
            await chromium.close()

    run(scenario())
