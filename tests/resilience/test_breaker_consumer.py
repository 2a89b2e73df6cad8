"""End to end through ResilientConsumer: an outage of any length dead-letters nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import pytest

from abe.backends.message_queue.service.memory import MemoryBackend
from resilience.breaker import BreakerState, BreakerStateChanged, CallNotPermitted, get_breaker
from resilience.clock import FakeClock
from resilience.consumer import ResilientConsumer
from resilience.dead_letter import DeadLetterRouter, MemoryStore
from resilience.events import EventBus, MessageSettled, Outcome
from resilience.policy import Policy
from resilience.testing import capture_logs, run_until_settled

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


@pytest.mark.parametrize("concurrency", [3, 8])
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


@pytest.mark.parametrize("concurrency", [3, 4])
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


def guarded_policy(name: str, total: float | None) -> Policy:
    """Breaker, retry, per-attempt and total timeouts, and a memory dead-letter destination."""
    return Policy.from_dict(
        {
            "retry": {"attempts": 3, "backoff": "exponential", "initial": 0.1, "maximum": 1},
            "timeout": {"attempt": 5, "total": total or 0},
            "circuit_breaker": {
                "name": name,
                "failure_threshold": 3,
                "open_wait": 1,
                "open_wait_multiplier": 2,
                "open_wait_max": 60,
            },
            "dead_letter": {"destination": "memory"},
        }
    )


def router_of(consumer: ResilientConsumer) -> DeadLetterRouter:
    """The dead-letter layer the consumer built from its policy."""
    assert consumer.pipeline is not None
    (router,) = [x for x in consumer.pipeline.layers if isinstance(x, DeadLetterRouter)]
    return router


@pytest.mark.parametrize("concurrency", [3, 8])
async def test_an_outage_with_a_dead_letter_destination_dead_letters_nothing(
    concurrency: int,
) -> None:
    """With breaker and dead_letter in one policy, an hour-long outage dead-letters nothing
    and every message is processed once after recovery."""
    clock = FakeClock()
    backend = MemoryBackend.isolated()
    dep = Dependency()
    consumer, task, events = await start(
        backend, guarded_policy(f"guarded-{concurrency}", None), clock, concurrency, dep
    )

    await advance_until(clock, lambda: False, until=OUTAGE)
    router = router_of(consumer)
    store = router.sink
    assert isinstance(store, MemoryStore)
    assert store.write_attempts == 0
    assert [e for e in events if isinstance(e, MessageSettled)] == []
    assert dep.failed_calls < 3 * concurrency + 80

    dep.down = False
    await advance_until(clock, lambda: len(dep.processed) == MESSAGES, until=OUTAGE + 300)
    await stop(consumer, task)

    assert store.write_attempts == 0
    settled = [e for e in events if isinstance(e, MessageSettled)]
    assert len(settled) == MESSAGES
    assert {e.outcome for e in settled} <= {Outcome.SUCCESS, Outcome.RETRIED}
    assert sorted(dep.processed) == list(range(MESSAGES))
    assert backend.size() == 0
    assert backend.unacked() == []


@pytest.mark.parametrize("concurrency", [3, 8])
async def test_a_forced_open_breaker_holds_messages_past_their_total_timeout(
    concurrency: int,
) -> None:
    """force_open() during an outage holds every message until reset(), even past its total
    timeout: the dead-letter layer holds it too and runs it afresh after the reset."""
    clock = FakeClock()
    backend = MemoryBackend.isolated()
    dep = Dependency()
    name = f"forced-{concurrency}"
    consumer, task, _ = await start(backend, guarded_policy(name, 30), clock, concurrency, dep)
    await advance_until(clock, lambda: False, until=5)
    breaker = get_breaker(name, clock=clock)
    assert breaker.state is BreakerState.OPEN
    breaker.force_open()  # an operator keeps it open for maintenance
    await advance_until(clock, lambda: False, until=600)
    router = router_of(consumer)
    assert router.stats.held >= concurrency  # each held message outlived its 30 s
    assert router.stats.dead_lettered == 0

    dep.down = False
    breaker.reset()
    await advance_until(clock, lambda: len(dep.processed) == MESSAGES, until=700)
    await stop(consumer, task)
    assert router.stats.dead_lettered == 0
    assert sorted(dep.processed) == list(range(MESSAGES))


def poison_policies() -> dict[str, dict[str, Any]]:
    """The default policy with a dead-letter destination, and one with a pausing breaker."""
    return {
        "default": {"dead_letter": {"destination": "memory"}},
        "pausing-breaker": {
            "retry": {"attempts": 3, "backoff": "exponential", "initial": 0.1, "maximum": 1},
            "circuit_breaker": {"name": "poison", "mode": "pause"},
            "dead_letter": {"destination": "memory"},
        },
    }


@pytest.mark.parametrize("concurrency", [1, 4])
@pytest.mark.parametrize("which", ["default", "pausing-breaker"])
async def test_a_poison_message_among_healthy_ones_is_dead_lettered(
    which: str, concurrency: int
) -> None:
    """A message failing every attempt with a retryable error, alone, is not an outage: the
    breaker stays closed, the message is dead-lettered by its own attempt limit and every
    healthy message is processed."""
    clock = FakeClock()
    backend = MemoryBackend.isolated()
    processed: list[int] = []

    async def handler(payload: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        if payload["n"] == 3:
            raise ConnectionError("fails for this message only")
        processed.append(payload["n"])

    for n in range(20):
        await backend.publish("orders", {"n": n})
    data = poison_policies()[which]
    if "circuit_breaker" in data:
        data["circuit_breaker"]["name"] = f"poison-{which}-{concurrency}"
    consumer = ResilientConsumer(
        backend, policy=Policy.from_dict(data), clock=clock, concurrency=concurrency
    )
    task = asyncio.create_task(consumer.run(handler))
    await asyncio.sleep(0)  # let the consumer build its pipeline
    await advance_until(
        clock,
        lambda: len(processed) == 19 and router_of(consumer).stats.dead_lettered == 1,
        until=600,
        step=0.1,
    )
    await stop(consumer, task)
    assert sorted(processed) == [n for n in range(20) if n != 3]
    stats = router_of(consumer).stats
    assert stats.by_reason == {"retries_exhausted": 1}
    (env,) = router_of(consumer).sink.envelopes  # type: ignore[attr-defined]
    assert env["payload"] == {"n": 3}
    assert env["error"]["type"] == "ConnectionError"
    assert env["attempts"]["in_process"] == 3
    if "circuit_breaker" in data:
        breaker = get_breaker(data["circuit_breaker"]["name"], clock=clock)
        assert breaker.state is BreakerState.CLOSED
        assert breaker.stats.trips == 0
    assert backend.size() == 0
    assert backend.unacked() == []


async def test_probes_come_from_another_message_than_the_one_that_tripped_the_breaker() -> None:
    """When a brief outage trips the breaker on a poison message's failure, the half-open
    probe is taken by another message: it succeeds, the breaker closes, the poison message is
    dead-lettered by its attempt limit and the healthy messages flow."""
    clock = FakeClock()
    backend = MemoryBackend.isolated()
    processed: list[int] = []
    down_until = 0.5

    async def handler(payload: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        if payload["n"] == 2:
            raise ConnectionError("fails for this message only")
        if clock.monotonic() < down_until:
            raise ConnectionError("dependency unavailable")
        processed.append(payload["n"])

    for n in range(12):
        await backend.publish("orders", {"n": n})
    name = "probe-choice"
    events: list[object] = []
    consumer = ResilientConsumer(
        backend,
        policy=guarded_policy(name, None),
        clock=clock,
        concurrency=3,
        events=EventBus(events.append),
    )
    task = asyncio.create_task(consumer.run(handler))
    await advance_until(clock, lambda: len(processed) == 11, until=600, step=0.1)
    await stop(consumer, task)
    changes = [e for e in events if isinstance(e, BreakerStateChanged)]
    assert [(c.to_state, c.reason) for c in changes[:3]] == [
        (BreakerState.OPEN, "consecutive_failures"),
        (BreakerState.HALF_OPEN, "open_wait_elapsed"),
        (BreakerState.CLOSED, "probes_succeeded"),
    ]
    tripper = changes[0].message_id
    assert changes[2].message_id != tripper  # the probe was another message
    assert sorted(processed) == [n for n in range(12) if n != 2]
    (env,) = router_of(consumer).sink.envelopes  # type: ignore[attr-defined]
    assert env["payload"] == {"n": 2}
    assert env["source"]["message_id"] == tripper
    assert env["error"]["reason"] == "retries_exhausted"
    assert get_breaker(name, clock=clock).state is BreakerState.CLOSED
    assert backend.size() == 0
    assert backend.unacked() == []


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_one_at_a_time_an_outage_costs_the_messages_before_the_breaker_can_tell(
    concurrency: int,
) -> None:
    """One message at a time, an outage is told from a bad message only once
    failure_threshold distinct messages failed: the ones before are dead-lettered (replayable),
    the rest are held and processed after recovery. With as many workers as the threshold,
    nothing is dead-lettered."""
    clock = FakeClock()
    backend = MemoryBackend.isolated()
    dep = Dependency()
    name = f"one-at-a-time-{concurrency}"
    consumer, task, _ = await start(backend, guarded_policy(name, None), clock, concurrency, dep)
    await advance_until(clock, lambda: False, until=600)
    assert get_breaker(name, clock=clock).state is not BreakerState.CLOSED
    dep.down = False
    await advance_until(clock, lambda: len(dep.processed) == MESSAGES - 2, until=900)
    await advance_until(clock, lambda: len(dep.processed) == MESSAGES, until=905)
    await stop(consumer, task)
    dead = router_of(consumer).stats.dead_lettered
    assert dead == (2 if concurrency == 1 else 0)
    assert len(dep.processed) + dead == MESSAGES
    assert backend.size() == 0
    assert backend.unacked() == []


async def test_a_message_out_of_attempts_before_the_breaker_opens_is_dead_lettered() -> None:
    """A failure while the breaker is still closed is the message's own: it is dead-lettered
    (once warned about), not held; the warning names the breaker and the fix."""
    clock = FakeClock()
    backend = MemoryBackend.isolated()
    await backend.publish("orders", {"n": 0})
    policy = Policy.from_dict(
        {
            "retry": {"attempts": 2, "initial": 0.1},
            "circuit_breaker": {"name": "early-dlq", "failure_threshold": 5},
            "dead_letter": {"destination": "memory"},
        }
    )
    consumer = ResilientConsumer(backend, policy=policy, clock=clock)
    dep = Dependency()
    with capture_logs() as logs:
        outcomes = await run_until_settled(consumer, dep.handler, 1)
    assert [e.outcome for e in outcomes.settled] == [Outcome.DEAD_LETTERED]
    router = router_of(consumer)
    assert router.stats.by_reason == {"retries_exhausted": 1}
    assert router.stats.held == 0
    (warning,) = [x for x in logs if x["event"] == "dead_lettered_before_breaker_opened"]
    assert warning["breaker"] == "early-dlq"
    assert "failure_threshold" in warning["hint"]
