"""Bounded in-memory event history and ``since`` lookups.

Retention per topic is bounded by count and age; all topics together are bounded by
a number of topics and a number of bytes, evicting the least recently published
topic first. A lookup either returns every retained event after an id or says that
the gap cannot be filled (``recovered=False``); it never returns part of a gap. An
id of another epoch (the history behind it was lost) is answered with every
retained event of the current epoch and ``recovered=False``: those events were all
accepted after the loss, so a client that reloads its state loses none of them.

To answer "was anything after X lost?" for topics that are no longer retained, the
history keeps a bounded tombstone per forgotten topic (the seq of its last event)
and one watermark for tombstones it had to forget as well.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from server.events import Event, EventId
from server.topics import is_pattern, matches


@dataclass(frozen=True)
class Retention:
    """History bounds. ``size`` 0 keeps no history; ``ttl`` 0 means no age limit."""

    size: int = 100
    ttl: float = 300.0
    max_topics: int = 10_000
    max_bytes: int = 64 * 1024 * 1024
    max_replay: int = 10_000  # events one lookup returns at most


class Replay(NamedTuple):
    """The answer to a ``since`` lookup: the events after it, oldest first.

    ``last_id``: the newest id the history had given out when it was read (None when
    unknown). Every event after it is yet to come, so a reader that got nothing
    resumes from it without a gap.
    """

    events: list[Event]
    recovered: bool
    last_id: str | None = None


class _TopicLog:
    __slots__ = ("bytes", "events", "trimmed_upto")

    def __init__(self) -> None:
        self.events: deque[Event] = deque()
        self.bytes = 0
        self.trimmed_upto = 0  # seq of the newest event this topic dropped

    def drop_oldest(self) -> int:
        event = self.events.popleft()
        size = event.size
        self.bytes -= size
        self.trimmed_upto = event.seq
        return size

    @property
    def last_seq(self) -> int:
        return self.events[-1].seq if self.events else self.trimmed_upto


class MemoryHistory:
    """Per-topic event logs for one epoch of ids. Use from the IOLoop only."""

    def __init__(self, retention: Retention, epoch: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.retention = retention
        self.epoch = epoch
        self._clock = clock
        self._logs: OrderedDict[str, _TopicLog] = OrderedDict()  # least recent first
        self._tombstones: OrderedDict[str, int] = OrderedDict()
        self._forgotten_upto = 0
        self._bytes = 0
        self.last_seq = 0
        self._ttl_ms = int(retention.ttl * 1000)

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._logs)

    def append(self, event: Event) -> None:
        """Retain ``event``, the newest of its epoch, and enforce every bound."""
        self.extend((event,))

    def extend(self, events: Sequence[Event]) -> None:
        """Retain ``events``, the newest of their epoch (oldest first), and enforce every
        bound, as appending each in turn would, with the bounds of a topic applied once
        per run of its events (a batch is mostly one topic). Each run is measured (its
        events encoded) before it changes anything: an event that cannot be encoded
        fails there. (The memory broker has measured every event already.)"""
        run: list[Event] = []
        for event in events:
            if run and event.topic != run[0].topic:
                self._retain_run(run)
                run = []
            run.append(event)
        if run:
            self._retain_run(run)

    def _retain_run(self, run: list[Event]) -> None:
        size = sum([event.size for event in run])  # first: encodes them, or fails
        topic, logs, newest = run[0].topic, self._logs, run[-1]
        self.last_seq = newest.seq
        log = logs.get(topic)
        if log is None:
            log = logs[topic] = _TopicLog()
            log.trimmed_upto = self._tombstones.pop(topic, self._forgotten_upto)
        else:
            logs.move_to_end(topic)
        events = log.events
        events.extend(run)
        retention = self.retention
        while len(events) > retention.size:
            dropped = events.popleft()
            size -= dropped.size
            log.trimmed_upto = dropped.seq
        log.bytes += size
        self._bytes += size
        ttl_ms = self._ttl_ms
        if ttl_ms and events and events[0].ts < newest.ts - ttl_ms:  # ts: it was just made
            self._expire_log(log, newest.ts)
        if not events:
            self._forget(topic)
        if len(self._logs) > retention.max_topics or self._bytes > retention.max_bytes:
            self._evict_topics()

    def since(self, name: str, since: str | None, limit: int | None = None) -> Replay:
        """Retained events of a topic or pattern after ``since`` (or all retained).

        With ``limit``, the oldest ``limit`` of them (a reader pages with the last id).
        Without it, every one; past ``retention.max_replay`` events a resume gets
        ``recovered=False`` and nothing (a read without ``since``, the oldest ones).
        """
        self.expire()
        position = str(EventId(self.epoch, self.last_seq))
        after, recovered = 0, True
        if since is not None:
            parsed = EventId.parse(since)
            if parsed is None or (parsed.epoch == self.epoch and parsed.seq > self.last_seq):
                return Replay([], False, position)  # no id this history could have issued
            if parsed.epoch != self.epoch:
                recovered = False  # lost with its epoch: what this one retained follows
            elif not self._covers(name, parsed.seq):
                return Replay([], False, position)
            else:
                after = parsed.seq
        streams = [self._after(log, after) for log in self._logs_for(name)]
        return merge_replay(streams, recovered, position, limit, self.retention.max_replay,
                            resuming=since is not None)

    def last_id(self, topic: str) -> str | None:
        log = self._logs.get(topic)
        if log is None or not log.events:
            return None
        return log.events[-1].id

    def topics(self) -> Iterator[str]:
        """Topics with retained events."""
        self.expire()
        return iter(list(self._logs))

    def expire(self) -> None:
        """Forget topics whose newest event is older than the ttl.

        Topics are kept in order of their last publish, so this stops at the first
        live one. Older events of live topics are dropped when the topic is next
        published to or read.
        """
        if not self.retention.ttl:
            return
        deadline = self._deadline()
        while self._logs:
            topic, log = next(iter(self._logs.items()))
            if log.events[-1].ts >= deadline:
                return
            self._forget(topic)

    def _expire_log(self, log: _TopicLog, now_ms: int | None = None) -> None:
        if not self.retention.ttl:
            return
        deadline = self._deadline() if now_ms is None else now_ms - self._ttl_ms
        while len(log.events) > 1 and log.events[0].ts < deadline:
            self._bytes -= log.drop_oldest()

    def _deadline(self) -> int:
        return int((self._clock() - self.retention.ttl) * 1000)

    def _evict_topics(self) -> None:
        while self._logs and (len(self._logs) > self.retention.max_topics
                              or self._bytes > self.retention.max_bytes):
            topic, log = next(iter(self._logs.items()))
            if len(self._logs) == 1 and len(log.events) > 1:
                self._bytes -= log.drop_oldest()  # one topic alone is over the byte bound
            else:
                self._forget(topic)

    def _forget(self, topic: str) -> None:
        log = self._logs.pop(topic)
        self._bytes -= log.bytes
        self._tombstones[topic] = log.last_seq
        self._tombstones.move_to_end(topic)
        while len(self._tombstones) > max(self.retention.max_topics, 1):
            _, seq = self._tombstones.popitem(last=False)
            self._forgotten_upto = max(self._forgotten_upto, seq)

    def _logs_for(self, name: str) -> list[_TopicLog]:
        if is_pattern(name):
            logs = [log for topic, log in self._logs.items() if matches(name, topic)]
        else:
            log = self._logs.get(name)
            logs = [log] if log is not None else []
        for log in logs:
            self._expire_log(log)
        return logs

    def _covers(self, name: str, after: int) -> bool:
        """Whether no event after seq ``after`` on ``name`` was dropped."""
        if any(log.trimmed_upto > after for log in self._logs_for(name)):
            return False
        if not is_pattern(name):
            return name in self._logs or self._tombstones.get(name, self._forgotten_upto) <= after
        return self._forgotten_upto <= after and all(
            seq <= after for topic, seq in self._tombstones.items() if matches(name, topic))

    @staticmethod
    def _after(log: _TopicLog, after: int) -> list[Event]:
        found: list[Event] = []
        for event in reversed(log.events):
            if event.seq <= after:
                break
            found.append(event)
        found.reverse()
        return found


def oldest(streams: Iterable[list[Event]], count: int) -> list[Event]:
    """The ``count`` oldest events of streams that are each in id order."""
    return list(itertools.islice(heapq.merge(*streams, key=_seq), count))


def merge_replay(streams: list[list[Event]] | None, recovered: bool, position: str,
                 limit: int | None, cap: int, resuming: bool) -> Replay:
    """The answer to a lookup from per-topic streams (None: a gap was found).

    The oldest ``limit`` events when a limit is given (a reader pages on), else every
    one up to ``cap``. A resume (``since`` given, no limit) with more than ``cap`` is
    not recovered, since no replay is ever partial.
    """
    if streams is None:
        return Replay([], False, position)
    keep = cap if limit is None else limit
    events = oldest(streams, keep + 1)
    if len(events) > keep and limit is None and resuming:
        return Replay([], False, position)
    return Replay(events[:keep], recovered, position)


def _seq(event: Event) -> int:
    return event.seq
