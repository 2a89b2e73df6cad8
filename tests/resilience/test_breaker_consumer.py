"""End to end through ResilientConsumer: an outage of any length dead-letters nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import pytest

from abe.backends.message_queue.service.memory import MemoryBackend
from resilience.breaker import BreakerState, BreakerStateChanged, CallNotPermitted
from resilience.clock import FakeClock
from resilience.consumer import ResilientConsumer
from resilience.events import EventBus, MessageSettled, Outcome
from resilience.policy import Policy

pytestmark = pytest.mark.timeout(60)

MESSAGES = 40
OUTAGE = 3600.0  # one simulated hour


def policy(name: str, mode: str = "pause") -> Policy:
    """Three attempts, no dead-letter destination, and a breaker tripping on three failures."""
    return Policy.from_dict(
        {
            "retry": {"attempts": 3, "backoff": "exponential", "initial": 0.1, "maximum": 1},
            "timeout": {"attempt": 5},
            "circuit_breaker": {
                "name": name,
                "mode": mode,
                "failure_threshold": 3,
                "open_wait": 1,
                "open_wait_multiplier": 2,
                "open_wait_max": 60,
            },
        }
    )


class Dependency:
    """A downstream service that is down until told otherwise."""

    def __init__(self) -> None:
        self.down = True
        self.failed_calls = 0
        self.processed: list[int] = []

    async def handler(self, payload: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        if self.down:
            self.failed_calls += 1
            raise ConnectionError("dependency unavailable")
        self.processed.append(payload["n"])


async def advance_until(
    clock: FakeClock, done: Callable[[], bool], *, until: float, step: float = 1.0
) -> None:
    """Move virtual time in steps, letting the loop run between them, until ``done()``."""
    while not done():
        if clock.monotonic() >= until:
            return
        clock.advance(step)
        for _ in range(8):
            await asyncio.sleep(0)


async def start(
    backend: MemoryBackend, pol: Policy, clock: FakeClock, concurrency: int, dep: Dependency
) -> tuple[ResilientConsumer, asyncio.Task[None], list[object]]:
    events: list[object] = []
    consumer = ResilientConsumer(
        backend,
        policy=pol,
        clock=clock,
        concurrency=concurrency,
        events=EventBus(events.append),
    )
    for n in range(MESSAGES):
        await backend.publish("orders", {"n": n})
    task = asyncio.create_task(consumer.run(dep.handler))
    return consumer, task, events


async def stop(consumer: ResilientConsumer, task: asyncio.Task[None]) -> None:
    await consumer.shutdown()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("concurrency", [1, 8])
async def test_an_hour_long_outage_dead_letters_nothing(concurrency: int) -> None:
    """While the breaker is open the consumer holds its messages; all succeed after recovery."""
    clock = FakeClock()
    backend = MemoryBackend.isolated()
    dep = Dependency()
    consumer, task, events = await start(
        backend, policy(f"outage-{concurrency}"), clock, concurrency, dep
    )

    await advance_until(clock, lambda: False, until=OUTAGE)
    settled = [e for e in events if isinstance(e, MessageSettled)]
    assert settled == []  # nothing failed, nothing was dead-lettered, nothing was acked
    assert backend.size() == MESSAGES - concurrency  # the consumer stopped pulling
    assert len(backend.unacked()) == concurrency  # and holds what it has
    held = [e for e in events if isinstance(e, CallNotPermitted)]
    assert held
    assert all(e.held for e in held)
    # Only probes reach the dependency: the open wait grows to a minute, not 3600 calls.
    assert dep.failed_calls < 3 * concurrency + 80

    dep.down = False
    await advance_until(clock, lambda: len(dep.processed) == MESSAGES, until=OUTAGE + 300)
    await stop(consumer, task)

    settled = [e for e in events if isinstance(e, MessageSettled)]
    outcomes = {e.outcome for e in settled}
    assert len(settled) == MESSAGES
    assert outcomes <= {Outcome.SUCCESS, Outcome.RETRIED}
    assert sorted(dep.processed) == list(range(MESSAGES))  # every message, exactly once
    if concurrency == 1:
        assert dep.processed == list(range(MESSAGES))  # and in order
    assert backend.size() == 0
    assert backend.unacked() == []
    changes = [(e.from_state, e.to_state) for e in events if isinstance(e, BreakerStateChanged)]
    assert changes[0] == (BreakerState.CLOSED, BreakerState.OPEN)
    assert changes[-1] == (BreakerState.HALF_OPEN, BreakerState.CLOSED)
    assert clock.monotonic() < OUTAGE + 120  # recovered within one (capped) open wait


async def test_fail_fast_mode_keeps_consuming_and_fails_messages() -> None:
    """With mode fail_fast the consumer never pauses: an outage turns messages into failures."""
    clock = FakeClock()
    backend = MemoryBackend.isolated()
    dep = Dependency()
    consumer, task, events = await start(
        backend, policy("outage-fail-fast", mode="fail_fast"), clock, 1, dep
    )
    await advance_until(
        clock,
        lambda: sum(isinstance(e, MessageSettled) for e in events) == MESSAGES,
        until=OUTAGE,
    )
    await stop(consumer, task)
    settled = [e for e in events if isinstance(e, MessageSettled)]
    assert len(settled) == MESSAGES
    assert {e.outcome for e in settled} == {Outcome.FAILED}
    assert {e.error_type for e in settled} >= {"CircuitOpen"}
    assert dep.failed_calls < MESSAGES  # rejected calls never reached the dependency
    assert backend.size() == 0


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_shutdown_during_an_outage_releases_the_held_messages(concurrency: int) -> None:
    """Messages held by an open breaker are released, not acked, when the consumer stops."""
    clock = FakeClock()
    backend = MemoryBackend.isolated()
    dep = Dependency()
    consumer, task, events = await start(
        backend, policy(f"shutdown-{concurrency}"), clock, concurrency, dep
    )
    consumer.drain_timeout = 5.0
    await advance_until(clock, lambda: False, until=600)
    assert len(backend.unacked()) == concurrency
    stopping = asyncio.create_task(stop(consumer, task))
    await advance_until(clock, stopping.done, until=700)
    await stopping
    settled = [e for e in events if isinstance(e, MessageSettled)]
    assert [e.outcome for e in settled] == [Outcome.CANCELLED] * concurrency
    assert backend.unacked() == []
    assert backend.size() == MESSAGES  # everything is back in the queue
    redelivered = [m for m in backend.peek("orders") if m.delivery_count == 2]
    assert len(redelivered) == concurrency
