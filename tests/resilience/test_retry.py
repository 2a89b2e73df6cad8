"""Retry middleware: schedules on the fake clock, classification, limits, budget, cancellation."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
import tenacity

from resilience.classify import Classifier
from resilience.clock import FakeClock
from resilience.delivery import Delivery
from resilience.errors import (
    ConfigError,
    DeadLetter,
    DeliveryLimitExceeded,
    RetryAfter,
    TotalTimeout,
)
from resilience.pipeline import Pipeline
from resilience.retry import (
    DecorrelatedJitter,
    Exponential,
    Fixed,
    FullJitter,
    Retry,
    RetryBudget,
)
from resilience.testing import zero_waits


class Flaky:
    """A handler failing ``failures`` times with ``exc`` before succeeding."""

    def __init__(self, failures: int, exc: Exception | None = None) -> None:
        self.failures = failures
        self.exc = exc or ConnectionError("boom")
        self.calls = 0

    async def __call__(self, payload: dict[str, Any]) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc


def delivery(clock: FakeClock, delivery_count: int = 1) -> Delivery:
    return Delivery({"n": 1}, started_at=clock.monotonic(), delivery_count=delivery_count)


async def test_exponential_schedule_on_fake_clock() -> None:
    """Exponential backoff sleeps 0.1, 0.2, 0.4 between four attempts, then re-raises."""
    clock = FakeClock()
    handler = Flaky(10)
    call = Pipeline(Retry(attempts=4, wait=Exponential(0.1, 10), clock=clock)).build(handler)
    d = delivery(clock)
    with pytest.raises(ConnectionError):
        await call(d)
    assert clock.sleeps == pytest.approx([0.1, 0.2, 0.4])
    assert handler.calls == 4
    assert d.attempt == 4
    assert d.reason == "retries_exhausted"
    assert d.failures is not None
    assert d.failures["ConnectionError"].count == 4


async def test_exponential_is_capped() -> None:
    """The exponential wait never exceeds its maximum."""
    clock = FakeClock()
    call = Pipeline(Retry(attempts=6, wait=Exponential(1, 3), clock=clock)).build(Flaky(10))
    with pytest.raises(ConnectionError):
        await call(delivery(clock))
    assert clock.sleeps == [1, 2, 3, 3, 3]


async def test_success_after_retries_returns_normally() -> None:
    """A handler that recovers on the third attempt succeeds with two fixed waits."""
    clock = FakeClock()
    handler = Flaky(2)
    call = Pipeline(Retry(attempts=5, wait=Fixed(0.5), clock=clock)).build(handler)
    d = delivery(clock)
    await call(d)
    assert handler.calls == 3
    assert clock.sleeps == [0.5, 0.5]
    assert d.reason is None


async def test_full_jitter_stays_within_bounds() -> None:
    """Full jitter waits are between 0 and the capped exponential value."""
    random.seed(3)
    clock = FakeClock()
    call = Pipeline(Retry(attempts=8, wait=FullJitter(0.1, 1.0), clock=clock)).build(Flaky(99))
    with pytest.raises(ConnectionError):
        await call(delivery(clock))
    caps = [min(1.0, 0.1 * 2**i) for i in range(7)]
    assert len(clock.sleeps) == 7
    assert all(0 <= s <= cap for s, cap in zip(clock.sleeps, caps, strict=True))
    assert len(set(clock.sleeps)) > 1


async def test_decorrelated_jitter_is_seeded_and_bounded() -> None:
    """Decorrelated jitter with a seeded rng is reproducible and within [initial, maximum]."""

    async def run() -> list[float]:
        clock = FakeClock()
        wait = DecorrelatedJitter(0.1, 2.0, rng=random.Random(42))
        call = Pipeline(Retry(attempts=10, wait=wait, clock=clock)).build(Flaky(99))
        with pytest.raises(ConnectionError):
            await call(delivery(clock))
        return clock.sleeps

    first, second = await run(), await run()
    assert first == second
    assert all(0.1 <= s <= 2.0 for s in first)


async def test_tenacity_waits_compose() -> None:
    """Any tenacity wait works, including sums of waits."""
    clock = FakeClock()
    wait = tenacity.wait_fixed(1) + tenacity.wait_fixed(0.5)
    call = Pipeline(Retry(attempts=3, wait=wait, clock=clock)).build(Flaky(99))
    with pytest.raises(ConnectionError):
        await call(delivery(clock))
    assert clock.sleeps == [1.5, 1.5]


async def test_terminal_exception_is_not_retried() -> None:
    """An exception classified terminal fails at once with reason non_retryable."""
    clock = FakeClock()
    handler = Flaky(5, ValueError("bad input"))
    retry = Retry(attempts=5, clock=clock, classifier=Classifier(terminal=(ValueError,)))
    d = delivery(clock)
    with pytest.raises(ValueError, match="bad input"):
        await Pipeline(retry).build(handler)(d)
    assert handler.calls == 1
    assert clock.sleeps == []
    assert d.reason == "non_retryable"


async def test_dead_letter_request_is_not_retried() -> None:
    """A handler raising DeadLetter is not retried and the reason is rejected."""
    clock = FakeClock()
    handler = Flaky(5, DeadLetter("no such customer"))
    d = delivery(clock)
    with pytest.raises(DeadLetter):
        await Pipeline(Retry(attempts=5, clock=clock)).build(handler)(d)
    assert handler.calls == 1
    assert d.reason == "rejected"


async def test_retry_after_hint_is_honoured_up_to_the_maximum() -> None:
    """RetryAfter(2) waits 2 s; RetryAfter(100) is capped at max_retry_after."""
    clock = FakeClock()
    hints = [RetryAfter(2), RetryAfter(100)]

    async def handler(payload: dict[str, Any]) -> None:
        if hints:
            raise hints.pop(0)

    call = Pipeline(Retry(attempts=5, wait=Fixed(0.1), max_retry_after=10, clock=clock)).build(
        handler
    )
    await call(delivery(clock))
    assert clock.sleeps == [2, 10]


async def test_waits_are_clamped_to_the_deadline() -> None:
    """A wait longer than the time left before the deadline is shortened, then retry stops."""
    clock = FakeClock()
    d = delivery(clock)
    d.deadline = clock.monotonic() + 1.5
    call = Pipeline(Retry(attempts=10, wait=Fixed(1.0), clock=clock)).build(Flaky(99))
    with pytest.raises(ConnectionError):
        await call(d)
    assert clock.sleeps == [1.0]
    assert d.reason == "timeout"


async def test_max_elapsed_bounds_total_retry_time() -> None:
    """No retry starts once max_elapsed would be exceeded by the next wait."""
    clock = FakeClock()
    d = delivery(clock)
    call = Pipeline(Retry(attempts=100, wait=Fixed(3), max_elapsed=10, clock=clock)).build(
        Flaky(99)
    )
    with pytest.raises(ConnectionError):
        await call(d)
    assert clock.sleeps == [3, 3, 3]
    assert d.reason == "retries_exhausted"


async def test_broker_delivery_count_consumes_attempts() -> None:
    """A third delivery with attempts=4 gets only attempts 3 and 4."""
    clock = FakeClock()
    handler = Flaky(99)
    d = delivery(clock, delivery_count=3)
    with pytest.raises(ConnectionError):
        await Pipeline(Retry(attempts=4, wait=Fixed(0), clock=clock)).build(handler)(d)
    assert handler.calls == 2
    assert d.reason == "retries_exhausted"


async def test_delivery_limit_exceeded_skips_the_handler() -> None:
    """A message delivered more often than the attempt limit is terminal without a call."""
    clock = FakeClock()
    handler = Flaky(0)
    d = delivery(clock, delivery_count=5)
    with pytest.raises(DeliveryLimitExceeded):
        await Pipeline(Retry(attempts=4, clock=clock)).build(handler)(d)
    assert handler.calls == 0
    assert d.reason == "delivery_limit"


async def test_spent_budget_sends_failures_to_terminal_outcome() -> None:
    """With an empty budget a retryable failure is not retried; reason budget_exhausted."""
    clock = FakeClock()
    budget = RetryBudget(ratio=0.0, min_per_second=0.0, window=10, clock=clock)
    handler = Flaky(99)
    d = delivery(clock)
    with pytest.raises(ConnectionError):
        await Pipeline(Retry(attempts=5, budget=budget, clock=clock)).build(handler)(d)
    assert handler.calls == 1
    assert d.reason == "budget_exhausted"


async def test_budget_allows_a_fraction_of_traffic() -> None:
    """A 20% budget over 100 first attempts allows 20 retries, then refuses."""
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_per_second=0.0, window=10, clock=clock)
    for _ in range(100):
        budget.deposit()
    granted = sum(budget.try_spend() for _ in range(50))
    assert granted == 20
    assert not budget.try_spend()


async def test_budget_window_expires() -> None:
    """Deposits older than the window no longer fund retries."""
    clock = FakeClock()
    budget = RetryBudget(ratio=1.0, min_per_second=0.0, window=10, clock=clock)
    for _ in range(5):
        budget.deposit()
    clock.advance(11)
    assert budget.available == 0
    assert not budget.try_spend()


async def test_budget_is_shared_between_messages() -> None:
    """Retries of one message use up the budget for the next one."""
    clock = FakeClock()
    budget = RetryBudget(ratio=0.0, min_per_second=0.2, window=10, clock=clock)  # 2 retries
    call = Pipeline(Retry(attempts=5, wait=Fixed(0), budget=budget, clock=clock)).build(Flaky(99))
    first, second = delivery(clock), delivery(clock)
    with pytest.raises(ConnectionError):
        await call(first)
    with pytest.raises(ConnectionError):
        await call(second)
    assert first.attempt == 3
    assert first.reason == "budget_exhausted"
    assert second.attempt == 1
    assert second.reason == "budget_exhausted"


async def test_cancellation_during_backoff_is_not_retried() -> None:
    """Cancelling a message while it waits between attempts propagates CancelledError."""
    handler = Flaky(99)
    call = Pipeline(Retry(attempts=5, wait=Fixed(3600))).build(handler)
    task = asyncio.ensure_future(call(Delivery({}, started_at=0.0)))
    while handler.calls < 1:
        await asyncio.sleep(0)
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert handler.calls == 1


async def test_cancelled_handler_is_not_retried() -> None:
    """CancelledError raised by the handler itself is never retried."""
    clock = FakeClock()
    handler = Flaky(1, asyncio.CancelledError())  # type: ignore[arg-type]
    with pytest.raises(asyncio.CancelledError):
        await Pipeline(Retry(attempts=5, clock=clock)).build(handler)(delivery(clock))
    assert handler.calls == 1


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
async def test_interpreter_exits_propagate(exc_type: type[BaseException]) -> None:
    """KeyboardInterrupt and SystemExit are never retried."""
    clock = FakeClock()
    calls = 0

    async def handler(payload: dict[str, Any]) -> None:
        nonlocal calls
        calls += 1
        raise exc_type()

    with pytest.raises(exc_type):
        await Pipeline(Retry(attempts=5, clock=clock)).build(handler)(delivery(clock))
    assert calls == 1


async def test_success_path_never_enters_tenacity(monkeypatch: pytest.MonkeyPatch) -> None:
    """A first-attempt success does not construct tenacity's AsyncRetrying."""

    def explode(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("tenacity entered on the success path")

    monkeypatch.setattr(tenacity, "AsyncRetrying", explode)
    handler = Flaky(0)
    await Pipeline(Retry(attempts=3)).build(handler)(Delivery({}, started_at=0.0))
    assert handler.calls == 1


async def test_zero_waits_switch() -> None:
    """In testing mode every wait is zero while attempts are still counted."""
    clock = FakeClock()
    handler = Flaky(2)
    call = Pipeline(Retry(attempts=3, wait=Fixed(30), clock=clock)).build(handler)
    with zero_waits():
        await call(delivery(clock))
    assert clock.sleeps == [0, 0]
    assert handler.calls == 3


async def test_total_timeout_is_terminal_for_retry() -> None:
    """TotalTimeout raised inside retry is not retried (it is terminal)."""
    clock = FakeClock()
    handler = Flaky(5, TotalTimeout(1))
    with pytest.raises(TotalTimeout):
        await Pipeline(Retry(attempts=5, clock=clock)).build(handler)(delivery(clock))
    assert handler.calls == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attempts": 0}, "attempts must be >= 1"),
        ({"attempts": 2.5}, "integer"),
        ({"max_retry_after": -1}, "max_retry_after"),
        ({"wait": "fast"}, "backoff strategy"),
    ],
)
def test_invalid_retry_arguments_raise(kwargs: dict[str, Any], message: str) -> None:
    """Bad Retry arguments raise ConfigError naming the problem."""
    with pytest.raises(ConfigError, match=message):
        Retry(**kwargs)


def test_invalid_backoff_arguments_raise() -> None:
    """A maximum below the initial wait is rejected."""
    with pytest.raises(ConfigError, match="maximum"):
        Exponential(initial=5, maximum=1)


async def test_retry_logs_go_through_stdlib_logging(caplog: pytest.LogCaptureFixture) -> None:
    """A scheduled retry is an INFO record of logger resilience.retry with its fields."""
    import logging

    clock = FakeClock()
    call = Pipeline(Retry(attempts=2, wait=Fixed(0.5), clock=clock)).build(Flaky(1))
    with caplog.at_level(logging.INFO, logger="resilience.retry"):
        await call(Delivery({}, key="orders", message_id="7", started_at=0.0))
    (record,) = [r for r in caplog.records if r.name == "resilience.retry"]
    assert record.getMessage() == "retry_scheduled"
    assert record.levelno == logging.INFO
    assert record.__dict__["wait"] == 0.5
    assert record.__dict__["message_id"] == "7"
    assert record.__dict__["error_type"] == "ConnectionError"


async def test_retry_logs_are_silent_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    """Without logging configuration, retries print nothing to stdout."""
    clock = FakeClock()
    await Pipeline(Retry(attempts=3, wait=Fixed(1), clock=clock)).build(Flaky(2))(delivery(clock))
    assert capsys.readouterr().out == ""


async def test_failure_path_never_builds_async_retrying(monkeypatch: pytest.MonkeyPatch) -> None:
    """A retried message is retried without constructing tenacity's AsyncRetrying."""

    def explode(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("AsyncRetrying built on the failure path")

    clock = FakeClock()
    call = Pipeline(Retry(attempts=3, wait=Fixed(0.5), clock=clock)).build(handler := Flaky(2))
    monkeypatch.setattr(tenacity, "AsyncRetrying", explode)
    await call(delivery(clock))
    assert handler.calls == 3
    assert clock.sleeps == [0.5, 0.5]


async def test_each_failure_is_classified_once() -> None:
    """Every failed attempt goes through the classifier exactly once."""
    seen: list[BaseException] = []

    def count(exc: BaseException) -> None:
        seen.append(exc)

    clock = FakeClock()
    retry = Retry(
        attempts=4, wait=Fixed(0), clock=clock, classifier=Classifier(predicates=(count,))
    )
    handler = Flaky(3)
    await Pipeline(retry).build(handler)(delivery(clock))
    assert len(seen) == 3
    assert all(isinstance(exc, ConnectionError) for exc in seen)


async def test_tenacity_waits_see_attempt_number_and_outcome() -> None:
    """A tenacity wait gets each message's own attempt number (from 1) and the failure; it is
    asked after every failure, the last included (the stop rules weigh the next wait)."""
    seen: list[tuple[int, str]] = []

    class Recording(tenacity.wait.wait_base):
        def __call__(self, retry_state: tenacity.RetryCallState) -> float:
            assert retry_state.outcome is not None
            seen.append((retry_state.attempt_number, str(retry_state.outcome.exception())))
            return float(retry_state.attempt_number)

    clock = FakeClock()
    call = Pipeline(Retry(attempts=3, wait=Recording(), clock=clock)).build(Flaky(99))
    for _ in range(2):
        with pytest.raises(ConnectionError):
            await call(delivery(clock))
    assert seen == [(1, "boom"), (2, "boom"), (3, "boom")] * 2
    assert clock.sleeps == [1.0, 2.0] * 2


async def test_retry_log_event_is_not_built_when_info_is_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With INFO off for resilience.retry, a retry does not call the structlog logger at all."""
    import logging

    from resilience import retry as retry_module

    def explode(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("retry_scheduled built although INFO is off")

    monkeypatch.setattr(retry_module.log, "info", explode)
    stdlib = logging.getLogger("resilience.retry")
    level = stdlib.level
    stdlib.setLevel(logging.WARNING)
    clock = FakeClock()
    handler = Flaky(1)
    try:
        await Pipeline(Retry(attempts=2, wait=Fixed(0), clock=clock)).build(handler)(
            delivery(clock)
        )
    finally:
        stdlib.setLevel(level)
    assert handler.calls == 2


async def test_retried_errors_do_not_chain_onto_earlier_ones() -> None:
    """The exception a message finally fails with carries no earlier attempt as its context."""
    errors = [ConnectionError("first"), ConnectionError("second")]

    async def handler(payload: dict[str, Any]) -> None:
        raise errors.pop(0)

    clock = FakeClock()
    with pytest.raises(ConnectionError, match="second") as info:
        await Pipeline(Retry(attempts=2, wait=Fixed(0), clock=clock)).build(handler)(
            delivery(clock)
        )
    assert info.value.__context__ is None


async def test_budget_deposits_with_a_given_reading_roll_the_window_like_clock_reads() -> None:
    """Deposits given a reading of the budget's clock land in the same buckets as deposits that
    read it, across bucket edges and past the window."""
    read, given = FakeClock(), FakeClock()
    by_clock = RetryBudget(ratio=1.0, min_per_second=0.0, window=10, clock=read)
    by_reading = RetryBudget(ratio=1.0, min_per_second=0.0, window=10, clock=given)
    for step in [0.0, 0.4, 0.6, 1.0, 2.5, 0.99, 7.0, 3.3, 12.0]:
        read.advance(step)
        given.advance(step)
        by_clock.deposit()
        by_reading.deposit(given.monotonic())
        assert by_reading.available == by_clock.available
    assert by_clock.available == 1  # the 12 s step left only the last deposit in the window
    read.advance(9.5)
    given.advance(9.5)
    assert by_reading.available == by_clock.available


class _CountingClock(FakeClock):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def monotonic(self) -> float:
        self.reads += 1
        return super().monotonic()


async def test_retry_counts_the_first_attempt_with_the_consumers_clock_reading() -> None:
    """Retry's ``enter`` hands the budget the delivery's fresh reading of the same clock (no
    second read); a reading of another clock is not used."""
    clock = _CountingClock()
    budget = RetryBudget(clock=clock)
    retry = Retry(budget=budget, clock=clock)
    d = Delivery({}, started_at=clock.monotonic())
    d.now, d.clock = d.started_at, clock
    reads = clock.reads
    retry.enter(d)
    assert clock.reads == reads
    d.clock = FakeClock()
    retry.enter(d)
    assert clock.reads == reads + 1
    assert budget._deposits == 2
