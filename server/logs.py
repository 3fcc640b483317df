"""Logging: readable text by default, one JSON object per line with ``--log-format json``.

Both go to stderr through ``LoopStreamHandler``: inside a running event loop the lines
of one loop pass are written together, at the end of the pass (one ``write`` for the
access lines of many requests); outside one, and for errors, at once. The text
format's time is made once a second.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class TextFormatter(logging.Formatter):
    """``time level logger: message``, with the time's seconds formatted once a second."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self._second = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second, text = self._second
        if int(record.created) != second:
            second = int(record.created)
            text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._second = (second, text)
        return f"{text},{int(record.msecs):03d}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, extras, traceback."""

    def __init__(self) -> None:
        super().__init__()
        self._second = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        second, text = self._second
        if int(record.created) != second:
            second = int(record.created)
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, text)
        entry: dict[str, Any] = {
            "ts": f"{text}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({key: value for key, value in record.__dict__.items()
                      if key not in _STANDARD and not key.startswith("_")})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class LoopStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes the lines of one event-loop pass together (see the module docstring).

    At most ``MAX_PENDING`` characters wait; warnings and worse go out at once, with
    whatever waited before them, so nothing is reordered and a crash loses at most
    one pass of info lines.
    """

    MAX_PENDING = 64 * 1024

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._size = 0
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)
            return
        self._pending.append(line)
        self._size += len(line)
        if record.levelno >= logging.WARNING or self._size > self.MAX_PENDING:
            self.flush()
            return
        if not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._scheduled = True
            loop.call_soon(self._flush_pass)

    def _flush_pass(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        self.acquire()
        try:
            if self._pending:
                text, self._pending, self._size = "".join(self._pending), [], 0
                try:
                    self.stream.write(text)
                except (OSError, ValueError):  # stderr closed: nothing left to tell
                    return
            super().flush()
        finally:
            self.release()


def setup_logging(level: str, fmt: str) -> None:
    """Send every logger to stderr in the chosen format at the chosen level."""
    # Neither format shows a thread or process: records skip finding them (the logging
    # HOWTO's "Optimization"), a quarter of an access line's cost.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = LoopStreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class Throttle:
    """Lets a log line through at most once per ``interval`` seconds, and counts the
    lines it held back meanwhile (``take_held`` returns and resets the count)."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._next = 0.0
        self.held = 0

    def ready(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            self.held += 1
            return False
        self._next = now + self.interval
        return True

    def take_held(self) -> int:
        held, self.held = self.held, 0
        return held
