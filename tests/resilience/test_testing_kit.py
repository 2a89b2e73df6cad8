"""The public test kit, used the way the README shows."""

from __future__ import annotations

from typing import Any

from abe.backends.message_queue.service.memory import MemoryBackend
from resilience.consumer import ResilientConsumer
from resilience.events import AttemptFailed, Outcome
from resilience.pipeline import Pipeline
from resilience.retry import Fixed
from resilience.testing import (
    FakeClock,
    MemoryStore,
    capture_events,
    run_until_settled,
    zero_waits,
)


async def always_failing_handler(payload: dict[str, Any]) -> None:
    raise ConnectionError("payment service down")


async def test_readme_example_dead_letters_after_retries() -> None:
    """The README's test-kit example: three attempts, then one dead letter in the store."""
    backend = MemoryBackend.isolated()
    await backend.publish("orders", {"order": 1})
    store = MemoryStore()
    consumer = ResilientConsumer(
        backend, policy=Pipeline().dead_letter(store).retry(attempts=3, wait=Fixed(30))
    )
    with zero_waits():
        outcomes = await run_until_settled(consumer, always_failing_handler, 1)
    assert outcomes.counts[Outcome.DEAD_LETTERED] == 1
    assert store.envelopes[0]["error"]["reason"] == "retries_exhausted"
    assert store.envelopes[0]["attempts"]["in_process"] == 3
    assert backend.unacked() == []


async def test_capture_events_filters_by_kind() -> None:
    """capture_events collects only the requested event type and stops afterwards."""
    clock = FakeClock()
    backend = MemoryBackend.isolated()
    await backend.publish("orders", {"order": 1})
    consumer = ResilientConsumer(
        backend, policy=Pipeline().retry(attempts=2, wait=Fixed(1), clock=clock), clock=clock
    )
    with capture_events(consumer.events, AttemptFailed) as failures:
        await run_until_settled(consumer, always_failing_handler, 1)
    assert [f.attempt for f in failures] == [1, 2]
    assert all(f.error_type == "ConnectionError" for f in failures)
    assert not consumer.events.listeners
    assert clock.sleeps == [1]
