"""What the client hands to applications: events, gaps and publish outcomes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Published:
    """A publish the server accepted: the event's ``id`` and ``ts`` (ms since the epoch)."""

    topic: str
    id: str
    ts: int


@dataclass(frozen=True, slots=True)
class Event:
    """An event as a subscriber receives it. ``id`` is opaque: store it, never parse it."""

    topic: str
    id: str
    ts: int
    data: Any


@dataclass(frozen=True, slots=True)
class Gap:
    """Events of the subscription ``topic`` (a topic or pattern, as subscribed) may be
    missing before the events that follow: reload that state from your own backend,
    then apply the events after the gap (idempotently: some may already be reflected).

    ``reason`` is one of:

    - ``not_recovered``: the server answered ``recovered: false`` (the history no
      longer covers the outage, or it was lost, e.g. a restart of a memory server);
    - ``no_position``: the server is too old to tell where a subscription that had
      delivered nothing stood, so a reconnect may have missed events;
    - ``replay_too_large``: the events to replay did not fit in what the subscriber
      holds during a resume (``replay_size``); they were skipped.
    """

    topic: str
    reason: str


NOT_RECOVERED = "not_recovered"
NO_POSITION = "no_position"
REPLAY_TOO_LARGE = "replay_too_large"
