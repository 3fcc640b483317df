"""The demo page and the browser client: static files whose errors are JSON too."""

from __future__ import annotations

from typing import Any

from tornado.web import StaticFileHandler

from server.codec import dump_json

_CODES = {403: "forbidden", 404: "not_found", 405: "method_not_allowed"}


class StaticHandler(StaticFileHandler):
    """``/`` and ``/static/...``: GET and HEAD; any error is ``{"error": {...}}``."""

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        path = self.request.path[:200]
        if status_code == 405:
            self.set_header("Allow", "GET, HEAD")
            message = f"{(self.request.method or '')[:20]} is not allowed on {path}; this " \
                      "path takes GET and HEAD"
        elif status_code == 404:
            message = f"no such file: {path}"
        else:
            message = self._reason
        code = _CODES.get(status_code, "internal_error" if status_code >= 500 else "invalid_body")
        self.set_header("Content-Type", "application/json")
        self.finish(dump_json({"error": {"code": code, "message": message}}))
