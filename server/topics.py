"""Topic names and subscription patterns (docs/protocol.md, Topics).

A topic is 1 to 255 characters: segments of ``[A-Za-z0-9_\\-:@]`` joined by ``.``.
A pattern may also use ``*`` (exactly one segment) and ``>`` (one or more trailing
segments, last segment only). This is the NATS convention.
"""

from __future__ import annotations

import functools
import re

MAX_TOPIC_LENGTH = 255
SINGLE = "*"
TAIL = ">"

_SEGMENT = re.compile(r"[A-Za-z0-9_\-:@]+")


class InvalidTopic(ValueError):
    """A topic or pattern that breaks the naming rules; the message says which rule."""


def validate_topic(name: object, max_length: int = MAX_TOPIC_LENGTH) -> str:
    """Return ``name`` if it is a valid concrete topic (no wildcards), else raise."""
    if type(name) is str and name in _VALID_TOPICS and len(name) <= max_length:
        return name  # publishers name the same few topics again and again
    topic = _validate_topic(name, max_length)
    if len(_VALID_TOPICS) >= _REMEMBERED:
        _VALID_TOPICS.clear()
    _VALID_TOPICS[topic] = None
    return topic


# Topics found valid lately (at some length limit: the length is checked again), a
# bounded memo of a pure function (cleared when full).
_VALID_TOPICS: dict[str, None] = {}
_REMEMBERED = 4096


def _validate_topic(name: object, max_length: int) -> str:
    topic = _text(name, max_length)
    for segment in _segments(topic):
        if segment in (SINGLE, TAIL):
            raise InvalidTopic(f"topic {topic!r} has a wildcard; wildcards are for subscriptions")
        _check_segment(topic, segment)
    return topic


def validate_pattern(name: object, max_length: int = MAX_TOPIC_LENGTH) -> str:
    """Return ``name`` if it is a valid topic or subscription pattern, else raise."""
    pattern = _text(name, max_length)
    segments = _segments(pattern)
    for index, segment in enumerate(segments):
        if segment == TAIL and index != len(segments) - 1:
            raise InvalidTopic(f"pattern {pattern!r} has '>' before its last segment")
        if segment not in (SINGLE, TAIL):
            _check_segment(pattern, segment)
    return pattern


def is_pattern(name: str) -> bool:
    """Whether a (valid) subscription name contains a wildcard segment."""
    return any(segment in (SINGLE, TAIL) for segment in name.split("."))


def matches(pattern: str, topic: str) -> bool:
    """Whether a concrete ``topic`` matches a subscription ``pattern``."""
    pattern_segments = pattern.split(".")
    topic_segments = topic.split(".")
    for index, segment in enumerate(pattern_segments):
        if segment == TAIL:
            return len(topic_segments) > index
        if index >= len(topic_segments):
            return False
        if segment != SINGLE and segment != topic_segments[index]:
            return False
    return len(pattern_segments) == len(topic_segments)


@functools.lru_cache(maxsize=4096)
def covers(granted: str, requested: str) -> bool:
    """Whether every topic that ``requested`` matches is also matched by ``granted``.

    Both are valid patterns (or topics). ``*`` in ``requested`` needs ``*`` or ``>`` in
    ``granted``; ``>`` in ``requested`` needs ``>``.
    """
    have, want = granted.split("."), requested.split(".")
    for index, segment in enumerate(have):
        if segment == TAIL:
            return len(want) > index
        if index >= len(want) or want[index] == TAIL:
            return False
        if segment != SINGLE and (want[index] == SINGLE or want[index] != segment):
            return False
    return len(have) == len(want)


def _text(name: object, max_length: int) -> str:
    if not isinstance(name, str):
        raise InvalidTopic(f"topic must be a string, not {type(name).__name__}")
    if not name:
        raise InvalidTopic("topic is empty")
    if len(name) > max_length:
        raise InvalidTopic(f"topic is {len(name)} characters long; the limit is {max_length}")
    return name


def _segments(name: str) -> list[str]:
    segments = name.split(".")
    if "" in segments:
        raise InvalidTopic(f"topic {name!r} has an empty segment")
    return segments


def _check_segment(name: str, segment: str) -> None:
    if not _SEGMENT.fullmatch(segment):
        raise InvalidTopic(
            f"topic {name!r} has an invalid segment {segment!r}: "
            "use letters, digits and _ - : @ only"
        )
