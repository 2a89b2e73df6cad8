"""Circuit breaker: trip conditions, windows, half-open probes, open-wait growth, control."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest

from resilience.breaker import (
    Breaker,
    BreakerConfig,
    BreakerRegistry,
    BreakerState,
    BreakerStateChanged,
    CallNotPermitted,
    CircuitBreaker,
    CountWindow,
    TimeWindow,
    get_breaker,
)
from resilience.classify import Classifier, Verdict
from resilience.clock import FakeClock, TimerHandle
from resilience.consumer import Gate
from resilience.delivery import Delivery
from resilience.errors import CircuitOpen, ConfigError, DeadLetter
from resilience.events import EventBus
from resilience.hooks import SLOW_PATH
from resilience.pipeline import Pipeline
from resilience.retry import Fixed

pytestmark = pytest.mark.timeout(20)

CLOSED = BreakerState.CLOSED
OPEN = BreakerState.OPEN
HALF_OPEN = BreakerState.HALF_OPEN

Call = Callable[[Delivery], Awaitable[None]]


async def ok(delivery: Delivery) -> None:
    return None


async def down(delivery: Delivery) -> None:
    raise ConnectionError("dependency down")


def slow(clock: FakeClock, seconds: float, *, fail: bool = False) -> Call:
    async def call(delivery: Delivery) -> None:
        await clock.sleep(seconds)
        if fail:
            raise ConnectionError("slow and failed")

    return call


@pytest.fixture
def clock() -> FakeClock:
    """A fresh virtual clock."""
    return FakeClock()


@pytest.fixture
def registry() -> BreakerRegistry:
    """A registry of this test's own."""
    return BreakerRegistry()


def make(
    clock: FakeClock, registry: BreakerRegistry, mode: str = "fail_fast", **options: object
) -> CircuitBreaker:
    return CircuitBreaker(
        "dep",
        mode=mode,  # type: ignore[arg-type]
        clock=clock,
        registry=registry,
        **options,  # type: ignore[arg-type]
    )


async def run(cb: CircuitBreaker, call: Call, delivery: Delivery | None = None) -> str:
    """Call through the breaker and say how it ended."""
    try:
        await cb(delivery or Delivery({}), call)
    except CircuitOpen:
        return "rejected"
    except ConnectionError:
        return "failed"
    except DeadLetter:
        return "terminal"
    except KeyError:
        return "ignored"
    return "ok"


# -- trip conditions ----------------------------------------------------------------------------


async def test_consecutive_failures_trip_and_a_success_resets_the_count(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """The breaker opens after failure_threshold failures in a row, not after scattered ones."""
    cb = make(clock, registry, failure_threshold=3)
    assert [await run(cb, down) for _ in range(2)] == ["failed", "failed"]
    assert await run(cb, ok) == "ok"
    assert cb.stats.consecutive_failures == 0
    assert [await run(cb, down) for _ in range(2)] == ["failed", "failed"]
    assert cb.state is CLOSED
    assert await run(cb, down) == "failed"
    assert cb.state is OPEN
    assert await run(cb, ok) == "rejected"


async def test_one_message_failing_again_and_again_counts_once(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """Repeated failures of one message (its retries, a redelivery) count once toward
    failure_threshold; failures of distinct messages trip the breaker."""
    cb = make(clock, registry, failure_threshold=3)
    poison = Delivery({}, key="orders", message_id="1-0")
    for _ in range(5):
        assert await run(cb, down, poison) == "failed"
    again = Delivery({}, key="orders", message_id="1-0", delivery_count=2)
    assert await run(cb, down, again) == "failed"
    assert cb.state is CLOSED
    assert cb.stats.consecutive_failures == 1
    for n in (2, 3):
        assert await run(cb, down, Delivery({}, key="orders", message_id=f"{n}-0")) == "failed"
    assert cb.state is OPEN


async def test_a_window_records_one_failure_per_delivery(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """A delivery's failed retries are not recorded in the window again: one message failing
    every attempt among successes keeps the failure rate low."""
    cb = make(
        clock,
        registry,
        failure_threshold=None,
        window=CountWindow(size=10, minimum_calls=4),
        failure_rate=0.5,
    )
    poison = Delivery({}, key="orders", message_id="1-0")
    for _ in range(6):
        await run(cb, down, poison)
    assert (cb.stats.calls, cb.stats.failures) == (1, 1)
    for _ in range(3):
        await run(cb, ok)
    assert cb.state is CLOSED
    for n in range(2, 6):
        await run(cb, down, Delivery({}, key="orders", message_id=f"{n}-0"))
    assert cb.state is OPEN  # 5 failures of distinct messages out of 8 calls


async def test_the_tripping_message_probes_itself_when_no_other_comes(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """The message that tripped a pausing breaker leaves the half-open probe to another one for
    the probe grace only: when the worker waiting to pull finds nothing, it probes itself."""
    cb = make(clock, registry, mode="pause", failure_threshold=1, open_wait=10)
    calls: list[float] = []

    async def flaky(delivery: Delivery) -> None:
        calls.append(clock.monotonic())
        if len(calls) == 1:
            raise ConnectionError("down")

    tripper = Delivery({}, key="orders", message_id="1-0")
    task = asyncio.create_task(cb(tripper, flaky))
    for _ in range(5):
        await asyncio.sleep(0)
    assert cb.state is OPEN
    worker = asyncio.create_task(cb.wait_resumed())  # a free worker, about to pull a message
    await asyncio.sleep(0)
    clock.advance(10)
    for _ in range(5):
        await asyncio.sleep(0)
    assert worker.done()  # it pulls next, and finds nothing to pull
    assert cb.state is HALF_OPEN
    assert calls == [0.0]  # the tripping message left the probe
    clock.advance(1.0)  # the probe grace
    await task
    assert calls == [0.0, 11.0]
    assert cb.state is CLOSED


async def test_count_window_failure_rate_waits_for_minimum_calls(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """A count window trips on its failure rate only once it holds minimum_calls calls."""
    cb = make(
        clock,
        registry,
        failure_threshold=None,
        window=CountWindow(size=10, minimum_calls=5),
        failure_rate=0.5,
    )
    events: list[BreakerStateChanged] = []
    cb.subscribe(events.append)
    for call in (down, ok, down, ok):
        await run(cb, call)
    assert cb.state is CLOSED  # 2/4 = 50% but only 4 calls
    assert (cb.stats.calls, cb.stats.failures, cb.stats.failure_rate) == (4, 2, 0.5)
    await run(cb, down)
    assert cb.state is OPEN
    assert events[-1].reason == "failure_rate"


async def test_count_window_forgets_the_oldest_call(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """Once full, a count window drops its oldest outcome for each new one."""
    cb = make(
        clock,
        registry,
        failure_threshold=None,
        window=CountWindow(size=4, minimum_calls=4),
        failure_rate=0.75,
    )
    for call in (down, down, ok, ok):
        await run(cb, call)
    assert (cb.stats.calls, cb.stats.failures) == (4, 2)
    await run(cb, ok)
    await run(cb, ok)
    assert (cb.stats.calls, cb.stats.failures) == (4, 0)
    cb.breaker.check()


async def test_time_window_trips_on_failure_rate(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """A time window trips when the share of failures in the last seconds reaches the rate."""
    cb = make(
        clock,
        registry,
        failure_threshold=None,
        window=TimeWindow(size=10, minimum_calls=4),
        failure_rate=0.5,
    )
    for call in (ok, down, ok):
        await run(cb, call)
        clock.advance(1)
    assert cb.state is CLOSED
    await run(cb, down)
    assert cb.state is OPEN
    assert cb.stats.failure_rate == 0.5


async def test_time_window_expires_old_calls(clock: FakeClock, registry: BreakerRegistry) -> None:
    """Failures older than the time window no longer count toward its rate."""
    cb = make(
        clock,
        registry,
        failure_threshold=None,
        window=TimeWindow(size=10, minimum_calls=3),
        failure_rate=0.5,
    )
    await run(cb, down)
    await run(cb, down)
    clock.advance(9.0)
    assert cb.stats.failures == 2  # still inside the window
    clock.advance(1.0)
    assert (cb.stats.calls, cb.stats.failures) == (0, 0)
    await run(cb, down)
    assert cb.state is CLOSED  # 1 call: below minimum_calls, the old two are gone
    clock.advance(timedelta(seconds=60).total_seconds())
    assert cb.stats.calls == 0
    cb.breaker.check()


async def test_time_window_rate_rises_when_successes_expire(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """The rate is judged on the window as it is now, so expired successes can expose failures."""
    cb = make(
        clock,
        registry,
        failure_threshold=None,
        window=TimeWindow(size=10, minimum_calls=3, buckets=10),
        failure_rate=0.6,
    )
    for _ in range(4):
        await run(cb, ok)
    clock.advance(5)
    await run(cb, down)
    await run(cb, down)
    assert cb.state is CLOSED  # 2/6
    clock.advance(5.5)  # the four early successes leave the window
    await run(cb, ok)
    assert cb.state is OPEN  # 2/3


async def test_slow_call_rate_trips_even_when_calls_succeed(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """Calls slower than slow_call_duration trip the breaker once their share reaches the rate."""
    cb = make(
        clock,
        registry,
        failure_threshold=None,
        window=CountWindow(size=4, minimum_calls=4),
        slow_call_duration=1.0,
        slow_call_rate=0.5,
    )
    events: list[BreakerStateChanged] = []
    cb.subscribe(events.append)
    assert await run(cb, slow(clock, 2.0)) == "ok"
    assert await run(cb, ok) == "ok"
    assert await run(cb, slow(clock, 0.5)) == "ok"  # below the threshold: not slow
    assert cb.state is CLOSED
    assert await run(cb, slow(clock, 1.0)) == "ok"  # at the threshold: slow
    assert cb.state is OPEN
    assert events[-1].reason == "slow_call_rate"
    assert cb.stats.slow_calls == 2


async def test_a_slow_failure_counts_as_failed_and_slow(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """A call that fails slowly adds to both the failure and the slow-call counts."""
    cb = make(
        clock,
        registry,
        failure_threshold=None,
        window=CountWindow(size=10, minimum_calls=10),
        slow_call_duration=1.0,
    )
    await run(cb, slow(clock, 3.0, fail=True))
    stats = cb.stats
    assert (stats.calls, stats.failures, stats.slow_calls) == (1, 1, 1)
    assert stats.slow_call_rate == 1.0


# -- classification -----------------------------------------------------------------------------


async def test_ignored_errors_count_neither_way(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """An exception the classifier ignores neither trips the breaker nor resets the streak."""
    cb = CircuitBreaker(
        "dep",
        mode="fail_fast",
        clock=clock,
        registry=registry,
        classifier=Classifier(ignored=(KeyError,)),
        failure_threshold=2,
        window=CountWindow(size=10, minimum_calls=10),
    )

    async def missing(delivery: Delivery) -> None:
        raise KeyError("duplicate")

    await run(cb, down)
    for _ in range(5):
        assert await run(cb, missing) == "ignored"
    assert cb.stats.consecutive_failures == 1
    assert cb.stats.calls == 1
    await run(cb, down)
    assert cb.state is OPEN


async def test_terminal_errors_count_as_successes(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """A terminal error means the dependency answered: it resets the failure streak."""
    cb = make(clock, registry, failure_threshold=2)

    async def rejected(delivery: Delivery) -> None:
        raise DeadLetter("bad message")

    await run(cb, down)
    assert await run(cb, rejected) == "terminal"
    await run(cb, down)
    assert cb.state is CLOSED
    assert cb.stats.consecutive_failures == 1


async def test_circuit_open_is_retryable_with_a_hint(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """Fail-fast rejection raises CircuitOpen naming the breaker and the time to the next probe."""
    cb = make(clock, registry, failure_threshold=1, open_wait=8.0)
    await run(cb, down)
    clock.advance(3)
    with pytest.raises(CircuitOpen) as info:
        await cb(Delivery({}), ok)
    assert info.value.name == "dep"
    assert info.value.retry_in == pytest.approx(5.0)
    assert Classifier().classify(info.value) is Verdict.RETRYABLE


# -- open state and half-open -------------------------------------------------------------------


async def test_open_wait_grows_on_repeated_trips_and_resets_after_closing(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """Each failed probe multiplies the open wait (up to the cap); a close starts over."""
    cb = make(
        clock,
        registry,
        failure_threshold=1,
        open_wait=1.0,
        open_wait_multiplier=2.0,
        open_wait_max=5.0,
    )
    waits = []
    await run(cb, down)
    for _ in range(5):
        stats = cb.stats
        waits.append(stats.open_wait)
        assert stats.open_until == clock.monotonic() + stats.open_wait
        clock.advance(stats.open_wait - 0.01)
        assert cb.state is OPEN
        clock.advance(0.01)
        assert cb.state is HALF_OPEN
        assert await run(cb, down) == "failed"  # the probe fails: open again
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0]
    clock.advance(cb.stats.open_wait)
    assert await run(cb, ok) == "ok"
    assert cb.state is CLOSED
    await run(cb, down)
    assert cb.stats.open_wait == 1.0
    assert cb.stats.trips == 1


async def test_half_open_admits_only_the_probe_count(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """Half-open lets half_open_probes calls through and rejects the rest until they finish."""
    cb = make(clock, registry, failure_threshold=1, open_wait=1.0, half_open_probes=2)
    await run(cb, down)
    clock.advance(1)
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    entered = 0

    async def probe(delivery: Delivery) -> None:
        nonlocal entered
        entered += 1
        await gate

    probes = [asyncio.create_task(run(cb, probe)) for _ in range(2)]
    await asyncio.sleep(0)
    assert entered == 2
    assert cb.stats.probes_in_flight == 2
    assert await run(cb, ok) == "rejected"
    assert cb.stats.not_permitted == 1
    gate.set_result(None)
    assert await asyncio.gather(*probes) == ["ok", "ok"]
    assert cb.state is CLOSED


async def test_one_successful_probe_of_several_does_not_close(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """The breaker closes only when every probe has finished successfully."""
    cb = make(clock, registry, failure_threshold=1, open_wait=1.0, half_open_probes=3)
    await run(cb, down)
    clock.advance(1)
    for n in range(2):
        assert await run(cb, ok) == "ok"
        assert cb.state is HALF_OPEN, n
    assert await run(cb, ok) == "ok"
    assert cb.state is CLOSED


async def test_half_open_verdict_uses_the_failure_rate(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """With a failure rate, a few failed probes are tolerated and too many reopen at once."""
    options: dict[str, Any] = {
        "failure_threshold": 1,
        "window": CountWindow(size=10, minimum_calls=10),
        "failure_rate": 0.5,
        "open_wait": 1.0,
        "half_open_probes": 4,
    }
    cb = make(clock, registry, **options)
    await run(cb, down)
    clock.advance(1)
    for call in (down, ok, ok, ok):
        await run(cb, call)
    assert cb.state is CLOSED  # 1 of 4 failed: below 50%
    await run(cb, down)
    clock.advance(cb.stats.open_wait)
    await run(cb, down)
    assert cb.state is HALF_OPEN
    await run(cb, down)
    assert cb.state is OPEN  # 2 of 4 failed: reopened before the other probes ran


async def test_ignored_or_cancelled_probe_returns_its_permit(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """A probe that ends without a verdict frees its permit for another probe."""
    cb = CircuitBreaker(
        "dep",
        mode="fail_fast",
        clock=clock,
        registry=registry,
        classifier=Classifier(ignored=(KeyError,)),
        failure_threshold=1,
        open_wait=1.0,
    )
    await run(cb, down)
    clock.advance(1)

    async def missing(delivery: Delivery) -> None:
        raise KeyError("x")

    assert await run(cb, missing) == "ignored"
    assert cb.state is HALF_OPEN
    task = asyncio.create_task(run(cb, slow(clock, 100)))
    await asyncio.sleep(0)
    assert cb.stats.probes_in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cb.stats.probes_in_flight == 0
    assert await run(cb, ok) == "ok"
    assert cb.state is CLOSED


async def test_a_call_admitted_while_closed_is_not_a_probe(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """An outcome from before a state change is dropped, so it cannot close a half-open breaker."""
    cb = make(clock, registry, failure_threshold=2, open_wait=1.0)
    release: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def lingering(delivery: Delivery) -> None:
        await release

    old = asyncio.create_task(run(cb, lingering))
    await asyncio.sleep(0)
    await run(cb, down)
    await run(cb, down)
    clock.advance(1)
    assert cb.state is HALF_OPEN
    release.set_result(None)
    assert await old == "ok"
    assert cb.state is HALF_OPEN
    assert cb.stats.probes_in_flight == 0
    cb.breaker.check()


# -- pause mode -----------------------------------------------------------------------------------


async def test_pause_mode_holds_a_call_until_a_probe_is_admitted(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """In pause mode a call arriving while open waits, then runs as the probe."""
    cb = make(clock, registry, mode="pause", failure_threshold=1, open_wait=5.0)
    await cb(Delivery({}), ok)
    assert await run(CircuitBreaker(cb.breaker, mode="fail_fast"), down) == "failed"
    assert cb.state is OPEN
    ran = []

    async def record(delivery: Delivery) -> None:
        ran.append(clock.monotonic())

    held = asyncio.create_task(cb(Delivery({}), record))
    for _ in range(3):
        await asyncio.sleep(0)
    assert not held.done()
    assert cb.paused
    clock.advance(5)
    await held
    assert ran == [5.0]
    assert cb.state is CLOSED


async def test_pause_mode_replays_a_call_that_failed_in_the_outage(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """The failure that trips the breaker is held and replayed instead of escaping."""
    cb = make(clock, registry, mode="pause", failure_threshold=1, open_wait=2.0)
    results = iter([ConnectionError("down"), ConnectionError("still down"), None])
    calls = []

    async def flaky(delivery: Delivery) -> None:
        calls.append(clock.monotonic())
        error = next(results)
        if error is not None:
            raise error

    task = asyncio.create_task(cb(Delivery({}), flaky))
    for _ in range(3):
        await asyncio.sleep(0)
    assert calls == [0.0]
    clock.advance(2)  # first probe: fails, open wait doubles to 4
    for _ in range(3):
        await asyncio.sleep(0)
    clock.advance(4)
    await task
    assert calls == [0.0, 2.0, 6.0]
    assert cb.state is CLOSED


async def test_fail_fast_mode_never_pauses(clock: FakeClock, registry: BreakerRegistry) -> None:
    """A fail-fast breaker is a gate that never asks the consumer to stop pulling."""
    cb = make(clock, registry, mode="fail_fast", failure_threshold=1)
    await run(cb, down)
    assert isinstance(cb, Gate)
    assert cb.state is OPEN
    assert not cb.paused
    await asyncio.wait_for(cb.wait_resumed(), 1)


async def test_wait_resumed_returns_once_half_open(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """The consumer gate is paused while open and resumes when a probe may go through."""
    cb = make(clock, registry, mode="pause", failure_threshold=1, open_wait=3.0)
    cb.force_open()
    cb.reset()
    assert await run(CircuitBreaker(cb.breaker, mode="fail_fast"), down) == "failed"
    assert cb.paused
    waiter = asyncio.create_task(cb.wait_resumed())
    await asyncio.sleep(0)
    assert not waiter.done()
    clock.advance(3)
    await asyncio.wait_for(waiter, 1)
    assert cb.state is HALF_OPEN
    assert not cb.paused


async def test_flow_is_steady_exactly_while_the_gate_cannot_be_paused(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """The flag the consumer reads per message: whenever it says steady, the gate is not
    paused; in the states where the gate may pause it is not steady, so the consumer asks."""
    cb = make(clock, registry, mode="pause", failure_threshold=1, open_wait=3.0)
    fail_fast = CircuitBreaker(cb.breaker, mode="fail_fast")
    assert (cb.flow.steady, cb.paused) == (True, False)
    assert await run(fail_fast, down) == "failed"
    assert cb.state is OPEN
    assert (cb.flow.steady, cb.paused) == (False, True)
    assert (fail_fast.flow.steady, fail_fast.paused) == (True, False)  # fail-fast never pauses
    clock.advance(3)
    await asyncio.wait_for(cb.wait_resumed(), 1)
    assert cb.state is HALF_OPEN
    assert (cb.flow.steady, cb.paused) == (False, False)  # a probe may go: the consumer asks
    cb.force_closed()
    assert (cb.flow.steady, cb.paused) == (True, False)
    cb.force_open()
    assert (cb.flow.steady, cb.paused) == (False, True)
    cb.reset()
    assert (cb.flow.steady, cb.paused) == (True, False)


async def test_a_subclass_with_its_own_paused_is_asked_every_time(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """The breaker's flag describes the breaker's own ``paused``; a subclass that answers
    differently gets a flag that is never steady, so the consumer keeps asking it."""

    class Drained(CircuitBreaker):
        @property
        def paused(self) -> bool:
            return True

    gate = Drained(make(clock, registry).breaker)
    assert (gate.flow.steady, gate.paused) == (False, True)


class LoopBoundFakeClock(FakeClock):
    """Virtual time whose timers die with the event loop that armed them, as loop timers do."""

    def call_later(self, seconds: float, callback: Callable[[], object]) -> TimerHandle:
        loop = asyncio.get_running_loop()

        def fire() -> None:
            if not loop.is_closed():
                callback()

        return super().call_later(seconds, fire)


def test_open_timer_is_rearmed_on_a_new_event_loop() -> None:
    """A breaker opened under one event loop still resumes waiters under the next one."""
    clock = LoopBoundFakeClock()
    registry = BreakerRegistry()
    breaker = registry.get("dep", BreakerConfig(failure_threshold=1, open_wait=5), clock=clock)
    cb = CircuitBreaker(breaker)

    async def trip() -> None:
        assert await run(CircuitBreaker(breaker, mode="fail_fast"), down) == "failed"

    asyncio.run(trip())
    assert breaker.state is OPEN

    async def resume() -> None:
        waiter = asyncio.create_task(cb.wait_resumed())
        await asyncio.sleep(0)
        assert not waiter.done()
        clock.advance(5)  # the first loop's timer is dead; the re-armed one fires
        await asyncio.wait_for(waiter, 5)

    asyncio.run(resume())
    assert breaker.state is HALF_OPEN


# -- manual control, events, stats --------------------------------------------------------------


async def test_force_open_force_closed_and_reset(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """Forced states override the thresholds until reset closes the breaker afresh."""
    cb = make(clock, registry, failure_threshold=1, open_wait=1.0)
    cb.force_open()
    clock.advance(3600)
    assert await run(cb, ok) == "rejected"
    assert cb.state is BreakerState.FORCED_OPEN
    cb.force_closed()
    for _ in range(5):
        assert await run(cb, down) == "failed"
    assert cb.breaker.state is BreakerState.FORCED_CLOSED
    assert cb.stats.consecutive_failures == 0
    cb.reset()
    assert cb.state is CLOSED
    await run(cb, down)
    assert cb.state is OPEN
    cb.reset()
    assert (cb.state, cb.stats.trips, cb.stats.open_until) == (CLOSED, 0, None)
    assert clock.pending_timers == 0


async def test_state_changes_reach_subscribers_and_buses(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """Changes reach subscribers and the middleware's bus once, and the causing delivery's bus."""
    consumer_bus_events: list[object] = []
    delivery_bus_events: list[object] = []
    subscribed: list[BreakerStateChanged] = []
    cb = CircuitBreaker(
        "dep",
        mode="fail_fast",
        clock=clock,
        registry=registry,
        events=EventBus(consumer_bus_events.append),
        failure_threshold=1,
        open_wait=2.0,
    )
    cb.subscribe(subscribed.append)
    other_bus = EventBus(delivery_bus_events.append)
    await run(cb, down, Delivery({}, message_id="m-1", key="orders", events=other_bus))
    clock.advance(2)  # timer-driven: no delivery
    await run(cb, ok, Delivery({}, message_id="m-2", key="orders", events=cb.events or EventBus()))

    changes = [(e.from_state, e.to_state, e.reason) for e in subscribed]
    assert changes == [
        (CLOSED, OPEN, "consecutive_failures"),
        (OPEN, HALF_OPEN, "open_wait_elapsed"),
        (HALF_OPEN, CLOSED, "probes_succeeded"),
    ]
    assert consumer_bus_events == subscribed  # once each, although m-2 carried that bus too
    assert delivery_bus_events == [subscribed[0]]
    first = subscribed[0]
    assert (first.message_id, first.key, first.name, first.at, first.open_until) == (
        "m-1",
        "orders",
        "dep",
        0.0,
        2.0,
    )
    assert subscribed[1].message_id is None
    with pytest.raises(AttributeError):
        first.reason = "changed"  # type: ignore[misc]


async def test_a_failing_listener_is_logged_and_ignored(
    clock: FakeClock, registry: BreakerRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """A listener that raises does not stop the transition or the call."""
    cb = make(clock, registry, failure_threshold=1)
    seen: list[BreakerStateChanged] = []

    def broken(event: BreakerStateChanged) -> None:
        raise RuntimeError("listener bug")

    cb.subscribe(broken)
    unsubscribe = cb.subscribe(seen.append)
    with caplog.at_level(logging.ERROR, logger="resilience.breaker"):
        assert await run(cb, down) == "failed"
    assert cb.state is OPEN
    assert len(seen) == 1
    assert "listener" in caplog.text
    unsubscribe()
    cb.reset()
    assert len(seen) == 1


async def test_not_permitted_calls_are_reported_on_the_delivery_bus(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """A rejected delivery emits CallNotPermitted with held=False in fail-fast mode."""
    cb = make(clock, registry, failure_threshold=1)
    await run(cb, down)
    seen: list[object] = []
    await run(cb, ok, Delivery({}, message_id="m-9", events=EventBus(seen.append)))
    assert seen == [
        CallNotPermitted(message_id="m-9", key=None, name="dep", state=OPEN, held=False)
    ]


# -- registry and configuration -------------------------------------------------------------------


async def test_equal_names_share_one_breaker(clock: FakeClock, registry: BreakerRegistry) -> None:
    """Two middlewares with the same name drive the same state; other clocks stay separate."""
    first = make(clock, registry, failure_threshold=2)
    second = make(clock, registry, failure_threshold=2)
    assert first.breaker is second.breaker
    await run(first, down)
    await run(second, down)
    assert first.state is OPEN
    assert registry.find("dep", clock=clock) is first.breaker
    elsewhere = make(FakeClock(), registry, failure_threshold=2)
    assert elsewhere.breaker is not first.breaker
    assert elsewhere.state is CLOSED
    assert len(registry) == 2
    registry.remove("dep", clock=clock)
    assert registry.find("dep", clock=clock) is None
    registry.clear()
    assert list(registry) == []


async def test_conflicting_config_for_a_name_is_an_error(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """Asking for an existing name with other settings raises instead of silently sharing."""
    make(clock, registry, failure_threshold=2)
    with pytest.raises(ConfigError, match="already exists with another configuration"):
        make(clock, registry, failure_threshold=3)
    assert registry.get("dep", clock=clock).config.failure_threshold == 2


def test_get_breaker_takes_keyword_options() -> None:
    """get_breaker builds the config from keywords and returns the shared breaker."""
    registry = BreakerRegistry()
    clock = FakeClock()
    breaker = get_breaker(
        "payments",
        clock=clock,
        registry=registry,
        failure_threshold=3,
        open_wait=timedelta(seconds=2),
    )
    assert isinstance(breaker, Breaker)
    assert breaker.config.open_wait == 2.0
    assert get_breaker("payments", clock=clock, registry=registry) is breaker
    with pytest.raises(ConfigError, match="not both"):
        get_breaker("x", BreakerConfig(), registry=registry, failure_threshold=1)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"failure_rate": 0.5}, "failure_rate needs a window"),
        ({"failure_threshold": None}, "no trip condition"),
        ({"failure_threshold": 0}, "no trip condition"),
        ({"failure_threshold": -1}, "failure_threshold must be"),
        ({"window": CountWindow(10), "failure_rate": 1.5}, r"fraction in \(0, 1\]"),
        ({"window": CountWindow(10), "failure_rate": 0}, r"fraction in \(0, 1\]"),
        ({"slow_call_duration": 1.0}, "needs a window"),
        ({"window": CountWindow(10), "slow_call_rate": 0.5}, "needs slow_call_duration"),
        ({"half_open_probes": 0}, "half_open_probes must be"),
        ({"open_wait": 0}, "open_wait must be > 0"),
        ({"open_wait": 10, "open_wait_max": 5}, "open_wait_max .* must be >= open_wait"),
        ({"open_wait_multiplier": 0.5}, "open_wait_multiplier must be >= 1"),
        ({"window": "count"}, "window must be a CountWindow or a TimeWindow"),
    ],
)
def test_invalid_config_is_rejected_loudly(options: dict[str, object], message: str) -> None:
    """Impossible settings raise ConfigError naming the option."""
    with pytest.raises(ConfigError, match=message):
        BreakerConfig(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: CountWindow(size=0), "CountWindow.size"),
        (lambda: CountWindow(size=5, minimum_calls=6), "must be <= size"),
        (lambda: TimeWindow(size=-1), "TimeWindow.size"),
        (lambda: TimeWindow(size=10, buckets=0), "TimeWindow.buckets"),
        (lambda: TimeWindow(size=10, minimum_calls=True), "TimeWindow.minimum_calls"),
    ],
)
def test_invalid_windows_are_rejected(factory: Callable[[], object], message: str) -> None:
    """Window sizes, minimum calls and bucket counts are validated."""
    with pytest.raises(ConfigError, match=message):
        factory()


def test_window_defaults_are_normalised() -> None:
    """A count window's minimum defaults to min(size, 10); a timedelta size becomes seconds."""
    assert CountWindow(4).minimum_calls == 4
    assert CountWindow(50).minimum_calls == 10
    assert TimeWindow(timedelta(minutes=1)).size == 60.0
    config = BreakerConfig(window=CountWindow(20))
    assert config.failure_rate == 0.5
    assert BreakerConfig(window=CountWindow(20), slow_call_duration=2).slow_call_rate == 1.0


def test_unknown_mode_is_rejected(registry: BreakerRegistry) -> None:
    """The middleware accepts only the pause and fail_fast modes."""
    with pytest.raises(ConfigError, match="pause, fail_fast"):
        CircuitBreaker("dep", mode="hold", registry=registry)  # type: ignore[arg-type]
    breaker = registry.get("dep")
    with pytest.raises(ConfigError, match="ready Breaker"):
        CircuitBreaker(breaker, failure_threshold=2)


# -- in a pipeline -----------------------------------------------------------------------------


async def test_retry_outside_the_breaker_retries_after_circuit_open(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """In a pipeline, fail-fast CircuitOpen is retried by the retry layer until a probe succeeds."""
    cb = make(clock, registry, failure_threshold=1, open_wait=1.0)
    pipeline = Pipeline().retry(attempts=4, wait=Fixed(0.6), clock=clock).use(cb)
    calls: list[float] = []
    failures = iter([True])

    async def handler(payload: dict[str, object]) -> None:
        calls.append(clock.monotonic())
        if next(failures, False):
            raise ConnectionError("blip")

    call = pipeline.build(handler)
    await call(Delivery({}))
    # 0.0 fails and trips; 0.6 is rejected (no call); 1.2 is the probe and succeeds.
    assert calls == [0.0, 1.2]
    assert clock.sleeps == [0.6, 0.6]
    assert cb.state is CLOSED
    assert repr(cb) == "CircuitBreaker('dep', mode='fail_fast', state=closed)"


async def test_a_built_pipeline_times_calls_on_the_breakers_clock(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    """Through Pipeline.build the breaker still measures slow calls with its own clock."""
    cb = make(
        clock,
        registry,
        failure_threshold=None,
        window=TimeWindow(size=60, minimum_calls=2),
        slow_call_duration=1.0,
        slow_call_rate=1.0,
    )

    async def handler(payload: dict[str, object]) -> None:
        await clock.sleep(2.0)

    call = Pipeline(cb).build(handler)
    await call(Delivery({}))
    assert cb.stats.slow_calls == 1
    await call(Delivery({}))
    assert cb.state is OPEN


def test_fast_clock_reader_matches_the_clock() -> None:
    """The hot path reads time.monotonic only where the loop clock is exactly that."""
    import time

    from resilience.clock import LoopClock
    from resilience.clock import monotonic_function as _fast_monotonic

    fake = FakeClock(5.0)
    loop_clock = LoopClock()
    assert _fast_monotonic(fake)() == 5.0
    assert _fast_monotonic(loop_clock) == loop_clock.monotonic  # no running loop

    async def inside() -> None:
        assert _fast_monotonic(loop_clock) is time.monotonic
        assert abs(_fast_monotonic(loop_clock)() - loop_clock.monotonic()) < 1.0

    asyncio.run(inside())


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"window": CountWindow(size=10, minimum_calls=10)},
        {"window": CountWindow(size=10, minimum_calls=10), "slow_call_duration": 5.0},
    ],
    ids=["simple", "window", "timed"],
)
def test_success_hooks_record_only_calls_of_the_current_epoch(options: dict[str, Any]) -> None:
    """``enter`` admits a closed breaker's call with one token, ``leave`` records its success;
    a call admitted before a state change (here a reset) is not recorded after it, and a
    breaker that is not closed sends the call to the slow path."""
    clock = FakeClock()
    layer = CircuitBreaker(
        "hooks", clock=clock, registry=BreakerRegistry(), failure_threshold=3, **options
    )
    breaker = layer.breaker
    d = Delivery({}, message_id="m1")
    early = layer.enter(d)
    breaker.reset()
    breaker._consecutive = 2
    layer.leave(early, d)
    assert breaker._consecutive == 2  # admitted in the previous epoch: not recorded
    token = layer.enter(d)
    assert isinstance(token, tuple) == ("slow_call_duration" in options)
    layer.leave(token, d)
    assert breaker._consecutive == 0
    if breaker._window is not None:
        assert breaker._window.totals(clock.monotonic())[0] == 1
    layer.force_open()
    assert layer.enter(d) is SLOW_PATH
    layer.reset()
    token = layer.enter(d)
    assert (token[0] if isinstance(token, tuple) else token) == breaker._epoch
