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
        return self._time(record.created, record.msecs)

    def _time(self, created: float, msecs: float) -> str:
        second, text = self._second
        if int(created) != second:
            second = int(created)
            text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._second = (second, text)
        return f"{text},{int(msecs):03d}"

    def line(self, created: float, level: int, name: str, message: str,
             extra: dict[str, Any]) -> str:
        """What ``format`` makes of a record without a traceback (``extra`` unshown)."""
        return (f"{self._time(created, _msecs(created))} {logging.getLevelName(level):<7} "
                f"{name}: {message}")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, extras, traceback."""

    def __init__(self) -> None:
        super().__init__()
        self._second = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        extra = {key: value for key, value in record.__dict__.items()
                 if key not in _STANDARD and not key.startswith("_")}
        exc = self.formatException(record.exc_info) if record.exc_info else None
        return self._entry(record.created, record.msecs, record.levelname, record.name,
                           record.getMessage(), extra, exc)

    def line(self, created: float, level: int, name: str, message: str,
             extra: dict[str, Any]) -> str:
        """What ``format`` makes of a record without a traceback."""
        return self._entry(created, _msecs(created), logging.getLevelName(level), name,
                           message, extra, None)

    def _entry(self, created: float, msecs: float, levelname: str, name: str, message: str,
               extra: dict[str, Any], exc: str | None) -> str:
        second, text = self._second
        if int(created) != second:
            second = int(created)
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, text)
        entry: dict[str, Any] = {"ts": f"{text}.{int(msecs):03d}Z", "level": levelname.lower(),
                                 "logger": name, "message": message, **extra}
        if exc:
            entry["exc"] = exc
        return json.dumps(entry, default=str)


def _msecs(created: float) -> int:
    """A record's milliseconds for the time ``created``, as ``LogRecord`` works them out."""
    return int((created - int(created)) * 1000)


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
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)
            return
        self.emit_line(line, record.levelno)

    def emit_line(self, line: str, levelno: int) -> None:
        """Write one formatted line (``emit``'s second half; see ``direct_line``)."""
        line += self.terminator
        self._pending.append(line)
        self._size += len(line)
        if levelno >= logging.WARNING or self._size > self.MAX_PENDING:
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


def direct_line(logger: logging.Logger, level: int, message: str,
                extra: dict[str, Any]) -> bool:
    """Write what ``logger.log(level, message, extra=extra)`` would, without making a
    record, if the one handler it would reach is a ``LoopStreamHandler`` with one of
    this module's formatters and no filter is on the way (as ``setup_logging`` leaves
    it); False, having written nothing, if anything else might see the record.

    A record costs more than the access line it carries: finding its caller, thread
    and process, then formatting it field by field."""
    handler: LoopStreamHandler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return False
        for found in current.handlers:
            if (handler is not None or type(found) is not LoopStreamHandler or found.filters
                    or level < found.level):
                return False
            handler = found
        current = current.parent if current.propagate else None
    formatter = handler.formatter if handler is not None else None
    if handler is None or type(formatter) not in (TextFormatter, JsonFormatter):
        return False
    assert isinstance(formatter, TextFormatter | JsonFormatter)
    handler.emit_line(formatter.line(time.time(), level, logger.name, message, extra), level)
    return True


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
