"""squall.js in real Chromium against a node whose Redis goes away and comes back."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from config.settings import Settings
from tests.test_browser import app, client_tab, http_publish, seen

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]
pytestmark = [pytest.mark.browser, pytest.mark.redis, pytest.mark.gen_test(timeout=90)]
__all__ = ["app"]  # a fixture used here


@pytest.fixture
def squall_settings(redis_url: str) -> Settings:
    return Settings(broker=redis_url, ping_interval=0, broker_timeout=0.5)


async def test_a_subscribe_refused_while_the_broker_is_away_is_retried(
        chromium, origin, node, publish, redis_server: RedisServer):
    tab = await client_tab(chromium, origin)
    await tab.start_client(origin)
    await tab.wait_open()
    redis_server.kill()
    try:
        await tab.eval("follow('later'), null")  # not awaited: it cannot be ready yet
        await tab.until(lambda: any(
            frame.get("code") == "broker_unavailable"
            for frame in tab.sockets[0].received_of_type("error")))
    finally:
        redis_server.start()
    await tab.all_subscribed()
    event = await http_publish(publish, "later", "arrived")
    await tab.wait("record.events.later.length === 1")
    assert seen(await tab.eval("record.events.later")) == [event]
    assert len(tab.sockets[0].sent_of_type("subscribe")) >= 2  # asked again, same socket
    assert await tab.eval("record.errors") == []
