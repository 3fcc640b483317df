"""Waiting on state that no future announces: poll it, within a deadline."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any


async def eventually(check: Callable[[], Any | Awaitable[Any]], timeout: float = 10.0,
                     what: str = "", every: float = 0.05) -> Any:
    """Call ``check`` (plain or async) every ``every`` seconds until it returns something
    true, and return that; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if inspect.isawaitable(found):
            found = await found
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what or check}"
        await asyncio.sleep(every)
