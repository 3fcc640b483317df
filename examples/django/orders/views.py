"""The orders page: the list, a form to add one, and live updates through squall.js."""

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from orders.models import Order
from squall_client.django import socket_url


@login_required
def orders(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        item = request.POST.get("item", "").strip()[:100] or "something"
        quantity = _quantity(request.POST.get("quantity", ""))
        Order.objects.create(owner=request.user, item=item, quantity=quantity)
        return redirect("orders")
    squall_ws = socket_url()
    squall_http = "http" + squall_ws.removeprefix("ws").removesuffix("/v1/ws")
    return render(request, "orders/index.html", {
        "orders": Order.objects.all()[:50], "squall_ws": squall_ws,
        "squall_js": f"{squall_http}/static/squall.js"})


def _quantity(raw: str) -> int:
    return max(1, min(int(raw), 1000)) if raw.isdigit() else 1
