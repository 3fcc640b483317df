"""examples/fastapi/app.py against a real server, through FastAPI's test client."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest

from tests.client.support import run
from tests.server_process import ROOT, ServerProcess
from tests.waiting import eventually


@pytest.fixture
def fastapi_example(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ModuleType, str]]:
    pytest.importorskip("fastapi")
    with ServerProcess() as server:
        monkeypatch.setenv("APP_SQUALL_URL", server.url)
        spec = importlib.util.spec_from_file_location("fastapi_example",
                                                      ROOT / "examples" / "fastapi" / "app.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module, server.url
        sys.modules.pop("fastapi_example", None)


def test_the_fastapi_example_publishes_and_follows(
        fastapi_example: tuple[ModuleType, str]) -> None:
    """The app's own lifespan (its publisher and subscriber) and its routes, over ASGI."""
    import httpx

    module, _ = fastapi_example

    async def scenario() -> None:
        async with module.lifespan(module.app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=module.app),
                base_url="http://example") as client:
            answer = await client.post("/orders/7/paid")
            assert answer.status_code == 202 and answer.json()["id"]

            async def seen() -> bool:
                return (await client.get("/orders/paid")).json() == {"paid": [7]}

            await eventually(seen, what="the example's subscriber to see the order")

    run(scenario())
