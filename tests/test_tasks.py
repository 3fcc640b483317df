"""Supervised tasks (server/tasks.py): restarted with a growing delay, reset by health."""

from __future__ import annotations

import asyncio
import logging

import pytest

from server import tasks

pytestmark = pytest.mark.gen_test(timeout=10)


class Flaky:
    """A task body that fails at once ``fails`` times, then runs ``healthy`` seconds
    and fails, then fails at once again; it records when each run started."""

    def __init__(self, fails: int, healthy: float) -> None:
        self.fails = fails
        self.healthy = healthy
        self.starts: list[float] = []
        self.done = asyncio.Event()

    async def __call__(self) -> None:
        self.starts.append(asyncio.get_running_loop().time())
        run = len(self.starts)
        if run == self.fails + 1:
            await asyncio.sleep(self.healthy)
        if run == self.fails + 3:
            self.done.set()
            await asyncio.Event().wait()
        raise RuntimeError(f"run {run}")


async def test_the_delay_grows_and_a_healthy_run_resets_it(caplog):
    flaky = Flaky(fails=4, healthy=0.3)
    task = tasks.supervise("flaky", flaky, backoff=0.02, max_backoff=0.1, healthy_after=0.25)
    try:
        await asyncio.wait_for(flaky.done.wait(), 5)
    finally:
        await tasks.stop(task)
    gaps = [later - earlier for earlier, later in zip(flaky.starts, flaky.starts[1:], strict=False)]
    # 0.02, 0.04, 0.08, 0.1 (capped), then the healthy run (0.3) and a fresh 0.02
    assert gaps[0] < gaps[1] < gaps[2] and gaps[3] >= 0.09
    assert gaps[5] < 0.06, gaps
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 6 and all(r.exc_info for r in failures)


async def test_cancelling_stops_it():
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    task = tasks.supervise("forever", forever)
    await started.wait()
    await tasks.stop(task)
    assert task.cancelled()
