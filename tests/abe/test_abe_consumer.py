"""Tests for AsyncLoopConsumer, the default EventConsumer runtime."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest

from abe.backends.message_queue.base import EventConsumer
from abe.backends.message_queue.consumer import AsyncLoopConsumer

LOGGER = "abe.backends.message_queue.consumer"

# A bound on waits that should finish at once, so a regression fails instead of hanging.
GUARD = 5.0


def assert_stopped(consumer: AsyncLoopConsumer) -> None:
    """Assert that ``consumer`` holds no task and is not running.

    A function of its own, so the checks read the attributes afresh after the caller's earlier
    assertions about them (a type checker would otherwise keep those narrowed).
    """
    assert consumer._task is None
    assert consumer._running is False


class FakeBackend:
    """A backend that yields predetermined payloads, then waits (``endless``) or stops."""

    def __init__(self, payloads: Iterable[dict[str, Any]] = (), *, endless: bool = True) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        for payload in payloads:
            self.queue.put_nowait(payload)
        self.endless = endless
        self.groups: list[str | None] = []
        self.consuming = asyncio.Event()

    async def publish(self, key: str, payload: dict[str, Any]) -> None:
        await self.queue.put(payload)

    async def consume(self, *, group: str | None = None) -> AsyncIterator[dict[str, Any]]:
        self.groups.append(group)
        self.consuming.set()
        while self.endless or not self.queue.empty():
            yield await self.queue.get()

    @classmethod
    def from_env(cls) -> FakeBackend:
        return cls()


class RaisingOnCancelBackend(FakeBackend):
    """A backend whose iterator turns its cancellation into ``exc``."""

    def __init__(self, exc: Exception) -> None:
        super().__init__()
        self.exc = exc

    async def consume(self, *, group: str | None = None) -> AsyncIterator[dict[str, Any]]:
        self.consuming.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise self.exc from None
        yield {}  # pragma: no cover - makes this an async generator


async def _noop(payload: dict[str, Any]) -> None:
    pass


async def _start(consumer: AsyncLoopConsumer, backend: FakeBackend) -> asyncio.Task[None]:
    task = asyncio.create_task(consumer.run(_noop))
    async with asyncio.timeout(GUARD):
        await backend.consuming.wait()
    return task


async def test_async_loop_consumer_is_an_event_consumer() -> None:
    """AsyncLoopConsumer satisfies the runtime-checkable EventConsumer protocol."""
    consumer = AsyncLoopConsumer(FakeBackend())
    assert isinstance(consumer, EventConsumer)


async def test_handler_is_awaited_per_payload_in_order() -> None:
    """Each payload is handed to the handler in order, one complete await at a time."""
    payloads = [{"n": 1}, {"n": 2}, {"n": 3}]
    events: list[tuple[str, int]] = []

    async def handler(payload: dict[str, Any]) -> None:
        events.append(("start", payload["n"]))
        await asyncio.sleep(0)
        events.append(("end", payload["n"]))

    consumer = AsyncLoopConsumer(FakeBackend(payloads, endless=False))
    await consumer.run(handler)

    assert events == [(edge, n) for n in (1, 2, 3) for edge in ("start", "end")]


async def test_handler_exception_is_logged_with_traceback_and_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A handler exception is logged at ERROR with its traceback and later payloads still run."""
    seen: list[int] = []

    async def handler(payload: dict[str, Any]) -> None:
        seen.append(payload["n"])
        if payload["n"] == 2:
            raise ValueError("bad payload 2")

    caplog.set_level(logging.DEBUG, logger=LOGGER)
    consumer = AsyncLoopConsumer(FakeBackend([{"n": 1}, {"n": 2}, {"n": 3}], endless=False))
    await consumer.run(handler)

    assert seen == [1, 2, 3]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "bad payload 2" in errors[0].getMessage()
    assert errors[0].exc_info is not None
    assert errors[0].exc_info[0] is ValueError


async def test_cancelled_error_from_handler_propagates_out_of_run() -> None:
    """A CancelledError raised by the handler ends run() with CancelledError; shutdown() then
    resets the state."""
    seen: list[int] = []

    async def handler(payload: dict[str, Any]) -> None:
        seen.append(payload["n"])
        raise asyncio.CancelledError

    consumer = AsyncLoopConsumer(FakeBackend([{"n": 1}, {"n": 2}], endless=False))
    with pytest.raises(asyncio.CancelledError):
        await consumer.run(handler)

    assert seen == [1]
    assert consumer._task is not None
    assert consumer._task.cancelled()
    await consumer.shutdown()
    assert_stopped(consumer)


async def test_group_is_forwarded_to_backend_consume() -> None:
    """The consumer group given at construction is passed to backend.consume(group=...)."""
    backend = FakeBackend([{"n": 1}], endless=False)
    await AsyncLoopConsumer(backend, group="billing").run(_noop)
    assert backend.groups == ["billing"]


async def test_no_group_forwards_none() -> None:
    """Without a group the consumer calls backend.consume(group=None)."""
    backend = FakeBackend([{"n": 1}], endless=False)
    await AsyncLoopConsumer(backend).run(_noop)
    assert backend.groups == [None]


async def test_second_run_while_running_returns_at_once() -> None:
    """Calling run() again while the consumer runs returns immediately without consuming."""
    backend = FakeBackend()
    consumer = AsyncLoopConsumer(backend)
    first = await _start(consumer, backend)
    task = consumer._task

    async with asyncio.timeout(GUARD):
        await consumer.run(_noop)

    assert backend.groups == [None]
    assert consumer._task is task
    assert not first.done()
    await consumer.shutdown()
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_shutdown_cancels_the_task_and_resets_state() -> None:
    """shutdown() cancels the consumer task and resets _task to None and _running to False."""
    backend = FakeBackend()
    consumer = AsyncLoopConsumer(backend)
    runner = await _start(consumer, backend)
    task = consumer._task
    assert task is not None
    assert consumer._running is True

    await consumer.shutdown()

    assert task.cancelled()
    assert_stopped(consumer)
    with pytest.raises(asyncio.CancelledError):
        await runner


async def test_run_raises_cancelled_error_after_shutdown() -> None:
    """run() ends with CancelledError when shutdown() stops it (the published behaviour)."""
    backend = FakeBackend()
    consumer = AsyncLoopConsumer(backend)

    async def stop_once_consuming() -> None:
        await backend.consuming.wait()
        await consumer.shutdown()

    stopper = asyncio.create_task(stop_once_consuming())
    async with asyncio.timeout(GUARD):
        with pytest.raises(asyncio.CancelledError):
            await consumer.run(_noop)
        await stopper


async def test_shutdown_before_run_is_safe_and_run_still_works() -> None:
    """shutdown() before run() does nothing harmful and the consumer can still run afterwards."""
    seen: list[dict[str, Any]] = []

    async def handler(payload: dict[str, Any]) -> None:
        seen.append(payload)

    consumer = AsyncLoopConsumer(FakeBackend([{"n": 1}], endless=False))
    await consumer.shutdown()
    assert consumer._task is None
    assert consumer._running is False

    await consumer.run(handler)
    assert seen == [{"n": 1}]


async def test_shutdown_twice_is_safe() -> None:
    """A second shutdown() after the consumer stopped returns quietly and keeps the state reset."""
    backend = FakeBackend()
    consumer = AsyncLoopConsumer(backend)
    runner = await _start(consumer, backend)

    await consumer.shutdown()
    await consumer.shutdown()

    assert consumer._task is None
    assert consumer._running is False
    with pytest.raises(asyncio.CancelledError):
        await runner


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (RuntimeError("connection reset while stopping"), "Unexpected error"),
        (TimeoutError("close timed out"), "Timeout"),
    ],
    ids=["unexpected", "timeout"],
)
async def test_error_while_cancelling_is_logged_at_warning_not_raised(
    caplog: pytest.LogCaptureFixture, exc: Exception, message: str
) -> None:
    """An exception raised while the task is being cancelled is logged at WARNING by shutdown()."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    backend = RaisingOnCancelBackend(exc)
    consumer = AsyncLoopConsumer(backend)
    runner = await _start(consumer, backend)

    async with asyncio.timeout(GUARD):
        await consumer.shutdown()

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert message in warnings[0].getMessage()
    assert warnings[0].exc_info is not None
    assert warnings[0].exc_info[1] is exc
    assert consumer._task is None
    assert consumer._running is False
    with pytest.raises(type(exc)):
        await runner


async def test_cancelling_the_run_caller_stops_the_consumer() -> None:
    """Cancelling the task awaiting run() cancels the consumer task; shutdown() then resets the
    state."""
    backend = FakeBackend()
    consumer = AsyncLoopConsumer(backend)
    runner = await _start(consumer, backend)
    task = consumer._task
    assert task is not None

    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner

    assert task.cancelled()
    await consumer.shutdown()
    assert consumer._task is None
    assert consumer._running is False


async def test_shutdown_stops_a_handler_that_turns_cancellation_into_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """shutdown() completes and logs a WARNING when the handler converts its cancellation."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    backend = FakeBackend([{"n": 1}])
    consumer = AsyncLoopConsumer(backend)
    in_handler = asyncio.Event()

    async def handler(payload: dict[str, Any]) -> None:
        in_handler.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise ConnectionError("driver closed the connection") from None

    runner = asyncio.create_task(consumer.run(handler))
    try:
        async with asyncio.timeout(GUARD):
            await in_handler.wait()
            await consumer.shutdown()
    finally:
        runner.cancel()

    assert [r.levelno for r in caplog.records if r.levelno >= logging.WARNING] == [logging.WARNING]
    assert consumer._task is None
    assert consumer._running is False
    with pytest.raises(ConnectionError):
        await runner


async def test_shutdown_stops_a_handler_that_swallows_cancellation() -> None:
    """shutdown() completes even when the handler catches its CancelledError and returns."""
    backend = FakeBackend([{"n": 1}])
    consumer = AsyncLoopConsumer(backend)
    in_handler = asyncio.Event()

    async def handler(payload: dict[str, Any]) -> None:
        in_handler.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()

    runner = asyncio.create_task(consumer.run(handler))
    try:
        async with asyncio.timeout(GUARD):
            await in_handler.wait()
            task = consumer._task
            assert task is not None
            await consumer.shutdown()
    finally:
        runner.cancel()

    assert task.cancelled()
    assert consumer._running is False
    with pytest.raises(asyncio.CancelledError):
        await runner


class SlowStopBackend(FakeBackend):
    """A backend whose first iterator needs a signal to finish its cleanup when cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.started = [asyncio.Event(), asyncio.Event()]
        self.cleaning_up = asyncio.Event()
        self.may_finish_cleanup = asyncio.Event()

    async def consume(self, *, group: str | None = None) -> AsyncIterator[dict[str, Any]]:
        call = len(self.groups)
        self.groups.append(group)
        self.started[call].set()
        try:
            await asyncio.Event().wait()
        finally:
            if call == 0:
                self.cleaning_up.set()
                await self.may_finish_cleanup.wait()
        yield {}  # pragma: no cover - makes this an async generator


async def test_shutdown_keeps_track_of_a_consumer_restarted_while_it_stopped() -> None:
    """A run() started while shutdown() awaits the old task stays tracked and can be shut down."""
    backend = SlowStopBackend()
    consumer = AsyncLoopConsumer(backend)
    first = asyncio.create_task(consumer.run(_noop))
    second: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(GUARD):
            await backend.started[0].wait()
            stopping = asyncio.create_task(consumer.shutdown())
            await backend.cleaning_up.wait()
            second = asyncio.create_task(consumer.run(_noop))
            await backend.started[1].wait()
            backend.may_finish_cleanup.set()
            await stopping
            with pytest.raises(asyncio.CancelledError):
                await first

            assert consumer._running is True
            assert consumer._task is not None

            await consumer.shutdown()
            with pytest.raises(asyncio.CancelledError):
                await second
    finally:
        for task in (first, second):
            if task is not None:
                task.cancel()

    assert_stopped(consumer)
