"""Events as subscribers see them, and their ids.

An id is ``<epoch>-<seq>``: ``seq`` grows by one with every publish on a broker
(across all topics), so ids increase within a topic and one id also says where a
pattern subscription stood. ``epoch`` changes whenever the history behind the ids is
lost (a restart of a memory-only server), so an old id is recognised as
unrecoverable instead of being misread. Clients treat ids as opaque strings.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from server.wire import WS_JSON, WireFormat


class EventId(NamedTuple):
    epoch: str
    seq: int

    def __str__(self) -> str:
        return f"{self.epoch}-{self.seq}"

    @classmethod
    def parse(cls, text: object) -> EventId | None:
        """The id in ``text``, or None when it is not one of ours."""
        if not isinstance(text, str) or len(text) > 64:
            return None
        epoch, _, seq = text.rpartition("-")
        if not epoch or not seq.isdigit() or not seq.isascii():
            return None
        return cls(epoch, int(seq))


class Event:
    """One published event. Immutable by convention; its wire frames are built once.

    ``frame(wire)`` returns the bytes carrying it in a wire format (server/wire.py),
    encoded on first use and shared by every subscriber and every replay afterwards.
    """

    __slots__ = ("_frames", "data", "id", "seq", "topic", "ts")

    def __init__(self, topic: str, event_id: EventId, ts: int, data: Any) -> None:
        self.topic = topic
        self.id = str(event_id)
        self.seq = event_id.seq
        self.ts = ts
        self.data = data
        self._frames: dict[WireFormat, bytes] = {}

    def as_dict(self) -> dict[str, Any]:
        return {"type": "event", "topic": self.topic, "id": self.id, "ts": self.ts,
                "data": self.data}

    def frame(self, wire: WireFormat) -> bytes:
        frame = self._frames.get(wire)
        if frame is None:
            frame = self._frames[wire] = wire.event_frame(self)
        return frame

    @property
    def size(self) -> int:
        """Bytes this event costs to keep: its WebSocket JSON frame, the common form."""
        return len(self.frame(WS_JSON))

    def __repr__(self) -> str:
        return f"Event({self.topic!r}, {self.id!r})"
