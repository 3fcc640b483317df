"""Events as subscribers see them, and their ids.

An id is ``<epoch>-<seq>``: ``seq`` grows by one with every publish on a broker
(across all topics), so ids increase within a topic and one id also says where a
pattern subscription stood. ``epoch`` changes whenever the history behind the ids is
lost (a restart of a memory-only server), so an old id is recognised as
unrecoverable instead of being misread. Clients treat ids as opaque strings.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from server.codec import JSON, Codec, dump_json
from server.wire import WireFormat

MAX_SEQ = 2**63 - 1  # past any seq a broker gives out (and past what a Redis stream id holds)


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
        if (not epoch or not seq.isdigit() or not seq.isascii() or int(seq) > MAX_SEQ
                or (seq[0] == "0" and len(seq) > 1)):  # (never issued: "-01" is not "-1")
            return None
        return cls(epoch, int(seq))


_PAYLOAD = b'{"type":"event","topic":"%s","id":"%s","ts":%d,"data":%s}'
_PAYLOAD_OVERHEAD = len(_PAYLOAD) - 4 * 2  # its bytes but the four placeholders
_TS_13_DIGITS = 10 ** 12  # ms timestamps from 2001 to 2286 have 13 digits


class Event:
    """One published event. Immutable by convention; its wire frames are built once.

    ``frame(wire)`` returns the bytes carrying it in a wire format (server/wire.py),
    built on first use and shared by every subscriber and every replay afterwards.
    The formats that carry JSON share one JSON payload, made from ``data_json`` (the
    data's JSON, when whoever published it had it already) without encoding the data
    again.
    """

    __slots__ = ("_data_json", "_frames", "_json", "_size", "data", "id", "seq", "topic", "ts")

    def __init__(self, topic: str, event_id: str, seq: int, ts: int, data: Any,
                 data_json: bytes | None = None) -> None:
        self.topic = topic
        self.id = event_id  # str(EventId(epoch, seq))
        self.seq = seq
        self.ts = ts
        self.data = data
        self._data_json = data_json
        self._json: bytes | None = None
        self._size = 0
        self._frames: dict[WireFormat, bytes] | None = None  # made when first framed

    @classmethod
    def of(cls, topic: str, event_id: EventId, ts: int, data: Any) -> Event:
        return cls(topic, str(event_id), event_id.seq, ts, data)

    def as_dict(self) -> dict[str, Any]:
        return {"type": "event", "topic": self.topic, "id": self.id, "ts": self.ts,
                "data": self.data}

    def frame(self, wire: WireFormat) -> bytes:
        frames = self._frames
        if frames is None:
            frames = self._frames = {}
        frame = frames.get(wire)
        if frame is None:
            frame = frames[wire] = wire.event_frame(self)
        return frame

    def payload(self, codec: Codec) -> bytes:
        """The event's message encoded by ``codec``: ``{"type": "event", "topic", "id",
        "ts", "data"}`` (in that order)."""
        if codec is not JSON:
            return codec.dumps(self.as_dict())
        payload = self._json
        if payload is None:
            # topics and ids hold no character JSON escapes
            payload = self._json = _PAYLOAD % (self.topic.encode(), self.id.encode(), self.ts,
                                               self._data())
            self._data_json = None
        return payload

    def _data(self) -> bytes:
        data = self._data_json
        if data is None:
            data = self._data_json = dump_json(self.data)
        return data

    @property
    def size(self) -> int:
        """Bytes this event costs to keep: its WebSocket JSON frame, the common form
        (worked out once, without building it)."""
        size = self._size
        if size:
            return size
        if self._json is not None:
            length = len(self._json)
        else:
            data, ts = self._data_json, self.ts
            if data is None:
                data = self._data()
            length = (_PAYLOAD_OVERHEAD + len(self.topic) + len(self.id) + len(data)
                      + (13 if _TS_13_DIGITS <= ts < 10 * _TS_13_DIGITS else len(str(ts))))
        size = self._size = length + (2 if length < 126 else 4 if length < 65536 else 10)
        return size

    def __repr__(self) -> str:
        return f"Event({self.topic!r}, {self.id!r})"
