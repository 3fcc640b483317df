"""server/logs.py: an access line written without a record reads exactly as the
record would, in both formats, and only where nothing else would see the record."""

from __future__ import annotations

import io
import logging
import time

import pytest

from server.logs import JsonFormatter, LoopStreamHandler, TextFormatter, direct_line

EXTRA = {"status": 202, "method": "POST", "path": "/v1/topics/t/events", "ip": "10.0.0.1",
         "duration_ms": 0.53}
MESSAGE = "202 POST /v1/topics/t/events 0.5ms"


@pytest.fixture
def logger(monkeypatch):
    """A logger of its own that passes nothing up, on a fixed clock."""
    created = 1764620000.257
    monkeypatch.setattr(time, "time", lambda: created)
    monkeypatch.setattr(time, "time_ns", lambda: int(created * 1e9))
    named = logging.getLogger("squall.test.direct")
    named.propagate, named.handlers = False, []
    named.setLevel(logging.INFO)
    yield named
    named.handlers, named.filters, named.propagate = [], [], True


@pytest.mark.parametrize("formatter", [TextFormatter, JsonFormatter])
@pytest.mark.parametrize("level", [logging.INFO, logging.WARNING])
def test_a_direct_line_reads_as_the_record_would(logger, formatter, level):
    stream = io.StringIO()
    handler = LoopStreamHandler(stream)
    handler.setFormatter(formatter())
    logger.handlers = [handler]  # only: the test run's capture handlers would see records
    assert direct_line(logger, level, MESSAGE, EXTRA)
    logger.log(level, "%s", MESSAGE, extra=EXTRA)
    handler.flush()
    direct, recorded = stream.getvalue().splitlines()
    assert direct == recorded
    assert MESSAGE in direct


def test_anything_else_on_the_way_gets_a_record(logger):
    handler = LoopStreamHandler(io.StringIO())
    handler.setFormatter(TextFormatter())
    logger.handlers = [handler]
    assert direct_line(logger, logging.INFO, MESSAGE, EXTRA)
    logger.addFilter(lambda record: True)
    assert not direct_line(logger, logging.INFO, MESSAGE, EXTRA)
    logger.filters = []
    logger.addHandler(logging.StreamHandler(io.StringIO()))  # a second handler, not ours
    assert not direct_line(logger, logging.INFO, MESSAGE, EXTRA)
    logger.handlers = [handler]
    handler.setFormatter(logging.Formatter())  # a formatter of someone else's
    assert not direct_line(logger, logging.INFO, MESSAGE, EXTRA)
