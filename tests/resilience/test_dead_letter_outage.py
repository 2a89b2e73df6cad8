"""A dead-letter destination that is down: per-message backoff, other messages flow, and the
envelope keeps the failure that sent the message there. Runs on virtual loop time."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from abe.backends.message_queue.service.memory import MemoryBackend
from resilience.bench import run_virtual
from resilience.clock import FakeClock
from resilience.consumer import ResilientConsumer
from resilience.dead_letter import DeadLetterFailed, DeadLetterRouter, MemoryStore
from resilience.delivery import Delivery
from resilience.errors import DeadLetter, DeadLetterWriteError
from resilience.events import EventBus, MessageSettled, Outcome
from resilience.pipeline import Pipeline
from resilience.retry import Fixed, Retry
from resilience.testing import capture_events

OUTAGE = 20.0
MESSAGES = 15
POISON = (0, 1)


class PoisonError(Exception):
    """What the handler raises for a bad message."""


class DownUntil(MemoryStore):
    """A memory store whose writes fail until loop time ``until``; records when writes ran."""

    def __init__(self, until: float) -> None:
        super().__init__()
        self.until = until
        self.attempted_at: list[float] = []

    async def write(self, envelope: Mapping[str, Any], delivery: Delivery | None = None) -> None:
        now = asyncio.get_running_loop().time()
        self.attempted_at.append(now)
        self.failure = ConnectionRefusedError("store down") if now < self.until else None
        await super().write(envelope, delivery)


async def handle_order(payload: dict[str, Any]) -> None:
    """Fails for the poison orders, succeeds for the others."""
    if payload["n"] in POISON:
        raise PoisonError(f"order {payload['n']} is malformed")


async def outage_run(concurrency: int) -> dict[str, Any]:
    """Consume MESSAGES orders (two poison) while the store is down for OUTAGE seconds."""
    loop = asyncio.get_running_loop()
    backend = MemoryBackend.isolated()
    for n in range(MESSAGES):
        await backend.publish("orders", {"n": n})
    store = DownUntil(OUTAGE)
    router = DeadLetterRouter(store)
    settled: list[MessageSettled] = []
    processed: dict[int, float] = {}

    async def handler(payload: dict[str, Any]) -> None:
        await handle_order(payload)
        processed[payload["n"]] = loop.time()

    consumer = ResilientConsumer(
        backend,
        policy=Pipeline(router, Retry(attempts=3, wait=Fixed(0.1))),
        concurrency=concurrency,
        events=EventBus(lambda e: settled.append(e) if isinstance(e, MessageSettled) else None),
    )
    task = asyncio.create_task(consumer.run(handler))
    while len(store) < len(POISON) or len(processed) < MESSAGES - len(POISON):
        if loop.time() > 600:
            break
        await asyncio.sleep(0.5)
    await consumer.shutdown()
    await task
    return {
        "store": store,
        "router": router,
        "backend": backend,
        "processed": processed,
        "settled": settled,
        "end": loop.time(),
    }


@pytest.mark.parametrize("concurrency", [3, 4])
def test_sink_outage_backs_off_per_message_and_lets_others_flow(concurrency: int) -> None:
    """While the store is down, each poison message retries its write on a growing backoff
    (a handful of writes in 20 s, not a hot loop), the healthy messages are all processed
    meanwhile, and once the store is back both land in it with their own failure: nothing
    is lost."""
    run = run_virtual(outage_run(concurrency))
    store: DownUntil = run["store"]
    backend: MemoryBackend = run["backend"]
    during = [t for t in store.attempted_at if t < OUTAGE]
    # The waits of one message are at least 0.05, 0.1, ... 1.6 s (3.15 s in all), then 2.5 s
    # or more: at most 6 + 17 / 2.5 + 1 = 14 writes each in 20 s, whatever the jitter.
    assert len(during) <= 2 * 14, during
    assert len(during) >= 2 * 4  # the writes were retried, not given up
    # Every healthy order went through while the store was still down.
    assert sorted(run["processed"]) == [n for n in range(MESSAGES) if n not in POISON]
    assert max(run["processed"].values()) < OUTAGE
    # Nothing lost: each message is processed or stored, nothing left on the broker.
    assert len(store) == len(POISON)
    assert backend.size() == 0
    assert backend.unacked() == []
    assert run["router"].stats.pending_writes == 0
    for env in store.envelopes:
        n = env["payload"]["n"]
        assert n in POISON
        error = env["error"]
        assert error["reason"] == "retries_exhausted"
        assert error["type"].endswith("PoisonError")
        assert error["message"] == f"order {n} is malformed"
        assert "in handle_order" in error["traceback"]
        assert f"PoisonError: order {n} is malformed" in error["traceback"]
        writes = env["write_failures"]
        assert writes["count"] >= 4
        assert writes["recent"]
        for failure in writes["recent"]:
            assert failure["type"] == "ConnectionRefusedError"
            assert failure["message"] == "store down"
            assert failure["at"] > 0
        assert writes["first"] <= writes["last"]
    outcomes = {e.outcome for e in run["settled"]}
    assert Outcome.DEAD_LETTERED in outcomes


def test_a_waiting_write_holds_the_only_slot_at_concurrency_one() -> None:
    """With one slot, the message waiting for the store holds it: the others wait too (the
    documented limit), and still every message ends processed or stored."""
    run = run_virtual(outage_run(1))
    store: DownUntil = run["store"]
    assert len(store) == len(POISON)
    assert min(run["processed"].values()) >= OUTAGE
    assert run["backend"].unacked() == []
    assert len([t for t in store.attempted_at if t < OUTAGE]) <= 12


async def test_write_backoff_grows_per_message_on_the_clock() -> None:
    """Failed writes of one message wait 0.05-0.1 s, then twice as long each time (jitter
    within each step), capped at write_failure_backoff; the wait goes on across deliveries."""
    clock = FakeClock()
    store = MemoryStore()
    store.failure = OSError("disk full")
    router = DeadLetterRouter(store, clock=clock, write_failure_backoff=2.0, write_attempts=3)

    async def call_next(delivery: Delivery) -> None:
        raise DeadLetter("bad order")

    for count in (1, 2, 3):
        delivery = Delivery({"n": 1}, key="orders", message_id="7-0", delivery_count=count)
        with pytest.raises(DeadLetterWriteError):
            await router(delivery, call_next)
    assert store.write_attempts == 9
    assert len(clock.sleeps) == 8  # 2 waits in each delivery, one at the start of each later one
    for n, wait in enumerate(clock.sleeps, start=1):
        low = min(0.05 * 2 ** (n - 1), 1.0)
        assert low <= wait <= 2 * low + 1e-9, (n, wait)
    assert router.stats.write_failures == 9
    assert router.stats.pending_writes == 1


async def test_delivery_limit_keeps_the_original_failure() -> None:
    """A message whose write failed and that comes back past its attempt limit is written with
    the failure that sent it to the destination, not as DeliveryLimitExceeded."""
    clock = FakeClock()
    backend = MemoryBackend.isolated()
    await backend.publish("orders", {"n": 0})
    store = MemoryStore()
    store.failure = OSError("disk full")
    router = DeadLetterRouter(store, clock=clock, write_attempts=1)
    consumer = ResilientConsumer(
        backend, policy=Pipeline(router, Retry(attempts=2, clock=clock)), clock=clock
    )
    calls = 0

    async def handler(payload: dict[str, Any]) -> None:
        nonlocal calls
        calls += 1
        raise PoisonError("order 0 is malformed")

    settled: list[MessageSettled] = []

    def watch(event: object) -> None:
        if isinstance(event, MessageSettled):
            settled.append(event)
            if len(settled) == 3:
                store.failure = None  # the store is back once the attempt limit is reached

    consumer.events.subscribe(watch)
    with capture_events(consumer.events, DeadLetterFailed) as failed:
        task = asyncio.create_task(consumer.run(handler))
        while len(store) == 0 and clock.monotonic() < 600:
            await clock.sleep(1.0)
        await consumer.shutdown()
        await task
    assert [e.outcome for e in settled] == [Outcome.UNSETTLED] * 3 + [Outcome.DEAD_LETTERED]
    assert calls == 3  # 2 attempts, then 1 on the redelivery; the third is past the limit
    (env,) = store.envelopes
    error = env["error"]
    assert error["reason"] == "retries_exhausted"
    assert error["type"].endswith("PoisonError")
    assert error["message"] == "order 0 is malformed"
    assert "in handler" in error["traceback"]
    assert env["attempts"]["delivery_count"] == 4
    types = [h["type"] for h in env["attempts"]["history"]]
    assert types[0] == "PoisonError"
    assert "DeliveryLimitExceeded" in types
    assert env["write_failures"]["count"] == 3
    assert [f.write_failures for f in failed] == [1, 2, 3]
    assert backend.unacked() == []
    assert backend.size() == 0
