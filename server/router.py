"""Topic router: which subscribers want an event published on a topic.

Exact topics live in a dict; patterns (``*``, ``>``) in a segment trie, so ``match``
costs one dict lookup plus a walk bounded by the topic's depth. ``add`` and
``remove`` report the first and last subscriber of a name, so a broker subscribes
upstream only on those edges.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterator
from typing import Generic, TypeVar

from server.topics import SINGLE, TAIL, is_pattern

S = TypeVar("S", bound=Hashable)


class _Node(Generic[S]):
    __slots__ = ("children", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _Node[S]] = {}
        self.subscribers: dict[S, None] | None = None


class Router(Generic[S]):
    """Maps subscription names (topics and patterns) to their subscribers.

    Subscribers are any hashable objects. A subscriber registered under several
    names that all match a topic is returned once by ``match``. ``version`` changes
    whenever a subscription is added or removed, so a caller may reuse a ``match``
    while it stays the same. Not thread-safe: use it from the IOLoop only.
    """

    def __init__(self) -> None:
        self.version = 0
        self._names: dict[str, dict[S, None]] = {}
        self._root: _Node[S] = _Node()
        self._pattern_count = 0

    def add(self, name: str, subscriber: S) -> bool:
        """Subscribe ``subscriber`` to ``name``; True if it is the name's first one."""
        subscribers = self._names.get(name)
        first = subscribers is None
        if subscribers is None:
            subscribers = self._names[name] = {}
            if is_pattern(name):
                self._insert_pattern(name, subscribers)
        subscribers[subscriber] = None
        self.version += 1
        return first

    def remove(self, name: str, subscriber: S) -> bool:
        """Unsubscribe; True if ``name`` has no subscriber left (and was known)."""
        subscribers = self._names.get(name)
        if subscribers is None or subscriber not in subscribers:
            return False
        del subscribers[subscriber]
        self.version += 1
        if subscribers:
            return False
        del self._names[name]
        if is_pattern(name):
            self._delete_pattern(name)
        return True

    def match(self, topic: str) -> Collection[S]:
        """Every subscriber whose topic or pattern matches ``topic``, each once."""
        exact = self._names.get(topic)
        if not self._pattern_count:
            return exact.keys() if exact else ()
        found: dict[S, None] = dict(exact) if exact else {}
        for subscribers in self._pattern_matches(topic.split(".")):
            found.update(subscribers)
        return found.keys()

    def exact(self, name: str) -> Collection[S]:
        """The subscribers of ``name`` itself (a topic or a pattern, literally)."""
        found = self._names.get(name)
        return found.keys() if found else ()

    def subscribers(self, name: str) -> int:
        """How many subscribers ``name`` (a topic or a pattern, literally) has."""
        return len(self._names.get(name, ()))

    def names(self) -> Iterator[tuple[str, int]]:
        """Every subscribed name with its subscriber count."""
        for name, subscribers in self._names.items():
            yield name, len(subscribers)

    def _pattern_matches(self, segments: list[str]) -> Iterator[dict[S, None]]:
        frontier = [self._root]
        for segment in segments:
            next_frontier: list[_Node[S]] = []
            for node in frontier:
                tail = node.children.get(TAIL)
                if tail is not None and tail.subscribers:
                    yield tail.subscribers
                for key in (segment, SINGLE):
                    child = node.children.get(key)
                    if child is not None:
                        next_frontier.append(child)
            if not next_frontier:
                return
            frontier = next_frontier
        for node in frontier:
            if node.subscribers:
                yield node.subscribers

    def _insert_pattern(self, name: str, subscribers: dict[S, None]) -> None:
        node = self._root
        for segment in name.split("."):
            node = node.children.setdefault(segment, _Node())
        node.subscribers = subscribers
        self._pattern_count += 1

    def _delete_pattern(self, name: str) -> None:
        path = [self._root]
        segments = name.split(".")
        for segment in segments:
            path.append(path[-1].children[segment])
        path[-1].subscribers = None
        for depth in range(len(segments), 0, -1):
            node = path[depth]
            if node.children or node.subscribers is not None:
                break
            del path[depth - 1].children[segments[depth - 1]]
        self._pattern_count -= 1
