"""Signals: receivers, sender filtering, failure isolation and the async queue."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from tornado.ioloop import IOLoop

from server import signals
from server.signals import AsyncRunner, ClientInfo, Signal, WorkQueue, receiver

CLIENT = ClientInfo(id="c-1", sub="alice", ip="203.0.113.7")


class Calls:
    """A plain receiver that records the keyword arguments of each call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> None:
        self.calls.append(kwargs)


class Gate:
    """An async receiver that records calls and waits for ``open`` before returning."""

    def __init__(self) -> None:
        self.started: list[dict[str, Any]] = []
        self.finished: list[dict[str, Any]] = []
        self.entered = asyncio.Event()
        self.opened = asyncio.Event()

    async def __call__(self, **kwargs: Any) -> None:
        self.started.append(kwargs)
        self.entered.set()
        await self.opened.wait()
        self.finished.append(kwargs)


@pytest.fixture
def runner(io_loop: IOLoop) -> Iterator[AsyncRunner]:
    runner = AsyncRunner(max_queue=100, receiver_timeout=5)
    yield runner
    assert io_loop.run_sync(lambda: runner.shutdown(5))


@pytest.fixture
def signal(runner: AsyncRunner) -> Signal:
    return Signal("test", runner=runner)


def test_sync_receiver_gets_signal_sender_and_kwargs(signal: Signal) -> None:
    calls = Calls()
    signal.connect(calls)
    signal.send("me", client=CLIENT, topic="a.b")
    assert calls.calls == [{"signal": signal, "sender": "me", "client": CLIENT, "topic": "a.b"}]


SENDER_A, SENDER_B = object(), object()


@pytest.mark.parametrize(("connected_for", "sent_by", "heard"), [
    (None, SENDER_A, True),
    (None, None, True),
    (SENDER_A, SENDER_A, True),
    (SENDER_A, SENDER_B, False),
    (SENDER_A, None, False),
])
def test_sender_filter(signal: Signal, connected_for: object, sent_by: object,
                       heard: bool) -> None:
    calls = Calls()
    signal.connect(calls, sender=connected_for)
    signal.send(sent_by)
    assert len(calls.calls) == int(heard)


def test_connect_twice_connects_once_and_disconnect_reports(signal: Signal) -> None:
    calls = Calls()
    signal.connect(calls)
    signal.connect(calls)
    signal.connect(calls, sender=SENDER_A)
    signal.send(SENDER_A)
    assert len(calls.calls) == 2
    assert signal.disconnect(calls)
    assert not signal.disconnect(calls)
    assert not signal.disconnect(calls, sender=SENDER_B)
    assert signal.disconnect(calls, sender=SENDER_A)
    assert not signal.has_receivers


def test_bound_method_can_be_disconnected(signal: Signal) -> None:
    heard: list[object] = []
    signal.connect(heard.append)
    assert signal.disconnect(heard.append)  # a new bound method object, equal to the first
    signal.send(None)
    assert heard == []
    assert not signal.has_receivers


def test_has_receivers(signal: Signal) -> None:
    assert not signal.has_receivers
    signal.connect(Calls(), sender=SENDER_A)
    assert signal.has_receivers


def test_non_callable_receiver_is_refused(signal: Signal) -> None:
    with pytest.raises(TypeError, match="not callable"):
        signal.connect("nope")  # type: ignore[arg-type]


def test_receiver_decorator_connects_one_or_many(runner: AsyncRunner) -> None:
    first, second = Signal("first", runner), Signal("second", runner)
    seen: list[tuple[str, object]] = []

    @receiver([first, second])
    def on_both(*, signal: Signal, sender: object, **kwargs: Any) -> None:
        seen.append((signal.name, sender))

    @receiver(first, sender=SENDER_A)
    def on_first_from_a(*, signal: Signal, sender: object, **kwargs: Any) -> None:
        seen.append(("a-only", sender))

    first.send(SENDER_B)
    second.send(SENDER_A)
    first.send(SENDER_A)
    assert seen == [("first", SENDER_B), ("second", SENDER_A), ("first", SENDER_A),
                    ("a-only", SENDER_A)]
    assert on_both.__name__ == "on_both"


def test_raising_receiver_is_logged_and_the_next_still_runs(
        signal: Signal, caplog: pytest.LogCaptureFixture) -> None:
    def broken(**kwargs: Any) -> None:
        raise RuntimeError("receiver bug")

    calls = Calls()
    signal.connect(broken)
    signal.connect(calls)
    signal.send(None, topic="x")
    assert len(calls.calls) == 1
    [record] = [r for r in caplog.records if r.name == "squall.signals"]
    assert record.levelno == logging.ERROR
    assert "broken" in record.getMessage() and "test" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError


def test_receiver_may_disconnect_itself_during_send(signal: Signal) -> None:
    calls = Calls()

    def once(**kwargs: Any) -> None:
        signal.disconnect(once)

    signal.connect(once)
    signal.connect(calls)
    signal.send(None)
    signal.send(None)
    assert len(calls.calls) == 2
    assert not signal.disconnect(once)


@pytest.mark.gen_test(timeout=10)
async def test_async_receiver_runs_after_send_returns(signal: Signal,
                                                      runner: AsyncRunner) -> None:
    seen: list[dict[str, Any]] = []

    async def on_signal(**kwargs: Any) -> None:
        seen.append(kwargs)

    signal.connect(on_signal)
    signal.send("me", topic="t")
    assert seen == []
    assert await runner.drain(5)
    assert seen == [{"signal": signal, "sender": "me", "topic": "t"}]


@pytest.mark.gen_test(timeout=10)
async def test_async_callable_object_is_queued(signal: Signal, runner: AsyncRunner) -> None:
    gate = Gate()
    gate.opened.set()
    signal.connect(gate)
    signal.send(None)
    assert gate.started == []
    assert await runner.drain(5)
    assert len(gate.finished) == 1


@pytest.mark.gen_test(timeout=10)
async def test_slow_async_receiver_delays_neither_send_nor_plain_receivers(
        signal: Signal, runner: AsyncRunner) -> None:
    gate, calls = Gate(), Calls()
    signal.connect(gate)
    signal.connect(calls)
    signal.send(None, n=1)
    await asyncio.wait_for(gate.entered.wait(), 5)
    signal.send(None, n=2)
    assert [c["n"] for c in calls.calls] == [1, 2]
    assert not await runner.drain(0.05)
    gate.opened.set()
    assert await runner.drain(5)
    assert [c["n"] for c in gate.finished] == [1, 2]


@pytest.mark.gen_test(timeout=10)
async def test_failing_async_receiver_is_logged_and_the_queue_goes_on(
        signal: Signal, runner: AsyncRunner, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[int] = []

    async def flaky(*, n: int, **kwargs: Any) -> None:
        if n == 1:
            raise ValueError("async receiver bug")
        seen.append(n)

    signal.connect(flaky)
    signal.send(None, n=1)
    signal.send(None, n=2)
    assert await runner.drain(5)
    assert seen == [2]
    [record] = [r for r in caplog.records if r.name == "squall.signals"]
    assert record.levelno == logging.ERROR and "flaky" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is ValueError


@pytest.mark.gen_test(timeout=10)
async def test_a_receiver_raising_timeout_error_is_not_reported_as_too_slow(
        signal: Signal, runner: AsyncRunner, caplog: pytest.LogCaptureFixture) -> None:
    async def gives_up(**kwargs: Any) -> None:
        raise TimeoutError("its own deadline")

    signal.connect(gives_up)
    signal.send(None)
    assert await runner.drain(5)
    [record] = [r for r in caplog.records if r.name == "squall.signals"]
    assert "gives_up of signal test failed" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is TimeoutError


@pytest.mark.gen_test(timeout=10)
async def test_hanging_async_receiver_is_cancelled_after_the_timeout(
        caplog: pytest.LogCaptureFixture) -> None:
    runner = AsyncRunner(receiver_timeout=0.05)
    signal = Signal("test", runner)
    gate = Gate()
    cancelled = asyncio.Event()

    async def hangs(**kwargs: Any) -> None:
        try:
            await gate(**kwargs)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    signal.connect(hangs)
    signal.send(None)
    assert await runner.drain(5)
    assert cancelled.is_set()
    assert any("did not finish" in r.getMessage() for r in caplog.records
               if r.name == "squall.signals" and r.levelno == logging.ERROR)
    assert await runner.shutdown(1)


@pytest.mark.gen_test(timeout=10)
async def test_full_queue_drops_counts_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    runner = AsyncRunner(max_queue=2)
    signal = Signal("test", runner)
    gate = Gate()
    signal.connect(gate)
    for n in range(5):
        signal.send(None, n=n)
    assert signal.dropped == 3
    warnings = [r for r in caplog.records
                if r.name == "squall.signals" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "full" in warnings[0].getMessage()
    gate.opened.set()
    assert await runner.drain(5)
    assert [c["n"] for c in gate.finished] == [0, 1]
    assert await runner.shutdown(1)


def test_async_send_without_a_running_loop_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    signal = Signal("test", AsyncRunner())
    signal.connect(Gate())
    signal.send(None)
    signal.send(None)
    assert signal.dropped == 2
    warnings = [r for r in caplog.records if r.name == "squall.signals"]
    assert len(warnings) == 1 and "running event loop" in warnings[0].getMessage()


@pytest.mark.gen_test(timeout=10)
async def test_shutdown_reports_lost_calls_and_a_later_send_starts_again(
        signal: Signal, runner: AsyncRunner) -> None:
    gate = Gate()
    signal.connect(gate)
    signal.send(None)
    signal.send(None)
    await asyncio.wait_for(gate.entered.wait(), 5)
    assert not await runner.shutdown(0.05)
    assert gate.finished == []
    gate.opened.set()
    signal.send(None)
    assert await runner.drain(5)
    assert len(gate.finished) == 1


@pytest.mark.gen_test(timeout=10)
async def test_work_queue_close_counts_the_item_in_hand_and_the_queued() -> None:
    gate = Gate()

    async def handle(item: int) -> None:
        await gate(item=item)

    queue: WorkQueue[int] = WorkQueue("test", handle, max_size=10)
    assert all(queue.put(n) for n in range(3))
    await asyncio.wait_for(gate.entered.wait(), 5)
    assert len(queue) == 3
    assert await queue.close(0.01) == 3
    assert len(queue) == 0


def test_work_queue_refuses_a_size_below_one() -> None:
    async def handle(item: int) -> None:
        pass

    with pytest.raises(ValueError, match="at least 1"):
        WorkQueue("test", handle, max_size=0)


@pytest.mark.gen_test(timeout=10)
async def test_module_drain_covers_the_builtin_signals() -> None:
    gate = Gate()
    gate.opened.set()
    signals.subscribed.connect(gate)
    try:
        signals.subscribed.send(None, client=CLIENT, topic="a")
        assert await signals.drain(5)
        assert gate.finished == [{"signal": signals.subscribed, "sender": None,
                                  "client": CLIENT, "topic": "a"}]
    finally:
        assert signals.subscribed.disconnect(gate)
        assert await signals.shutdown(5)


def test_builtin_signals_are_named_and_listed() -> None:
    names = ["client_connected", "client_disconnected", "subscribed", "unsubscribed",
             "event_published", "slow_consumer_closed", "topic_occupied", "topic_vacated"]
    assert list(signals.SIGNALS) == names
    for name in names:
        assert getattr(signals, name) is signals.SIGNALS[name]
        assert signals.SIGNALS[name].name == name


def test_client_info_is_frozen_and_turns_into_a_dict() -> None:
    assert CLIENT.as_dict() == {"id": "c-1", "sub": "alice", "ip": "203.0.113.7",
                               "info": None}
    assert ClientInfo("c-2", None, "::1").as_dict()["sub"] is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        CLIENT.id = "other"  # type: ignore[misc]


@pytest.mark.gen_test(timeout=10)
async def test_example_hooks_module(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="squall.hooks.example")
    sys.modules.pop("examples.squall_hooks", None)  # importing it is what connects it
    hooks = importlib.import_module("examples.squall_hooks")
    connected = [(hooks.log_subscription, [signals.subscribed]),
                 (hooks.count_connections, [signals.client_connected,
                                            signals.client_disconnected]),
                 (hooks.report_slow_consumer, [signals.slow_consumer_closed])]
    try:
        signals.client_connected.send(None, client=CLIENT)
        signals.subscribed.send(None, client=CLIENT, topic="orders.eu")
        signals.slow_consumer_closed.send(None, client=CLIENT, queued_bytes=2048)
        signals.client_disconnected.send(None, client=CLIENT, code=4008, reason="slow")
        assert await signals.drain(5)
    finally:
        for func, connected_to in connected:
            for each in connected_to:
                assert each.disconnect(func)
        assert await signals.shutdown(5)
    assert (hooks.connections.open, hooks.connections.total) == (0, 1)
    messages = [r.getMessage() for r in caplog.records if r.name == "squall.hooks.example"]
    assert messages == ["alice (c-1, 203.0.113.7) subscribed to orders.eu",
                        "closed slow consumer c-1 with 2048 bytes queued"]
