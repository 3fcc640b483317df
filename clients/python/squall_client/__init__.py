"""Squall's Python client: publish over HTTP with safe retries, subscribe with resume.

    from squall_client import Publisher, Subscriber

    with Publisher("http://127.0.0.1:8888", api_key="...") as publisher:
        publisher.publish("orders.eu", {"id": 42})

    async with Subscriber("ws://127.0.0.1:8888", token=jwt) as subscriber:
        await subscriber.subscribe("orders.*")
        async for item in subscriber:  # Event(topic, id, ts, data) or Gap(topic, reason)
            ...

See the README of the ``squall-client`` distribution and docs/reference.md.
"""

from squall_client.async_publisher import AsyncPublisher
from squall_client.backoff import Backoff
from squall_client.errors import Disconnected, SquallError, SubscriptionError
from squall_client.models import Event, Gap, Published
from squall_client.publisher import Publisher
from squall_client.subscriber import Subscriber
from squall_client.tokens import mint_token
from squall_client.topics import matches

__all__ = [
    "AsyncPublisher",
    "Backoff",
    "Disconnected",
    "Event",
    "Gap",
    "Published",
    "Publisher",
    "SquallError",
    "Subscriber",
    "SubscriptionError",
    "matches",
    "mint_token",
]
__version__ = "0.1.0"
