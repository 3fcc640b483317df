"""Settings of the example shop: Django, sqlite, and Squall (``SQUALL``).

The defaults match the Squall started as the README says (on port 8890, with
``--api-keys dev-api-key --jwt-secret ...``); never use them in production.
"""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = "example-only-not-secret"
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "orders",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

ROOT_URLCONF = "shop.urls"
WSGI_APPLICATION = "shop.wsgi.application"

TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "DIRS": [],
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("SHOP_DATABASE", BASE_DIR / "db.sqlite3"),
        # every request in a transaction: publish_on_commit waits for its end
        "ATOMIC_REQUESTS": True,
    }
}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
STATIC_URL = "static/"
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "orders"
USE_TZ = True

SQUALL = {
    "URL": os.environ.get("SHOP_SQUALL_URL", "http://127.0.0.1:8890"),
    "API_KEY": os.environ.get("SHOP_SQUALL_API_KEY", "dev-api-key"),
    "JWT_SECRET": os.environ.get("SHOP_SQUALL_JWT_SECRET",
                                 "dev-jwt-secret-change-me-0123456789"),
    # a signed-in user may follow every order, and the topics of their own
    "SUBSCRIBE": ["orders.*", "user:{sub}.>"],
    "TOKEN_TTL": 600,
}
