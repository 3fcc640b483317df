"""Capped exponential backoff with jitter, and the retry schedule of one publish."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from squall_client.errors import SquallError


@dataclass(frozen=True)
class Backoff:
    """Delays before retry ``attempt`` (0-based): ``initial * factor ** attempt``,
    capped at ``maximum``, with "equal jitter" (a random point in the upper half), so
    that clients that failed together do not come back together."""

    initial: float = 0.1
    maximum: float = 5.0
    factor: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum or self.factor < 1:
            raise ValueError("Backoff needs 0 < initial <= maximum and factor >= 1")

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        ceiling = min(self.maximum, self.initial * self.factor ** min(attempt, 64))
        return ceiling / 2 + rand() * ceiling / 2


# the defaults: publishes retry quickly (the deadline bounds them); reconnects less so
PUBLISH_BACKOFF = Backoff(0.05, 2.0)
RECONNECT_BACKOFF = Backoff(0.5, 30.0)


class RetrySchedule:
    """The attempts of one operation that must finish within ``deadline`` seconds.

    ``timeout()`` is the time the next attempt may take (``attempt_timeout``, less when
    the deadline is nearer); ``next_delay(why, cause)`` is how long to wait before the
    next attempt, or raises ``SquallError("unavailable")`` (from ``cause``) when that
    attempt could not start before the deadline.
    """

    def __init__(self, deadline: float, attempt_timeout: float, backoff: Backoff,
                 clock: Callable[[], float] = time.monotonic,
                 started: float | None = None) -> None:
        self._clock = clock
        self._ends = (clock() if started is None else started) + deadline
        self._attempt_timeout = attempt_timeout
        self._backoff = backoff
        self.attempt = 0

    def timeout(self) -> float:
        return max(0.001, min(self._attempt_timeout, self._ends - self._clock()))

    def next_delay(self, why: str, cause: BaseException | None = None) -> float:
        delay = self._backoff.delay(self.attempt)
        self.attempt += 1
        if self._clock() + delay >= self._ends:
            raise SquallError("unavailable",
                              f"gave up after {self.attempt} attempts: {why}") from cause
        return delay
