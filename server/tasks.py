"""Supervised background tasks: none dies silently.

Cancellation propagates (that is how a task is stopped); any other exception is
logged with its traceback and the task starts again after a capped, growing delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("squall.tasks")


def supervise(name: str, run: Callable[[], Awaitable[None]],
              backoff: float = 0.5, max_backoff: float = 30.0,
              healthy_after: float = 10.0) -> asyncio.Task[None]:
    """Run ``run()`` in a task that restarts it after failures or an early return.

    The delay before a restart starts at ``backoff`` and doubles up to ``max_backoff``;
    a run that lasted ``healthy_after`` seconds or more starts it afresh.
    """
    return asyncio.get_running_loop().create_task(
        _supervisor(name, run, backoff, max_backoff, healthy_after), name=name)


async def _supervisor(name: str, run: Callable[[], Awaitable[None]],
                      backoff: float, max_backoff: float, healthy_after: float) -> None:
    loop = asyncio.get_running_loop()
    delay = backoff
    while True:
        started = loop.time()
        failure: Exception | None = None
        try:
            await run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - logged below with its traceback
            failure = exc
        if loop.time() - started >= healthy_after:
            delay = backoff
        if failure is None:
            log.warning("task %s returned; restarting it in %.1fs", name, delay)
        else:
            log.error("task %s failed; restarting it in %.1fs", name, delay, exc_info=failure)
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_backoff)


async def every(interval: float, tick: Callable[[], None]) -> None:
    """Call ``tick()`` every ``interval`` seconds, forever (run it supervised)."""
    while True:
        await asyncio.sleep(interval)
        tick()


async def stop(task: asyncio.Task[None] | None) -> None:
    """Cancel a supervised task and wait until it has stopped."""
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
