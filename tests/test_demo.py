"""The demo page at ``/`` in a real headless Chromium, against a real node.

What a first visitor sees, at 1280 and at 390 pixels wide: what to do (the README's
curl for this server), the page subscribed to every topic, and the README's curl
arriving without a keystroke. Screenshots go to tests/artifacts/; the assertions are
on what is visible (in the viewport, not hidden), never on pixels.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.browser_support import Chromium, Tab
from tests.markdown_blocks import ROOT, blocks

if TYPE_CHECKING:
    from playwright.async_api import Page

pytestmark = [pytest.mark.browser, pytest.mark.gen_test(timeout=90)]

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
README_ORDER = {"order": 42, "status": "paid"}
SIZES = [(1280, 800, "desktop"), (390, 844, "phone")]


def readme_curl() -> str:
    """The README's quick-start publish, as written there."""
    for block in blocks(ROOT / "README.md"):
        if block.language == "sh" and "/v1/topics/orders.eu/events" in block.text:
            return block.text
    raise AssertionError("the README's quick start has no curl publishing to orders.eu")


async def run_readme_curl(origin: str) -> str:
    """Run it against this test's node, without blocking the node's IOLoop."""
    command = readme_curl().replace("http://127.0.0.1:8888", origin)
    assert origin in command, "the README's curl does not publish to 127.0.0.1:8888"
    process = await asyncio.create_subprocess_exec(
        "bash", "-e", "-c", command, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env={"PATH": "/usr/bin:/bin", "NO_PROXY": "*"})
    output, _ = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, output
    return output.decode()


async def open_demo(chromium: Chromium, origin: str, width: int = 1280, height: int = 800,
                    query: str = "") -> Tab:
    tab = await chromium.tab(width, height)
    await tab.page.goto(f"{origin}/{query}")
    await tab.page.wait_for_selector('#state[data-state="open"]')
    return tab


async def on_screen(page: Page, selector: str) -> bool:
    """Whether the element is visible and its top part lies inside the viewport."""
    element = page.locator(selector)
    if not await element.is_visible():
        return False
    box = await element.bounding_box()
    viewport = page.viewport_size
    assert box is not None and viewport is not None
    return (box["y"] >= 0 and box["y"] + min(box["height"], 40) <= viewport["height"]
            and box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"] + 1)


async def top_of(page: Page, selector: str) -> float:
    box = await page.locator(selector).bounding_box()
    assert box is not None, selector
    return box["y"]


@pytest.mark.parametrize(("width", "height", "name"), SIZES)
async def test_a_first_visitor_sees_what_to_do_and_the_readmes_curl_arrives(
        chromium, origin, width, height, name):
    tab = await open_demo(chromium, origin, width, height)
    page = tab.page
    await page.wait_for_selector('.chip[data-topic=">"]:not(.pending)')
    [subscribe] = await tab.until(lambda: tab.sockets and tab.sockets[0].sent_of_type(
        "subscribe"))
    assert subscribe["topic"] == ">"

    # what to do: the hint stays, with the README's curl for this very server
    assert await on_screen(page, "#log-empty") and await on_screen(page, "#curl-hint")
    hint = await page.inner_text("#curl-hint")
    assert f"{origin}/v1/topics/orders.eu/events" in hint
    assert json.dumps(README_ORDER) in hint
    assert await page.locator("#log li").count() == 0  # nothing pushed the hint away
    assert await on_screen(page, '.chip[data-topic=">"]')
    assert await page.inner_text("#connect") == "Connect" and await page.is_disabled("#connect")
    assert await page.is_enabled("#disconnect")
    assert await page.evaluate("document.documentElement.scrollWidth") <= width
    if width < 820:  # phone: the events come before the forms
        log = await top_of(page, ".area-log")
        assert log < await top_of(page, ".area-publish")
        assert log < await top_of(page, ".area-connection")
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=ARTIFACTS / f"demo-{name}-first-visit.png")

    # the README's curl, typed into a terminal: the event arrives, nothing typed here
    answer = json.loads(await run_readme_curl(origin))
    entry = page.locator(f'#log .event[data-id="{answer["id"]}"]')
    await entry.wait_for()
    assert json.loads(await entry.locator(".data").inner_text()) == README_ORDER
    assert await entry.locator(".topic").inner_text() == "orders.eu"
    assert await on_screen(page, f'#log .event[data-id="{answer["id"]}"]')
    assert not await page.locator("#log-empty").is_visible()
    assert await page.inner_text('.chip[data-topic=">"] .count') == "1"
    await page.screenshot(path=ARTIFACTS / f"demo-{name}-event.png", full_page=True)


async def test_a_bad_topic_is_reported_once(chromium, origin):
    tab = await open_demo(chromium, origin)
    page = tab.page
    await page.fill("#subscribe-topic", "a..b")
    await page.click("#subscribe-form button")
    await tab.until(lambda: tab.sockets[0].received_of_type("error"))
    await page.wait_for_selector('.chip[data-topic="a..b"]', state="detached")
    errors = page.locator("#log .notice.error")
    assert await errors.count() == 1
    assert re.search(r"a\.\.b.*empty segment", await errors.inner_text())


async def test_the_connect_button_says_what_it_would_do(chromium, origin):
    tab = await open_demo(chromium, origin)
    page = tab.page
    assert (await page.inner_text("#connect"), await page.is_disabled("#connect")) == (
        "Connect", True)

    await page.fill("#url", f"{origin.replace('http', 'ws', 1)}/v1/ws?from=demo")
    assert (await page.inner_text("#connect"), await page.is_enabled("#connect")) == (
        "Reconnect", True)
    await page.click("#connect")
    await tab.until(lambda: len(tab.sockets) == 2)
    await page.wait_for_selector('#state[data-state="open"]')
    assert tab.sockets[1].url.endswith("?from=demo")
    assert (await page.inner_text("#connect"), await page.is_disabled("#connect")) == (
        "Connect", True)

    await page.click("#disconnect")
    await page.wait_for_selector('#state[data-state="closed"]')
    assert await page.is_enabled("#connect") and await page.is_disabled("#disconnect")
    assert await page.inner_text("#connect") == "Connect"
    await page.click("#connect")
    await page.wait_for_selector('#state[data-state="open"]')
    await page.wait_for_selector('.chip[data-topic=">"]:not(.pending)')


async def test_live_events_publishes_and_counts(chromium, origin, publish):
    tab = await open_demo(chromium, origin)
    page = tab.page
    assert (await page.input_value("#url")).endswith(f"{origin.split('//')[1]}/v1/ws")

    await page.fill("#subscribe-topic", "orders.*")
    await page.click("#subscribe-form button")
    await page.wait_for_selector('.chip[data-topic="orders.*"]:not(.pending)')

    response = await publish("orders.eu", {"order": 1042, "total": 99.5})
    eu_id = json.loads(response.body)["id"]
    entry = page.locator('#log .event[data-topic="orders.eu"]')
    await entry.wait_for()
    assert await entry.locator(".id").inner_text() == eu_id
    assert json.loads(await entry.locator(".data").inner_text()) == {"order": 1042, "total": 99.5}

    await page.fill("#publish-topic", "orders.us")
    await page.fill("#publish-data", '{"order": 1043, "items": ["pen", "paper"]}')
    assert "/v1/topics/orders.us/events" in await page.inner_text("#curl-hint")
    await page.click("#publish-form button")
    await page.wait_for_selector('#publish-result[data-kind="ok"]')
    us_entry = page.locator('#log .event[data-topic="orders.us"]')
    await us_entry.wait_for()
    us_id = await us_entry.locator(".id").inner_text()
    assert await page.inner_text("#publish-result") == f"Published {us_id}"

    # two subscriptions match each event; the log and the totals count it once
    assert await page.inner_text('.chip[data-topic="orders.*"] .count') == "2"
    assert await page.inner_text('.chip[data-topic=">"] .count') == "2"
    assert await page.inner_text("#log-total") == "2"
    assert await page.locator("#log .event").count() == 2
    for topic in ("orders.eu", "orders.us"):
        assert await page.inner_text(f'#counters tr[data-topic="{topic}"] .n') == "1"

    await page.fill("#publish-data", "{not json")
    await page.click("#publish-form button")
    await page.wait_for_selector('#publish-result[data-kind="error"]')
    assert "not valid JSON" in await page.inner_text("#publish-result")

    await page.click('.chip[data-topic="orders.*"] .remove')
    await page.wait_for_selector('.chip[data-topic="orders.*"]', state="detached")
    [unsubscribe] = await tab.until(lambda: tab.sockets[0].sent_of_type("unsubscribe"))
    assert unsubscribe["topic"] == "orders.*"


async def test_topic_presets_replace_the_default_and_reconnects_show(chromium, origin, node):
    tab = await open_demo(chromium, origin, query="?topic=news&topic=orders.*")
    page = tab.page
    await page.wait_for_selector('.chip[data-topic="news"]:not(.pending)')
    await page.wait_for_selector('.chip[data-topic="orders.*"]:not(.pending)')
    assert await page.locator(".chip").count() == 2  # no ">" besides the presets

    node.hub.close_all(1001, "server shutting down")
    await page.wait_for_selector("#log .notice.warn")
    assert "1001: server shutting down" in await page.inner_text("#log .notice.warn")
    await page.wait_for_selector("#log .notice.ok")
    assert await page.inner_text("#log .notice.ok span") == "connected again"
    await page.wait_for_selector('#state[data-state="open"]')
    assert await page.locator("#log-empty").is_visible()  # still no event
