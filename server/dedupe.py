"""Idempotency keys: a repeat publish within the window is answered, not published."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class DedupeWindow(Generic[T]):
    """First outcomes by (topic, key), forgotten after ``window`` seconds.

    Bounded: past ``max_keys`` the oldest keys are forgotten first, so a retry that
    comes later than that is published again (at least once, never lost).
    """

    def __init__(self, window: float, max_keys: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._window = window
        self._max_keys = max_keys
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[float, T]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, topic: str, key: str, outcome: T) -> None:
        if self._window <= 0 or self._max_keys <= 0:
            return
        self._entries[(topic, key)] = (self._clock() + self._window, outcome)
        while len(self._entries) > self._max_keys:
            self._entries.popitem(last=False)

    def recall(self, topic: str, key: str) -> T | None:
        self.expire()
        entry = self._entries.get((topic, key))
        return entry[1] if entry is not None else None

    def expire(self) -> None:
        now = self._clock()
        while self._entries and next(iter(self._entries.values()))[0] <= now:
            self._entries.popitem(last=False)
