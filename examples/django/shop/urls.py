"""Routes: the orders page, the token squall.js asks for, sign-in, the admin."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import path
from orders import views

from squall_client.django import token_view

urlpatterns = [
    path("", views.orders, name="orders"),
    path("squall/token", token_view, name="squall-token"),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("admin/", admin.site.urls),
]
