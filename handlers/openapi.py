"""``GET /v1/openapi.json``: the OpenAPI 3 document of the HTTP API.

The document is ``openapi.json`` beside this module, read once at import. It
describes every endpoint of docs/protocol.md (HTTP API), the error schema and the
security schemes; tests/test_openapi.py checks a real server against it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from handlers.base import ApiHandler

DOCUMENT_PATH = Path(__file__).with_name("openapi.json")


def load_document() -> dict[str, Any]:
    """The OpenAPI document as a dict."""
    document: dict[str, Any] = json.loads(DOCUMENT_PATH.read_bytes())
    return document


_BODY = json.dumps(load_document(), ensure_ascii=False, separators=(",", ":")).encode()


class OpenApiHandler(ApiHandler):
    """Serves the document as JSON, whatever the Accept header says."""

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "public, max-age=300")
        self.finish(_BODY)
