"""Every saved order goes to Squall, once its transaction commits.

``publish_on_commit`` sends nothing when the transaction rolls back, and its
idempotency key makes the publisher's retries safe. Pages subscribed to
``orders.*`` get ``orders.created`` and ``orders.updated``; the owner's own topic
``user:<id>.orders`` gets them too.
"""

from typing import Any

from django.db.models.signals import post_save
from django.dispatch import receiver

from orders.models import Order
from squall_client.django import publish_on_commit


@receiver(post_save, sender=Order)
def order_saved(sender: type[Order], instance: Order, created: bool, **kwargs: Any) -> None:
    event = instance.as_event()
    publish_on_commit("orders.created" if created else "orders.updated", event)
    publish_on_commit(f"user:{instance.owner_id}.orders", event)
