"""Property tests: concurrent calls never leave a breaker inconsistent; windows count right."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilience.breaker import (
    BreakerConfig,
    BreakerRegistry,
    BreakerState,
    BreakerStateChanged,
    CircuitBreaker,
    CountWindow,
    TimeWindow,
)
from resilience.classify import Classifier
from resilience.clock import FakeClock
from resilience.delivery import Delivery
from resilience.errors import CircuitOpen, DeadLetter

pytestmark = pytest.mark.timeout(60)

CLOSED = BreakerState.CLOSED
OPEN = BreakerState.OPEN
HALF_OPEN = BreakerState.HALF_OPEN
LEGAL = {(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (HALF_OPEN, CLOSED)}
OUTCOMES = ("ok", "fail", "slow", "ignored", "terminal", "cancel")


@st.composite
def configs(draw: st.DrawFn) -> BreakerConfig:
    threshold = draw(st.sampled_from([None, 1, 2, 3]))
    window = draw(
        st.sampled_from(
            [None, CountWindow(4, 2), CountWindow(10, 3), TimeWindow(5.0, 2, buckets=5)]
        )
    )
    if threshold is None and window is None:
        threshold = 2
    slow = window is not None and draw(st.booleans())
    return BreakerConfig(
        failure_threshold=threshold,
        window=window,
        failure_rate=None if window is None else draw(st.sampled_from([0.3, 0.5, 1.0])),
        slow_call_duration=1.0 if slow else None,
        slow_call_rate=0.5 if slow else None,
        open_wait=1.0,
        open_wait_multiplier=2.0,
        open_wait_max=8.0,
        half_open_probes=draw(st.integers(1, 3)),
    )


calls_strategy = st.lists(
    st.tuples(
        st.lists(st.sampled_from(OUTCOMES), max_size=3),  # scripted outcomes, then "ok"
        st.integers(0, 3),  # loop turns the handler takes
        st.sampled_from([0.0, 0.0, 0.5, 2.0]),  # virtual time passing before the next call
    ),
    min_size=1,
    max_size=30,
)


@dataclass
class Observed:
    active_probes: Counter[int] = field(default_factory=Counter)
    admitted_probes: Counter[int] = field(default_factory=Counter)
    returned_permits: Counter[int] = field(default_factory=Counter)
    max_active: int = 0
    results: list[str] = field(default_factory=list)


async def scenario(
    config: BreakerConfig, mode: str, calls: list[tuple[list[str], int, float]]
) -> Observed:
    clock = FakeClock()
    cb = CircuitBreaker(
        "prop",
        mode=mode,  # type: ignore[arg-type]
        clock=clock,
        registry=BreakerRegistry(),
        classifier=Classifier(ignored=(KeyError,)),
        config=config,
    )
    breaker = cb.breaker
    seen = Observed()
    probes = config.half_open_probes

    def on_change(event: BreakerStateChanged) -> None:
        assert (event.from_state, event.to_state) in LEGAL, event
        breaker.check()

    cb.subscribe(on_change)

    def handler_for(script: list[str], turns: int):  # type: ignore[no-untyped-def]
        async def handler(delivery: Delivery) -> None:
            state, epoch = breaker.state, breaker._epoch
            assert state in (CLOSED, HALF_OPEN), f"a call ran while {state}"
            probe = state is HALF_OPEN
            if probe:
                seen.admitted_probes[epoch] += 1
                seen.active_probes[epoch] += 1
                seen.max_active = max(seen.max_active, seen.active_probes[epoch])
                assert seen.active_probes[epoch] <= probes
                assert seen.admitted_probes[epoch] <= probes + seen.returned_permits[epoch]
            outcome = script.pop(0) if script else "ok"
            try:
                for _ in range(turns):
                    await asyncio.sleep(0)
                if outcome == "slow":
                    await clock.sleep(1.5)
                elif outcome == "fail":
                    raise ConnectionError("down")
                elif outcome == "ignored":
                    raise KeyError("not a failure")
                elif outcome == "terminal":
                    raise DeadLetter("bad message")
                elif outcome == "cancel":
                    raise asyncio.CancelledError
            finally:
                if probe:
                    seen.active_probes[epoch] -= 1
                    if outcome in ("ignored", "cancel"):
                        seen.returned_permits[epoch] += 1

        return handler

    async def one(script: list[str], turns: int) -> str:
        try:
            await cb(Delivery({}), handler_for(script, turns))
        except asyncio.CancelledError:
            return "cancelled"
        except Exception as exc:
            return type(exc).__name__
        return "ok"

    tasks = []
    for script, turns, wait in calls:
        tasks.append(asyncio.create_task(one(list(script), turns)))
        await asyncio.sleep(0)
        clock.advance(wait)
        breaker.check()
    for _ in range(500):
        if all(t.done() for t in tasks):
            break
        clock.advance(1.0)
        for _ in range(4):
            await asyncio.sleep(0)
        breaker.check()
    assert all(t.done() for t in tasks), "held calls never finished after the dependency healed"
    seen.results = [t.result() for t in tasks]
    breaker.check()
    return seen


@settings(max_examples=200, deadline=None)
@given(config=configs(), mode=st.sampled_from(["pause", "fail_fast"]), calls=calls_strategy)
def test_concurrent_calls_keep_the_breaker_consistent(
    config: BreakerConfig, mode: str, calls: list[tuple[list[str], int, float]]
) -> None:
    """Any interleaving of outcomes keeps counters consistent and never exceeds the probe count."""
    seen = asyncio.run(scenario(config, mode, calls))
    assert seen.max_active <= config.half_open_probes
    assert len(seen.results) == len(calls)
    if mode == "pause":
        assert CircuitOpen.__name__ not in seen.results


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 12),
    codes=st.lists(st.sampled_from([0, 1, 2, 3]), max_size=60),
)
def test_count_window_totals_match_the_last_calls(size: int, codes: list[int]) -> None:
    """A count window's totals always equal a recount of its last ``size`` outcomes."""
    ring = CountWindow(size, 1).build()
    for n, code in enumerate(codes, 1):
        ring.record(code, 0.0)
        last = codes[max(0, n - size) : n]
        assert ring.totals(0.0) == (
            len(last),
            sum(1 for c in last if c & 1),
            sum(1 for c in last if c & 2),
        )
        ring.check()


@settings(max_examples=200, deadline=None)
@given(
    buckets=st.integers(1, 8),
    steps=st.lists(st.tuples(st.integers(0, 12), st.sampled_from([0, 1])), max_size=60),
)
def test_time_window_keeps_calls_between_size_minus_a_bucket_and_size(
    buckets: int, steps: list[tuple[int, int]]
) -> None:
    """A call stays counted while younger than size - size/buckets and is gone once size old."""
    size = float(buckets)  # one-second buckets keep every boundary exact in binary
    window = TimeWindow(size, 1, buckets=buckets).build()
    now = 0.0
    recorded: list[tuple[float, int]] = []
    for quarter_seconds, code in steps:
        now += quarter_seconds / 4
        window.record(code, now)
        recorded.append((now, code))
        calls, failures, _ = window.totals(now)
        surely_in = [c for t, c in recorded if now - t < size - 1.0]
        maybe_in = [c for t, c in recorded if now - t < size]
        assert len(surely_in) <= calls <= len(maybe_in)
        assert sum(surely_in) <= failures <= sum(maybe_in)
        window.check()
