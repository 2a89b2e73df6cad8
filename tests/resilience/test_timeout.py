"""Timeouts: per attempt and per message, cancelling the handler for real."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from abe.backends.message_queue.base.extensions import InboundMessage
from resilience.clock import FakeClock
from resilience.delivery import Delivery, new_delivery
from resilience.errors import AttemptTimeout, ConfigError, TotalTimeout
from resilience.events import EventBus
from resilience.pipeline import Pipeline
from resilience.retry import Fixed, Retry
from resilience.timeout import Timeout


class Slow:
    """Sleeps ``durations[n]`` on the fake clock on call ``n`` (0 when the list runs out)."""

    def __init__(self, clock: FakeClock, *durations: float) -> None:
        self.clock = clock
        self.durations = list(durations)
        self.calls = 0
        self.cancelled = 0
        self.finished = 0

    async def __call__(self, payload: dict[str, Any]) -> None:
        self.calls += 1
        duration = self.durations.pop(0) if self.durations else 0.0
        try:
            await self.clock.sleep(duration)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1


async def test_attempt_timeout_cancels_the_handler() -> None:
    """A handler running past the attempt timeout is cancelled and AttemptTimeout is raised."""
    clock = FakeClock()
    handler = Slow(clock, 10)
    call = Pipeline(Timeout(1.0, clock=clock)).build(handler)
    with pytest.raises(AttemptTimeout):
        await call(Delivery({}, started_at=0.0))
    assert handler.cancelled == 1
    assert handler.finished == 0
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_attempt_timeout_is_retried() -> None:
    """Retry wraps the attempt timeout: a slow first attempt is retried and succeeds."""
    clock = FakeClock()
    handler = Slow(clock, 10, 0.1)
    call = Pipeline(
        Retry(attempts=3, wait=Fixed(0.5), clock=clock), Timeout(1.0, clock=clock)
    ).build(handler)
    d = Delivery({}, started_at=0.0)
    await call(d)
    assert handler.calls == 2
    assert handler.cancelled == 1
    assert d.failures is not None
    assert "AttemptTimeout" in d.failures


async def test_total_timeout_is_terminal_and_sets_reason() -> None:
    """The whole-message timeout cancels retries in progress and ends with reason timeout."""
    clock = FakeClock()
    handler = Slow(clock, 3, 3, 3, 3, 3)
    call = Pipeline(
        Timeout(5.0, total=True, clock=clock),
        Retry(attempts=10, wait=Fixed(1), clock=clock),
        Timeout(2.0, clock=clock),
    ).build(handler)
    d = Delivery({}, started_at=0.0)
    with pytest.raises(TotalTimeout):
        await call(d)
    assert d.reason == "timeout"
    assert clock.monotonic() <= 5.0 + 1e-9
    assert handler.calls == 2


async def test_fast_handler_leaves_no_pending_cancellation() -> None:
    """A handler that finishes in time leaves the task uncancelled and the watchdog idle."""
    clock = FakeClock()
    handler = Slow(clock, 0.5)
    timeout = Timeout(1.0, clock=clock)
    await Pipeline(timeout).build(handler)(Delivery({}, started_at=0.0))
    clock.advance(10)  # the watchdog's timer fires with nothing to cancel
    await asyncio.sleep(0)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    assert handler.finished == 1
    assert not timeout._watchdog.active


async def test_outer_cancellation_is_not_turned_into_a_timeout() -> None:
    """Cancelling the task (shutdown) during a timed attempt propagates CancelledError."""
    started = asyncio.Event()

    async def handler(payload: dict[str, Any]) -> None:
        started.set()
        await asyncio.sleep(3600)

    call = Pipeline(Timeout(60.0)).build(handler)
    task = asyncio.ensure_future(call(Delivery({}, started_at=0.0)))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_attempt_timeout_respects_the_message_deadline() -> None:
    """An attempt never runs past the delivery's deadline even with a longer attempt limit."""
    clock = FakeClock()
    handler = Slow(clock, 100)
    d = Delivery({}, started_at=0.0)
    d.deadline = 2.0
    with pytest.raises(AttemptTimeout):
        await Pipeline(Timeout(50.0, clock=clock)).build(handler)(d)
    assert clock.monotonic() == pytest.approx(2.0)


async def test_concurrent_messages_time_out_independently() -> None:
    """Of two concurrent messages under one Timeout, only the slow one times out."""
    timeout = Timeout(0.05)
    results: dict[str, str] = {}

    async def handler(payload: dict[str, Any]) -> None:
        await asyncio.sleep(payload["sleep"])

    call = Pipeline(timeout).build(handler)

    async def one(name: str, sleep: float) -> None:
        try:
            await call(Delivery({"sleep": sleep}, started_at=0.0))
            results[name] = "ok"
        except AttemptTimeout:
            results[name] = "timeout"

    await asyncio.gather(one("fast", 0.001), one("slow", 5))
    assert results == {"fast": "ok", "slow": "timeout"}


@pytest.mark.parametrize("value", [0, -1, "soon"])
def test_invalid_timeout_raises(value: Any) -> None:
    """A non-positive or non-numeric timeout is a ConfigError."""
    with pytest.raises(ConfigError, match="timeout"):
        Timeout(value)


# -- the watchdog's entries: one per task, reused by every message of that task ----------------


async def test_one_task_reuses_its_entry_and_times_out_again_after_a_timeout() -> None:
    """Messages run one after another in one task (a consumer worker) share one watchdog entry:
    a timed-out message leaves no stale cancel request behind, and the next slow message of
    the same task times out again."""
    clock = FakeClock()
    handler = Slow(clock, 10, 0.1, 10)
    timeout = Timeout(1.0, clock=clock)
    call = Pipeline(timeout).build(handler)
    with pytest.raises(AttemptTimeout):
        await call(Delivery({}, started_at=0.0))
    await call(Delivery({}, started_at=0.0))
    with pytest.raises(AttemptTimeout):
        await call(Delivery({}, started_at=0.0))
    assert len(timeout._watchdog.entries) == 1
    assert not timeout._watchdog.active
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    assert (handler.cancelled, handler.finished) == (2, 1)


async def test_entries_of_finished_tasks_are_forgotten_when_the_timer_fires() -> None:
    """Each task that ran a message keeps an entry only until the watchdog's timer next fires
    after the task ended, so short-lived tasks (a decorator's callers) do not pile up."""
    clock = FakeClock()
    timeout = Timeout(1.0, clock=clock)
    call = Pipeline(timeout).build(Slow(clock))
    await asyncio.gather(*(asyncio.ensure_future(call(Delivery({}))) for _ in range(5)))
    assert len(timeout._watchdog.entries) == 5
    clock.advance(2.0)  # the timer armed by the first message fires
    await asyncio.sleep(0)
    assert not timeout._watchdog.entries


async def test_short_lived_tasks_do_not_pile_up_before_the_timer_fires() -> None:
    """A task per call (a ``@resilient`` handler called from request handlers): entries of
    finished tasks are swept out as new ones come, long before the timer fires, so the watchdog
    holds no more than about twice the tasks alive."""
    clock = FakeClock()
    timeout = Timeout(60.0, clock=clock)
    call = Pipeline(timeout).build(Slow(clock))
    most = 0
    for _ in range(1000):
        await asyncio.ensure_future(call(Delivery({})))
        most = max(most, len(timeout._watchdog.entries))
    assert most <= 128
    assert clock.monotonic() == 0.0  # the timer never fired: the sweeps did it


async def test_attempt_limit_clamped_to_the_total_one_raises_total_timeout() -> None:
    """When the attempt's deadline is the message's deadline (a longer attempt limit), the
    total timeout fires and the task's cancel count goes back to zero; with a shorter attempt
    limit the attempt times out first and is retried."""
    clock = FakeClock()
    handler = Slow(clock, 100)
    call = Pipeline(
        Timeout(2.0, total=True, clock=clock),
        Retry(attempts=3, wait=Fixed(0.1), clock=clock),
        Timeout(50.0, clock=clock),
    ).build(handler)
    d = Delivery({}, started_at=0.0)
    with pytest.raises(TotalTimeout) as caught:
        await call(d)
    assert isinstance(caught.value.__context__, asyncio.CancelledError)
    assert (handler.calls, d.reason) == (1, "timeout")
    assert clock.monotonic() == pytest.approx(2.0)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]

    handler = Slow(clock, 100, 0.1)
    call = Pipeline(
        Timeout(20.0, total=True, clock=clock),
        Retry(attempts=3, wait=Fixed(0.1), clock=clock),
        Timeout(1.0, clock=clock),
    ).build(handler)
    d = Delivery({}, started_at=clock.monotonic())
    await call(d)
    assert d.failures is not None
    assert list(d.failures) == ["AttemptTimeout"]
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_shutdown_cancel_during_a_fired_timeout_still_wins() -> None:
    """A task cancelled by a shutdown in the same loop turn as the watchdog fired ends with
    CancelledError, not a timeout; the watchdog's own request is withdrawn."""
    clock = FakeClock()
    started = asyncio.Event()

    async def handler(payload: dict[str, Any]) -> None:
        started.set()
        await clock.sleep(100)

    call = Pipeline(Timeout(1.0, clock=clock)).build(handler)
    task = asyncio.ensure_future(call(Delivery({})))
    await started.wait()
    clock.advance(1.0)  # the watchdog cancels the task...
    task.cancel()  # ...and so does a shutdown
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelling() == 1  # the shutdown's request only


async def test_a_handler_that_swallows_the_cancellation_is_absorbed() -> None:
    """A handler that catches the watchdog's cancellation and returns succeeds; the cancel
    request is withdrawn and the next message of the same task can time out again."""
    clock = FakeClock()
    swallowed = 0

    async def handler(payload: dict[str, Any]) -> None:
        nonlocal swallowed
        try:
            await clock.sleep(payload["sleep"])
        except asyncio.CancelledError:
            swallowed += 1

    call = Pipeline(Timeout(1.0, clock=clock)).build(handler)
    await call(Delivery({"sleep": 10}))
    assert swallowed == 1
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    await call(Delivery({"sleep": 10}))
    assert swallowed == 2
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


def test_a_timeout_used_on_a_new_event_loop_starts_over() -> None:
    """A Timeout used by one event loop and then another forgets the first loop's entries and
    timer, and still cancels on the second loop."""
    timeout = Timeout(0.01)

    async def handler(payload: dict[str, Any]) -> None:
        await asyncio.sleep(payload["sleep"])

    call = Pipeline(timeout).build(handler)

    async def run(sleep: float) -> str:
        try:
            await call(Delivery({"sleep": sleep}))
        except AttemptTimeout:
            return "timeout"
        return "ok"

    assert asyncio.run(run(0)) == "ok"
    first = dict(timeout._watchdog.entries)
    assert asyncio.run(run(5)) == "timeout"
    assert not set(first) & set(timeout._watchdog.entries)
    assert asyncio.run(run(0)) == "ok"


async def test_enter_outside_a_task_raises_and_registers_nothing() -> None:
    """Entering a timeout where no asyncio task runs (a loop callback) raises RuntimeError,
    both before any task registered and after one did (its entry is not taken for the missing
    task)."""
    timeout = Timeout(1.0, clock=FakeClock())
    loop = asyncio.get_running_loop()

    def enter() -> str:
        try:
            timeout.enter(Delivery({}))
        except RuntimeError as exc:
            return str(exc)
        return "entered"

    async def from_a_callback() -> str:
        result: asyncio.Future[str] = loop.create_future()
        loop.call_soon(lambda: result.set_result(enter()))
        return await result

    assert "inside an asyncio task" in await from_a_callback()
    await Pipeline(timeout).build(Slow(FakeClock()))(Delivery({}))
    assert len(timeout._watchdog.entries) == 1
    assert "inside an asyncio task" in await from_a_callback()
    assert not timeout._watchdog.active


@pytest.mark.parametrize("fuse", [True, False])
async def test_a_timeout_behind_a_wait_reads_its_clock_not_the_consumers_reading(
    fuse: bool,
) -> None:
    """The consumer's clock reading (Delivery.now with Delivery.clock) is fresh only for the
    pipeline's outermost run: a Timeout entered after middleware that waited computes its
    deadline from the clock's time then, whether it runs in a later compiled run (fuse) or
    linked alone; the reading and its clock are both cleared."""
    clock = FakeClock(100.0)

    async def waits(delivery: Delivery, call_next: Any) -> None:
        clock.advance(5.0)  # something before the timeout took five seconds
        await call_next(delivery)

    seen: list[tuple[float | None, float | None, object]] = []
    delivery: Delivery | None = None

    async def handler(payload: dict[str, Any]) -> None:
        assert delivery is not None
        seen.append((delivery.deadline, delivery.now, delivery.clock))

    run = Pipeline(waits, Timeout(10.0, total=True, clock=clock)).build(handler, fuse=fuse)
    message = InboundMessage({}, "k", "1")
    delivery = new_delivery(message, clock.monotonic(), EventBus(), asyncio.current_task(), clock)
    await run(delivery)
    assert seen == [(115.0, None, None)]
