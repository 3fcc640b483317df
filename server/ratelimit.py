"""Limits on what one client may cost: connections, frames, HTTP publishes.

Every limit is a setting; 0 turns a rate or a count limit off.

- ``max_connections`` (per process) and ``max_connections_per_ip``: a WebSocket over
  either is accepted and then closed at once with 4029, so that a browser sees the
  code (a refused handshake shows it only 1006) and backs off. It never reaches the
  hub, and a closed connection frees its place at once.
- ``frame_rate`` / ``frame_burst``: a token bucket per connection. Each client frame
  takes a token. A frame that finds none is dropped and answered with an ``error``
  frame ``rate_limited``, and it still counts: the bucket goes into debt. When the
  debt passes ``frame_burst`` (the client went on sending as fast while refused) the
  connection is closed with 4029. A client that waits recovers: the debt refills at
  ``frame_rate``.
- ``publish_rate`` / ``publish_burst``: a token bucket per API key, token subject or
  IP for HTTP publishes (a batch counts as one request). Over it: 429 ``rate_limited``
  with ``Retry-After``. A refused request takes no token. At most
  ``publish_rate_clients`` buckets are kept; past that the least recently used goes,
  which has had the longest to refill (and a full bucket is the same as a new one).

Each limit is per client: whoever exceeds it is the only one who sees a difference.
Everything here runs on the IOLoop thread and never blocks.
"""

from __future__ import annotations

import enum
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from server.errors import SquallError

if TYPE_CHECKING:
    from config.settings import Settings

Clock = Callable[[], float]
"""Seconds from an arbitrary start, never going back (``time.monotonic``)."""


class RateLimited(SquallError):
    """``rate_limited``; HTTP replies carry ``retry_after`` as ``Retry-After`` (seconds)."""

    def __init__(self, message: str, retry_after: int = 0) -> None:
        super().__init__("rate_limited", message)
        self.retry_after = retry_after


class Verdict(enum.Enum):
    """What to do with one client frame."""

    ALLOW = "allow"
    REFUSE = "refuse"  # answer rate_limited, keep the connection
    CLOSE = "close"  # the client keeps on: close with 4029


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up, at least ``-debt`` owed."""

    __slots__ = ("_clock", "_stamp", "burst", "debt", "rate", "tokens")

    def __init__(self, rate: float, burst: int, clock: Clock, debt: int = 0) -> None:
        self.rate = rate
        self.burst = burst
        self.debt = debt
        self.tokens = float(burst)
        self._clock = clock
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def take(self) -> bool:
        """Take a token if there is one; no debt is made."""
        self._refill()
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def take_or_owe(self) -> Verdict:
        """Take a token, owing it when there is none (down to ``-debt``)."""
        self._refill()
        self.tokens -= 1
        if self.tokens >= 0:
            return Verdict.ALLOW
        return Verdict.REFUSE if self.tokens >= -self.debt else Verdict.CLOSE

    def wait(self) -> float:
        """Seconds until a token is there again."""
        self._refill()
        return max(0.0, (1 - self.tokens) / self.rate)


class FrameLimiter:
    """The frame budget of one connection (``frame_rate``, ``frame_burst``)."""

    def __init__(self, rate: float, burst: int, clock: Clock) -> None:
        self._bucket = TokenBucket(rate, burst, clock, debt=burst) if rate > 0 else None

    def check(self) -> Verdict:
        """The verdict on one more frame from this connection."""
        return Verdict.ALLOW if self._bucket is None else self._bucket.take_or_owe()

    def describe(self) -> str:
        bucket = self._bucket
        assert bucket is not None
        return (f"too many frames: at most {bucket.rate:g} a second (bursts of {bucket.burst}); "
                "wait before sending more")


class ConnectionCounter:
    """Open WebSocket connections, in all and per IP."""

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self._per_ip: dict[str, int] = {}

    def admit(self, ip: str) -> str | None:
        """Count a connection from ``ip`` in, or say why it is refused (not counted)."""
        if self.max_total and self.total >= self.max_total:
            return f"this server holds at most {self.max_total} connections"
        count = self._per_ip.get(ip, 0)
        if self.max_per_ip and count >= self.max_per_ip:
            return f"at most {self.max_per_ip} connections per address"
        self.total += 1
        self._per_ip[ip] = count + 1
        return None

    def release(self, ip: str) -> None:
        """Count out a connection that ``admit`` let in."""
        self.total -= 1
        left = self._per_ip.get(ip, 1) - 1
        if left > 0:
            self._per_ip[ip] = left
        else:
            self._per_ip.pop(ip, None)

    def from_ip(self, ip: str) -> int:
        return self._per_ip.get(ip, 0)


class KeyedBuckets:
    """One token bucket per client name, at most ``capacity`` of them kept."""

    def __init__(self, rate: float, burst: int, capacity: int, clock: Clock) -> None:
        self.rate = rate
        self.burst = burst
        self.capacity = capacity
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, name: str) -> float:
        """0 when ``name`` may go ahead, else the seconds it should wait."""
        if self.rate <= 0:
            return 0.0
        bucket = self._buckets.get(name)
        if bucket is None:
            self._make_room()
            bucket = self._buckets[name] = TokenBucket(self.rate, self.burst, self._clock)
        else:
            self._buckets.move_to_end(name)
        return 0.0 if bucket.take() else bucket.wait()

    def __len__(self) -> int:
        return len(self._buckets)

    def _make_room(self) -> None:
        """Room for one more bucket: the least recently used goes, in O(1)."""
        while len(self._buckets) >= self.capacity:
            self._buckets.popitem(last=False)


class Limits:
    """A node's limits, built from Settings; ``clock`` is for tests."""

    def __init__(self, settings: Settings, clock: Clock = time.monotonic) -> None:
        self.frame_rate = settings.frame_rate
        self.frame_burst = settings.frame_burst
        self.connections = ConnectionCounter(settings.max_connections,
                                             settings.max_connections_per_ip)
        self.publishes = KeyedBuckets(settings.publish_rate, settings.publish_burst,
                                      settings.publish_rate_clients, clock)
        self._clock = clock

    def frame_limiter(self) -> FrameLimiter:
        """A fresh frame budget for a new connection."""
        return FrameLimiter(self.frame_rate, self.frame_burst, self._clock)

    def check_publish(self, client: str) -> None:
        """Count one HTTP publish by ``client``; raises ``RateLimited`` over the limit."""
        wait = self.publishes.take(client)
        if wait > 0:
            raise RateLimited(f"too many publishes: at most {self.publishes.rate:g} a second "
                              f"(bursts of {self.publishes.burst})", math.ceil(wait))
