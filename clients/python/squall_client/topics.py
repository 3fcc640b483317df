"""Whether a topic matches a subscription name: ``*`` one segment, ``>`` the rest."""

from __future__ import annotations


def matches(name: str, topic: str) -> bool:
    """``name`` (a topic or a pattern, docs/protocol.md) matches the concrete ``topic``."""
    if name == topic:
        return True
    wanted = name.split(".")
    actual = topic.split(".")
    for index, segment in enumerate(wanted):
        if segment == ">":
            return len(actual) > index
        if index >= len(actual) or (segment != "*" and segment != actual[index]):
            return False
    return len(wanted) == len(actual)
