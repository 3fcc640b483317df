"""An order: whoever saves one makes Squall tell every subscribed page (signals.py)."""

from django.conf import settings
from django.db import models


class Order(models.Model):
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE,
                              related_name="orders")
    item = models.CharField(max_length=100)
    quantity = models.PositiveIntegerField(default=1)
    status = models.CharField(max_length=20, default="new")
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("-created",)

    def __str__(self) -> str:
        return f"{self.quantity} x {self.item} ({self.status})"

    def as_event(self) -> dict[str, object]:
        """What subscribers get: plain values, encoded as they are now."""
        return {"id": self.pk, "owner": self.owner_id, "item": self.item,
                "quantity": self.quantity, "status": self.status}
