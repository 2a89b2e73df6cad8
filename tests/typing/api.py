"""Type-checked, never run: the public API as users write it (mypy --strict checks this file)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from abe.backends.message_queue import EventConsumer, MessageQueueBackend
from abe.backends.message_queue.base import InboundMessage, SettlingBackend
from abe.backends.message_queue.consumer import AsyncLoopConsumer
from abe.backends.message_queue.loader import load_backend
from abe.backends.message_queue.service.memory import MemoryBackend
from abe.types import ConsumerGroup, MessageQueueBackendProtocol, MessageQueueKey
from resilience.breaker import BreakerStats, CircuitBreaker, get_breaker
from resilience.classify import Classifier, Verdict
from resilience.clock import Clock, FakeClock, LoopClock
from resilience.consumer import ResilientConsumer
from resilience.dead_letter import DeadLetterRouter
from resilience.delivery import Delivery
from resilience.errors import ConfigError, DeadLetter, Drop, RetryAfter
from resilience.events import EventBus, MessageSettled, Outcome
from resilience.pipeline import CallNext, Pipeline
from resilience.policy import Policy, resilient
from resilience.retry import DecorrelatedJitter, Exponential, Fixed, FullJitter, Retry, RetryBudget
from resilience.testing import Outcomes, capture_events, run_until_settled, set_testing
from resilience.timeout import Timeout
from resilience.types import Handler


async def handler(payload: dict[str, Any]) -> None:
    if payload.get("retry_after"):
        raise RetryAfter(timedelta(seconds=2))
    if payload.get("bad"):
        raise DeadLetter("bad payload")
    if payload.get("dup"):
        raise Drop()


@resilient(retry={"attempts": 5}, timeout={"attempt": 2.0})
async def decorated(payload: dict[str, Any]) -> None:
    return None


async def middleware(delivery: Delivery, call_next: CallNext) -> None:
    key: str | None = delivery.key
    attempt: int = delivery.attempt
    assert key is not None or attempt >= 1
    await call_next(delivery)


async def usage() -> None:
    backend: MessageQueueBackend = load_backend()
    memory = MemoryBackend.isolated(keys=["orders"])
    protocol_view: MessageQueueBackendProtocol = memory
    key: MessageQueueKey = "orders"
    group: ConsumerGroup = None
    await protocol_view.publish(key, {"id": 1})
    settling: SettlingBackend = memory
    async for message in settling.deliveries(group=group):
        inbound: InboundMessage = message
        await settling.ack(inbound)
        break

    base: EventConsumer = AsyncLoopConsumer(backend, group="g")
    await base.shutdown()

    clock: Clock = FakeClock()
    loop_clock: Clock = LoopClock()
    assert loop_clock is not clock
    classifier = Classifier(terminal=(ValueError,), predicates=(lambda exc: Verdict.RETRYABLE,))
    pipeline = (
        Pipeline(middleware)
        .total_timeout(timedelta(minutes=1))
        .retry(attempts=3, wait=FullJitter(0.1, 5), classifier=classifier, clock=clock)
        .timeout(2.0)
        .use(Retry(wait=DecorrelatedJitter(0.1, 5), budget=RetryBudget(0.2, 5, 10)))
        .use(Timeout(1.5, total=False))
    )
    breaker = CircuitBreaker("payments", mode="fail_fast", failure_threshold=5)
    stats: BreakerStats = breaker.stats
    assert stats is not None
    shared = get_breaker("payments", failure_threshold=5)
    assert shared is not None
    pipeline.use(breaker)
    fast = Pipeline().retry(attempts=3).circuit_breaker("db", mode="pause").timeout(1.0)
    entry: CallNext = fast.compile(handler)
    assert entry is not None
    linked: CallNext = Pipeline().retry(attempts=2).build(handler, fuse=False)
    assert linked is not None
    called: CallNext = Pipeline().retry(attempts=2).compile(handler, inline=False)
    assert called is not None
    waits = (Fixed(1), Exponential(0.1, 10))
    assert waits
    tiered_backend = MemoryBackend.isolated(clock=FakeClock())
    tiered = Pipeline().retry(attempts=8, in_process=2, backend=tiered_backend)
    assert tiered is not None
    await tiered_backend.release_later(InboundMessage({}, "k"), 1.5)
    policy = Policy.from_dict({"retry": {"attempts": 4}})
    try:
        Policy.load("policy.toml", environ={})
    except ConfigError as exc:
        print(exc)
    consumer = ResilientConsumer(memory, "g", policy=policy, concurrency=4, events=EventBus())
    other: EventConsumer = ResilientConsumer(memory, policy=pipeline)
    await other.shutdown()
    set_testing(True)
    with capture_events(consumer.events, MessageSettled) as settled:
        outcomes: Outcomes = await run_until_settled(consumer, handler, 1)
    first: MessageSettled = settled[0]
    assert first.outcome is Outcome.SUCCESS or outcomes.counts[Outcome.FAILED] >= 0
    await decorated({"id": 1})


def everyday_names_from_the_package() -> None:
    """The everyday names are re-exported by ``resilience`` itself."""
    import resilience

    consumer_type: type[ResilientConsumer] = resilience.ResilientConsumer
    policy: Policy = resilience.Policy()
    pipeline: Pipeline = resilience.Pipeline(resilience.Retry(), resilience.Timeout(1.0))
    breaker: CircuitBreaker = resilience.CircuitBreaker("api")
    router: type[DeadLetterRouter] = resilience.DeadLetterRouter
    decorate = resilience.resilient
    assert consumer_type is ResilientConsumer
    assert router is DeadLetterRouter
    assert decorate is resilient
    assert policy is not None
    assert pipeline is not None
    assert breaker is not None


async def idempotency_api(handler: Handler) -> None:
    """The idempotency layer, its stores and the transaction accessor, as users write them."""
    from datetime import timedelta

    from resilience.idempotency import (
        ClaimState,
        Idempotency,
        IdempotencyStore,
        MemoryStore,
        PostgresStore,
        RedisEffects,
        RedisStore,
        SQLiteStore,
        current_transaction,
    )

    memory_store: IdempotencyStore = MemoryStore()
    sqlite_store: IdempotencyStore = SQLiteStore("idem.sqlite3")
    postgres_store: IdempotencyStore = PostgresStore("postgresql://localhost/test", table="t")
    layer = Idempotency(memory_store, header="idempotency-key", lease=30, ttl=timedelta(hours=1))
    pipeline = Pipeline().idempotent(sqlite_store, key=lambda d: d.message_id, wait=2.0)
    pipeline.use(layer)
    state: ClaimState = await postgres_store.claim("k", "owner", 10.0)
    assert state is not None
    effects = current_transaction()
    if isinstance(effects, RedisEffects):
        effects.call("INCR", "counter")
    redis_store: type[RedisStore] = RedisStore
    assert redis_store is not None
    assert pipeline.build(handler) is not None
