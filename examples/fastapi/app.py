"""A FastAPI service on Squall: it publishes from its endpoints and follows a topic.

    .venv/bin/pip install ./clients/python fastapi uvicorn
    .venv/bin/uvicorn --app-dir examples/fastapi app:app --port 8001

``POST /orders/{id}/paid`` publishes ``orders.paid`` (the publisher retries with the
same idempotency key, so a retried call never publishes twice); ``GET /orders/paid``
answers the ids this service saw paid, kept up to date by a ``Subscriber`` that
resumes across reconnects and starts over when it is told of a ``Gap``.
``APP_SQUALL_URL`` (default ``http://127.0.0.1:8888``) says where Squall is. With auth
on, ``APP_SQUALL_API_KEY`` is the API key it publishes with and ``APP_SQUALL_TOKEN`` a
token that may subscribe to ``orders.paid`` (``run.py token --sub shop --subscribe
orders.paid``). (Not ``SQUALL_*``: those are the server's settings.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import deque
from collections.abc import AsyncIterator

from fastapi import FastAPI

from squall_client import AsyncPublisher, Event, Gap, Published, Subscriber

SQUALL_URL = os.environ.get("APP_SQUALL_URL", "http://127.0.0.1:8888")
API_KEY = os.environ.get("APP_SQUALL_API_KEY")

paid: deque[int] = deque(maxlen=100)  # the latest paid orders this service saw


async def follow(subscriber: Subscriber) -> None:
    """Keep ``paid`` up to date; on a Gap, what it held may be stale: start over."""
    async for item in subscriber:
        if isinstance(item, Gap):
            paid.clear()  # a real service would reload from its database here
        elif isinstance(item, Event) and item.topic == "orders.paid":
            paid.append(item.data["id"])


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with AsyncPublisher(SQUALL_URL, api_key=API_KEY) as publisher, \
            Subscriber(SQUALL_URL, token=os.environ.get("APP_SQUALL_TOKEN")) as subscriber:
        app.state.publisher = publisher
        await subscriber.subscribe("orders.paid")
        following = asyncio.create_task(follow(subscriber))
        yield
        following.cancel()


app = FastAPI(lifespan=lifespan)


@app.post("/orders/{order_id}/paid", status_code=202)
async def order_paid(order_id: int) -> dict[str, str]:
    publisher: AsyncPublisher = app.state.publisher
    published: Published = await publisher.publish("orders.paid", {"id": order_id})
    return {"id": published.id}


@app.get("/orders/paid")
async def orders_paid() -> dict[str, list[int]]:
    return {"paid": list(paid)}
