"""Presence for the memory broker: one process is the whole cluster.

Entries live in a dict per name; a change is applied, announced (``on_presence``) and
weighed for the lifecycle (``on_lifecycle``) at once, inside ``apply``, so this node
hears its own joins before ``update_presence`` returns. A name left empty is vacated
by a loop timer after ``debounce`` seconds, unless an entry comes back first. There
are no other nodes, so nothing ever needs to be taken out for them.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping, Sequence
from typing import Protocol

from server.broker.base import (
    OCCUPIED,
    VACATED,
    LifecycleHandler,
    PresenceChange,
    PresenceHandler,
    PresenceList,
    PresenceNotice,
    PresenceOptions,
    presence_difference,
)
from server.codec import load_json

CHANGES_CHUNK = 1000  # changes applied at a time by a rewrite, as the node's writer sends them


class Listeners(Protocol):
    """Where the broker's callbacks are (read at each call: the node sets them late)."""

    on_presence: PresenceHandler
    on_lifecycle: LifecycleHandler


class LocalPresence:
    """Entries, announcements and lifecycle of one process. IOLoop only."""

    def __init__(self, options: PresenceOptions, listeners: Listeners) -> None:
        self.options = options
        self._listeners = listeners
        self._entries: dict[str, dict[str, bytes]] = {}
        self._occupied: set[str] = set()  # vacating ones included, until vacated
        self._vacating: dict[str, asyncio.TimerHandle] = {}

    def apply(self, changes: Sequence[PresenceChange]) -> None:
        """Apply changes in order; announce and weigh each name once, after its changes."""
        grouped: dict[str, list[PresenceChange]] = {}
        for change in changes:
            grouped.setdefault(change.name, []).append(change)
        for name, group in grouped.items():
            notices = self._apply_name(name, group)
            if notices and self.options.announces(name):
                self._listeners.on_presence(name, notices)
            self._weigh(name)

    def replace(self, entries: Mapping[str, Sequence[tuple[str, bytes]]]) -> None:
        """This process's entries become exactly ``entries``, in steps of ``CHANGES_CHUNK``
        changes (each name's frames of a bounded size)."""
        changes = presence_difference(self._entries, entries)
        for first in range(0, len(changes), CHANGES_CHUNK):
            self.apply(changes[first:first + CHANGES_CHUNK])

    def listing(self, name: str, limit: int) -> PresenceList:
        entries = self._entries.get(name, {})
        shown = [load_json(entry) for entry in itertools.islice(entries.values(), limit)]
        return PresenceList(len(entries), shown, len(entries) > limit)

    def close(self) -> None:
        for timer in self._vacating.values():
            timer.cancel()
        self._vacating.clear()

    def _apply_name(self, name: str, group: list[PresenceChange]) -> list[PresenceNotice]:
        entries = self._entries.setdefault(name, {})
        notices: list[PresenceNotice] = []
        for change in group:
            if change.entry is None:
                old = entries.pop(change.client, None)
                if old is not None:
                    notices.append(("leave", load_json(old)))
            else:
                if change.client not in entries:
                    notices.append(("join", load_json(change.entry)))
                entries[change.client] = change.entry
        if not entries:
            del self._entries[name]
        return notices

    def _weigh(self, name: str) -> None:
        """Occupied on the first entry, vacating (a timer) when the last one went."""
        if name in self._entries:
            timer = self._vacating.pop(name, None)
            if timer is not None:
                timer.cancel()  # back within the debounce: neither signal
            elif name not in self._occupied:
                self._occupied.add(name)
                self._listeners.on_lifecycle(name, OCCUPIED)
        elif name in self._occupied and name not in self._vacating:
            if self.options.debounce <= 0:
                self._vacate(name)
                return
            loop = asyncio.get_running_loop()
            self._vacating[name] = loop.call_later(self.options.debounce, self._vacate, name)

    def _vacate(self, name: str) -> None:
        self._vacating.pop(name, None)
        if name in self._occupied and name not in self._entries:
            self._occupied.discard(name)
            self._listeners.on_lifecycle(name, VACATED)
