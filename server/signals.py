"""Signals: the server's extension points, in the style of Django's dispatcher.

A ``Signal`` is a named event of the server. Code that wants to hear of it connects
a *receiver*; the server calls ``send`` and every matching receiver is called as::

    receiver(signal=<the Signal>, sender=<the sender>, **kwargs)

Receivers should accept ``**kwargs`` so that arguments added later do not break them.

The contract:

- ``connect(receiver, sender=None)``: with a sender, the receiver hears only sends by
  that very object (compared by identity); without one, it hears every send.
  Connecting the same receiver and sender twice connects it once. Receivers are
  held by strong references until ``disconnect``; bound methods compare equal when
  they wrap the same function and object, so ``disconnect(obj.method)`` works.
- Plain functions run inline in ``send``, in the order they were connected. An
  exception in one is logged with its traceback on the ``squall.signals`` logger and
  never reaches the sender or stops the other receivers.
- Coroutine functions (``async def``) never delay the sender: ``send`` puts the call
  on a bounded queue, one per event loop, drained one call at a time, in order, by
  one supervised task that starts with the first queued call. A call that is still
  running after ``receiver_timeout`` seconds is cancelled and logged; errors are
  logged as for plain receivers. A receiver with long work should start its own
  task. When the queue is full the call is dropped: ``Signal.dropped`` counts the
  drops and a warning is logged at most every few seconds. ``send`` must be called
  on the event loop's thread; an async call sent while no loop runs is dropped.
- ``has_receivers`` is a cheap check, so the server can skip building arguments::

      if signals.subscribed.has_receivers:
          signals.subscribed.send(self, client=info, topic=topic)

- ``await drain(timeout)`` waits until the queued async calls of the current loop
  are done (tests, graceful shutdown); ``await shutdown(timeout)`` drains and then
  stops the loop's worker. ``configure(max_queue=..., receiver_timeout=...)``
  applies the settings to the default runner.

The built-in signals and the keyword arguments the server sends with them:

==========================  ==========================================================
``client_connected``        ``client: ClientInfo``
``client_disconnected``     ``client: ClientInfo, code: int | None, reason: str | None``
``subscribed``              ``client: ClientInfo, topic: str``
``unsubscribed``            ``client: ClientInfo, topic: str``
``event_published``         ``event: PublishedEvent`` (``topic``, ``id``, ``ts``, ``data``)
``slow_consumer_closed``    ``client: ClientInfo, queued_bytes: int``
``topic_occupied``          ``topic: str``: the first subscriber of that name (a topic or
                            a pattern) appeared on some node of the cluster
``topic_vacated``           ``topic: str``: the name has had no subscriber anywhere for
                            ``lifecycle_debounce`` seconds (or its last ones were on a
                            node that died)
==========================  ==========================================================

``topic_occupied`` and ``topic_vacated`` are sent once per change in the whole cluster,
by the one node the broker chose, and alternate for each name (server/presence.py).

``SIGNALS`` maps each built-in signal's name to it (webhooks name signals so).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, Protocol, TypeVar, cast

from server import tasks
from server.logs import Throttle

log = logging.getLogger("squall.signals")

Receiver = Callable[..., object]
"""A receiver: ``f(*, signal, sender, **kwargs)``, plain or ``async def``."""

R = TypeVar("R", bound=Receiver)
T = TypeVar("T")

DEFAULT_MAX_QUEUE = 10_000
DEFAULT_RECEIVER_TIMEOUT = 30.0
_WARN_INTERVAL = 10.0


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """Who a client is, as receivers and webhooks see it: ``info`` is its token's
    ``squall.info`` object (or None), ``connected_at`` when it connected (ms since
    the Unix epoch)."""

    id: str
    sub: str | None
    ip: str
    info: Mapping[str, Any] | None = field(default=None, compare=False)
    connected_at: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "sub": self.sub, "ip": self.ip, "info": self.info}


class PublishedEvent(Protocol):
    """What ``event_published`` receivers get as ``event``."""

    @property
    def topic(self) -> str: ...

    @property
    def id(self) -> str: ...

    @property
    def ts(self) -> int: ...

    @property
    def data(self) -> Any: ...


class WorkQueue(Generic[T]):
    """A bounded FIFO of items handled one at a time by one supervised task.

    ``put`` never blocks: it returns False when the queue is full (the caller counts
    the drop; a warning is logged at most every few seconds). The task is started
    by the first ``put`` (or ``start``) made while an event loop runs, and lives on
    that loop. An exception from ``handle`` is logged with its traceback and the
    next item is handled. ``join`` waits until the queue is empty and idle;
    ``close`` joins, then cancels the task and says how many items were left
    unhandled (the one being handled included).
    """

    def __init__(self, name: str, handle: Callable[[T], Awaitable[None]], max_size: int,
                 logger: logging.Logger = log) -> None:
        if max_size < 1:
            raise ValueError(f"queue {name!r}: max_size must be at least 1, not {max_size}")
        self.name = name
        self.max_size = max_size
        self._handle = handle
        self.logger = logger
        self._items: deque[T] = deque()
        self._busy = False
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._full_warning = Throttle(_WARN_INTERVAL)

    def __len__(self) -> int:
        return len(self._items) + self._busy

    def put(self, item: T) -> bool:
        if len(self._items) >= self.max_size:
            self._warn_full()
            return False
        self._items.append(item)
        self._idle.clear()
        self._wakeup.set()
        self.start()
        return True

    def start(self) -> None:
        """Start the task if an event loop runs and it is not started yet."""
        if self._task is None or self._task.done():
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return
            self._task = tasks.supervise(f"queue {self.name}", self._work)

    async def join(self, timeout: float | None = None) -> bool:
        """Wait until every queued item is handled; False if ``timeout`` ran out first."""
        if self._items:
            self.start()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self, timeout: float | None = None) -> int:
        """Join for up to ``timeout``, stop the task, drop the rest; return how many."""
        await self.join(timeout)
        left = len(self)
        await tasks.stop(self._task)
        self._task = None
        self._items.clear()
        self._busy = False
        self._idle.set()
        return left

    async def _work(self) -> None:
        while True:
            self._wakeup.clear()
            while self._items:
                await self._handle_one(self._items.popleft())
            self._idle.set()
            await self._wakeup.wait()

    async def _handle_one(self, item: T) -> None:
        self._busy = True
        try:
            await self._handle(item)
        except Exception:
            self.logger.exception("queue %s: error while handling an item", self.name)
        finally:
            self._busy = False

    def _warn_full(self) -> None:
        if self._full_warning.ready():
            held = self._full_warning.take_held()
            self.logger.warning("queue %s is full (%d items): dropping an item "
                              "(%d more dropped since the last warning)",
                              self.name, self.max_size, held)


@dataclass(slots=True)
class _Call:
    signal: Signal
    receiver: Receiver
    sender: object
    kwargs: dict[str, Any]

    @property
    def who(self) -> str:
        module = getattr(self.receiver, "__module__", None) or "?"
        name = getattr(self.receiver, "__qualname__", None) or repr(self.receiver)
        return f"{module}.{name}"


class AsyncRunner:
    """Runs coroutine receivers off the sender's path: one ``WorkQueue`` per event loop."""

    def __init__(self, max_queue: int = DEFAULT_MAX_QUEUE,
                 receiver_timeout: float | None = DEFAULT_RECEIVER_TIMEOUT) -> None:
        self.max_queue = max_queue
        self.receiver_timeout = receiver_timeout
        self._queues: dict[asyncio.AbstractEventLoop, WorkQueue[_Call]] = {}
        self._no_loop_warning = Throttle(_WARN_INTERVAL)

    def submit(self, call: _Call) -> bool:
        """Queue ``call`` on the running loop; False when it was dropped."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            if self._no_loop_warning.ready():
                log.warning("signal %s: async receivers need a running event loop; "
                            "dropping the call", call.signal.name)
            return False
        return self._queue(loop).put(call)

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until the current loop's queued calls are done; False on timeout."""
        queue = self._queues.get(asyncio.get_running_loop())
        return queue is None or await queue.join(timeout)

    async def shutdown(self, timeout: float | None = None) -> bool:
        """Drain for up to ``timeout``, then stop this loop's worker; False if calls were lost."""
        queue = self._queues.pop(asyncio.get_running_loop(), None)
        return queue is None or await queue.close(timeout) == 0

    def _queue(self, loop: asyncio.AbstractEventLoop) -> WorkQueue[_Call]:
        queue = self._queues.get(loop)
        if queue is None:
            self._forget_closed_loops()
            queue = self._queues[loop] = WorkQueue("signals", self._run, self.max_queue)
        return queue

    def _forget_closed_loops(self) -> None:
        for loop in [loop for loop in self._queues if loop.is_closed()]:
            del self._queues[loop]

    async def _run(self, call: _Call) -> None:
        receiver = cast(Callable[..., Awaitable[object]], call.receiver)
        deadline = asyncio.timeout(self.receiver_timeout)
        try:
            async with deadline:
                await receiver(signal=call.signal, sender=call.sender, **call.kwargs)
        except Exception:
            if deadline.expired():
                log.error("receiver %s of signal %s did not finish in %s s; cancelled",
                          call.who, call.signal.name, self.receiver_timeout)
            else:
                log.exception("receiver %s of signal %s failed", call.who, call.signal.name)


default_runner = AsyncRunner()


@dataclass(frozen=True, slots=True)
class _Connection:
    receiver: Receiver
    sender: object
    is_async: bool

    def matches(self, receiver: Receiver, sender: object) -> bool:
        return self.receiver == receiver and self.sender is sender


class Signal:
    """A named extension point; see the module docstring for the contract."""

    def __init__(self, name: str, runner: AsyncRunner | None = None) -> None:
        self.name = name
        self.dropped = 0
        """Async receiver calls dropped because the queue was full or no loop ran."""
        self._runner = runner
        self._connections: tuple[_Connection, ...] = ()

    def __repr__(self) -> str:
        return f"Signal({self.name!r})"

    @property
    def has_receivers(self) -> bool:
        return bool(self._connections)

    def connect(self, receiver: Receiver, sender: object = None) -> None:
        """Call ``receiver`` on every send (by ``sender`` only, when one is given)."""
        if not callable(receiver):
            raise TypeError(f"signal {self.name}: receiver {receiver!r} is not callable")
        if not any(c.matches(receiver, sender) for c in self._connections):
            connection = _Connection(receiver, sender, _is_async(receiver))
            self._connections = (*self._connections, connection)

    def disconnect(self, receiver: Receiver, sender: object = None) -> bool:
        """Undo ``connect(receiver, sender)``; False if it was not connected."""
        kept = tuple(c for c in self._connections if not c.matches(receiver, sender))
        found = len(kept) != len(self._connections)
        self._connections = kept
        return found

    def send(self, sender: object, **kwargs: Any) -> None:
        """Call plain receivers now and queue async ones; never raises from a receiver."""
        for connection in self._connections:
            if connection.sender is None or connection.sender is sender:
                call = _Call(self, connection.receiver, sender, kwargs)
                if connection.is_async:
                    self._submit(call)
                else:
                    _call_inline(call)

    def _submit(self, call: _Call) -> None:
        if not (self._runner or default_runner).submit(call):
            self.dropped += 1


def _call_inline(call: _Call) -> None:
    try:
        call.receiver(signal=call.signal, sender=call.sender, **call.kwargs)
    except Exception:
        log.exception("receiver %s of signal %s failed", call.who, call.signal.name)


def _is_async(receiver: Receiver) -> bool:
    # objects whose __call__ is ``async def`` are async receivers too
    return inspect.iscoroutinefunction(receiver) or inspect.iscoroutinefunction(
        type(receiver).__call__)


def receiver(signal: Signal | Iterable[Signal], sender: object = None) -> Callable[[R], R]:
    """Decorator: connect the decorated function to one signal or to each of several."""
    signals = [signal] if isinstance(signal, Signal) else list(signal)

    def connect(func: R) -> R:
        for each in signals:
            each.connect(func, sender=sender)
        return func

    return connect


def configure(*, max_queue: int | None = None, receiver_timeout: float | None = None) -> None:
    """Apply the settings to the default runner (queues already made keep their size)."""
    if max_queue is not None:
        default_runner.max_queue = max_queue
    if receiver_timeout is not None:
        default_runner.receiver_timeout = receiver_timeout


async def drain(timeout: float | None = None) -> bool:
    """Wait until the default runner's queued async calls on this loop are done."""
    return await default_runner.drain(timeout)


async def shutdown(timeout: float | None = None) -> bool:
    """Drain for up to ``timeout``, then stop the default runner's worker on this loop."""
    return await default_runner.shutdown(timeout)


client_connected = Signal("client_connected")
client_disconnected = Signal("client_disconnected")
subscribed = Signal("subscribed")
unsubscribed = Signal("unsubscribed")
event_published = Signal("event_published")
slow_consumer_closed = Signal("slow_consumer_closed")
topic_occupied = Signal("topic_occupied")
topic_vacated = Signal("topic_vacated")

SIGNALS: Mapping[str, Signal] = MappingProxyType({s.name: s for s in (
    client_connected, client_disconnected, subscribed, unsubscribed, event_published,
    slow_consumer_closed, topic_occupied, topic_vacated)})
