"""Timeouts: per attempt and per message, cancelling the handler for real."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from resilience.clock import FakeClock
from resilience.delivery import Delivery
from resilience.errors import AttemptTimeout, ConfigError, TotalTimeout
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
