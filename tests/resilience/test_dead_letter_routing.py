"""Dead-letter routing through ResilientConsumer: every terminal reason, poison messages, sink
failure without loss, backend sinks, events and counters."""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from abe.backends.message_queue.base.extensions import InboundMessage
from abe.backends.message_queue.service.memory import MemoryBackend
from resilience.breaker import GATES_EXTRA, BreakerRegistry, CircuitBreaker
from resilience.clock import FakeClock
from resilience.consumer import ResilientConsumer
from resilience.dead_letter import (
    MASK,
    BackendSink,
    DeadLettered,
    DeadLetterFailed,
    DeadLetterRouter,
    InvalidPayload,
    MemoryStore,
)
from resilience.delivery import Delivery
from resilience.errors import ConfigError, DeadLetter, DeadLetterWriteError, Drop
from resilience.events import Outcome
from resilience.pipeline import Pipeline
from resilience.policy import Policy, resilient
from resilience.testing import capture_events, capture_logs, run_until_settled

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Handler:
    """Counts calls and raises ``exc`` (or succeeds when ``None``)."""

    def __init__(self, exc: BaseException | None = None, clock: FakeClock | None = None) -> None:
        self.exc = exc
        self.clock = clock
        self.calls = 0

    async def __call__(self, payload: dict[str, Any]) -> None:
        self.calls += 1
        if self.clock is not None:
            await self.clock.sleep(5.0)
        if self.exc is not None:
            raise self.exc


def router_of(consumer: ResilientConsumer) -> DeadLetterRouter:
    """The dead-letter layer the consumer built from its policy."""
    assert consumer.pipeline is not None
    (router,) = [x for x in consumer.pipeline.layers if isinstance(x, DeadLetterRouter)]
    return router


async def run_one(
    handler: Handler,
    policy: dict[str, Any],
    *,
    message: InboundMessage | None = None,
    clock: FakeClock | None = None,
    backend: MemoryBackend | None = None,
) -> tuple[ResilientConsumer, MemoryBackend, Outcome]:
    """Publish one message (or put ``message``), process it, return the consumer and outcome."""
    backend = backend or MemoryBackend.isolated()
    if message is None:
        await backend.publish_message("orders", {"order": 1}, headers={"traceparent": TRACEPARENT})
    else:
        backend.channel.put(message)
    policy = {"dead_letter": {"destination": "memory"}, **policy}
    clock = clock or FakeClock()
    consumer = ResilientConsumer(backend, policy=Policy.from_dict(policy), clock=clock)
    outcomes = await run_until_settled(consumer, handler, 1)
    (settled,) = outcomes.settled
    return consumer, backend, settled.outcome


def stored(consumer: ResilientConsumer) -> list[Mapping[str, Any]]:
    sink = router_of(consumer).sink
    assert isinstance(sink, MemoryStore)
    return sink.envelopes


async def test_retries_exhausted_envelope() -> None:
    """A retryable failure that outlives its attempts is dead-lettered with its history."""
    clock = FakeClock()
    handler = Handler(ConnectionError("upstream down"))
    consumer, backend, outcome = await run_one(
        handler, {"retry": {"attempts": 3, "initial": 0.5, "maximum": 5}}, clock=clock
    )
    assert outcome is Outcome.DEAD_LETTERED
    assert handler.calls == 3
    (env,) = stored(consumer)
    assert env["error"]["reason"] == "retries_exhausted"
    assert env["error"]["stage"] == "handle"
    assert env["error"]["type"] == "ConnectionError"
    assert env["attempts"]["in_process"] == 3
    assert env["attempts"]["delivery_count"] == 1
    (history,) = env["attempts"]["history"]
    assert history["type"] == "ConnectionError"
    assert history["count"] == 3
    assert history["last"] - history["first"] == pytest.approx(1.5)  # waits 0.5 + 1.0
    assert env["payload"] == {"order": 1}
    assert env["source"]["system"] == "memory"
    assert env["source"]["enqueued_at"] is not None
    assert env["origin"]["handler"].endswith("Handler")
    assert env["trace"]["original"]["traceparent"] == TRACEPARENT
    assert backend.size() == 0
    assert backend.unacked() == []


async def test_non_retryable_envelope() -> None:
    """A terminal exception is dead-lettered after one attempt with reason non_retryable."""
    handler = Handler(ValueError("missing customer"))
    consumer, _, outcome = await run_one(handler, {"classify": {"terminal": ["ValueError"]}})
    assert outcome is Outcome.DEAD_LETTERED
    assert handler.calls == 1
    (env,) = stored(consumer)
    assert env["error"]["reason"] == "non_retryable"
    assert env["error"]["message"] == "missing customer"
    assert env["attempts"]["in_process"] == 1


async def test_rejected_envelope() -> None:
    """A handler raising DeadLetter is dead-lettered at once with reason rejected."""
    handler = Handler(DeadLetter("order cancelled upstream"))
    consumer, _, outcome = await run_one(handler, {})
    assert outcome is Outcome.DEAD_LETTERED
    assert handler.calls == 1
    (env,) = stored(consumer)
    assert env["error"]["reason"] == "rejected"
    assert env["error"]["type"] == "resilience.errors.DeadLetter"
    assert env["error"]["message"] == "order cancelled upstream"


async def test_timeout_envelope() -> None:
    """A message over its total timeout is dead-lettered with reason timeout."""
    clock = FakeClock()
    handler = Handler(clock=clock)
    consumer, _, outcome = await run_one(
        handler, {"timeout": {"attempt": 0, "total": 1.0}}, clock=clock
    )
    assert outcome is Outcome.DEAD_LETTERED
    (env,) = stored(consumer)
    assert env["error"]["reason"] == "timeout"
    assert env["error"]["type"] == "resilience.errors.TotalTimeout"


async def test_delivery_limit_envelope() -> None:
    """A message delivered more often than the attempt limit is dead-lettered unhandled."""
    handler = Handler()
    message = InboundMessage(payload={"order": 2}, key="orders", message_id="m1", delivery_count=4)
    consumer, _, outcome = await run_one(handler, {"retry": {"attempts": 3}}, message=message)
    assert outcome is Outcome.DEAD_LETTERED
    assert handler.calls == 0
    (env,) = stored(consumer)
    assert env["error"]["reason"] == "delivery_limit"
    assert env["attempts"] == {
        "in_process": 0,
        "delivery_count": 4,
        "total": 3,
        "history": [env["attempts"]["history"][0]],
        "earlier": [],
    }
    assert env["attempts"]["history"][0]["type"] == "DeliveryLimitExceeded"


async def test_budget_exhausted_envelope() -> None:
    """A retry denied by a spent retry budget is dead-lettered with reason budget_exhausted."""
    handler = Handler(ConnectionError("down"))
    policy = {"retry": {"attempts": 5, "budget": {"ratio": 0, "min_per_second": 0}}}
    consumer, _, outcome = await run_one(handler, policy)
    assert outcome is Outcome.DEAD_LETTERED
    assert handler.calls == 1
    (env,) = stored(consumer)
    assert env["error"]["reason"] == "budget_exhausted"


async def test_undecodable_message_goes_straight_to_dead_letter() -> None:
    """A poison message is dead-lettered with stage decode, no retries, handler never called."""
    handler = Handler()
    message = InboundMessage(
        payload={},
        key="orders",
        message_id="p1",
        raw='{"order": ',
        decode_error=ValueError("Expecting value: line 1 column 11"),
    )
    consumer, backend, outcome = await run_one(handler, {"retry": {"attempts": 5}}, message=message)
    assert outcome is Outcome.DEAD_LETTERED
    assert handler.calls == 0
    (env,) = stored(consumer)
    assert env["error"]["reason"] == "decode_error"
    assert env["error"]["stage"] == "decode"
    assert env["raw"] == {"encoding": "utf-8", "data": '{"order": '}
    assert env["payload"] is None
    assert [h["type"] for h in env["attempts"]["history"]] == ["ValueError"]
    assert env["attempts"]["in_process"] == 0
    assert router_of(consumer).stats.poison == 1
    assert backend.unacked() == []


async def test_consumer_keeps_going_after_poison() -> None:
    """After a poison message the consumer processes the next message normally."""
    backend = MemoryBackend.isolated()
    backend.channel.put(
        InboundMessage(payload={}, key="orders", message_id="p", decode_error=ValueError("x"))
    )
    await backend.publish("orders", {"order": 1})
    handler = Handler()
    policy = Policy.from_dict({"dead_letter": {"destination": "memory"}})
    consumer = ResilientConsumer(backend, policy=policy, clock=FakeClock())
    outcomes = await run_until_settled(consumer, handler, 2)
    assert [e.outcome for e in outcomes.settled] == [Outcome.DEAD_LETTERED, Outcome.SUCCESS]
    assert handler.calls == 1


async def test_validation_hook_from_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A payload failing the validate hook is dead-lettered with stage decode, unhandled."""
    module = f"dlq_hooks_{uuid.uuid4().hex}"
    (tmp_path / f"{module}.py").write_text(
        "def check(payload):\n"
        "    if 'customer' not in payload:\n"
        "        raise KeyError('customer is required')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        handler = Handler()
        policy = {"dead_letter": {"destination": "memory", "validate": f"{module}:check"}}
        consumer, _, outcome = await run_one(handler, policy)
    finally:
        sys.modules.pop(module, None)
    assert outcome is Outcome.DEAD_LETTERED
    assert handler.calls == 0
    (env,) = stored(consumer)
    assert env["error"]["reason"] == "decode_error"
    assert env["error"]["stage"] == "decode"
    assert env["error"]["type"] == "KeyError"
    assert env["payload"] == {"order": 1}


async def test_validation_hook_returning_false_and_async_hooks() -> None:
    """A hook returning False rejects the payload; async hooks are awaited; valid ones pass."""
    store = MemoryStore()
    calls: list[dict[str, Any]] = []

    async def is_valid(payload: dict[str, Any]) -> bool:
        return int(payload.get("order", 0)) > 0

    async def handler(payload: dict[str, Any]) -> None:
        calls.append(payload)

    call = Pipeline(DeadLetterRouter(store, validate=is_valid)).build(handler)
    bad, good = Delivery({"order": -1}), Delivery({"order": 3})
    await call(bad)
    await call(good)
    assert calls == [{"order": 3}]
    assert bad.outcome is Outcome.DEAD_LETTERED
    assert good.outcome is None
    (env,) = store.envelopes
    assert env["error"]["type"] == "resilience.dead_letter.middleware.InvalidPayload"
    assert InvalidPayload.__name__ in env["error"]["traceback"]


async def test_dropped_and_successful_messages_are_not_dead_lettered() -> None:
    """Drop (an ignored failure) is re-raised for the consumer to drop; success stores nothing."""
    consumer, _, outcome = await run_one(Handler(Drop("duplicate")), {})
    assert outcome is Outcome.DROPPED
    assert stored(consumer) == []
    consumer, _, outcome = await run_one(Handler(), {})
    assert outcome is Outcome.SUCCESS
    assert stored(consumer) == []


async def test_cancellation_is_never_dead_lettered() -> None:
    """CancelledError passes through the router untouched and nothing is written."""
    store = MemoryStore()
    router = DeadLetterRouter(store)

    async def call_next(delivery: Delivery) -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await router(Delivery({"n": 1}), call_next)
    assert store.write_attempts == 0


async def test_cancellation_turned_into_an_error_is_not_dead_lettered() -> None:
    """A handler that turns a shutdown's cancellation into an error is released, not stored."""
    store = MemoryStore()
    router = DeadLetterRouter(store)
    started = asyncio.Event()

    async def call_next(delivery: Delivery) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RuntimeError("interrupted while talking to the database") from None

    task = asyncio.create_task(router(Delivery({"n": 1}), call_next))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.write_attempts == 0


async def test_sink_failure_loses_nothing_and_recovers() -> None:
    """A failed last write leaves the message unacked; it comes back and is dead-lettered once."""
    clock = FakeClock()
    backend = MemoryBackend.isolated()
    await backend.publish("orders", {"order": 1})
    store = MemoryStore()
    store.failure = OSError("disk full")
    router = DeadLetterRouter(store, clock=clock, write_attempts=1)
    consumer = ResilientConsumer(
        backend, policy=Pipeline(router).retry(attempts=3, clock=clock), clock=clock
    )

    def recover(event: object) -> None:
        if isinstance(event, DeadLetterFailed):
            store.failure = None

    consumer.events.subscribe(recover)
    handler = Handler(ConnectionError("down"))
    with (
        capture_events(consumer.events, DeadLetterFailed) as failures,
        capture_events(consumer.events, DeadLettered) as written,
        capture_logs() as logs,
    ):
        outcomes = await run_until_settled(consumer, handler, 2)
    assert [e.outcome for e in outcomes.settled] == [Outcome.UNSETTLED, Outcome.DEAD_LETTERED]
    assert store.write_attempts == 2
    (env,) = store.envelopes
    assert env["attempts"]["delivery_count"] == 2  # the redelivery was dead-lettered
    assert handler.calls == 5  # 3 attempts, then 2 more: the redelivery counts as attempt 2
    assert backend.size() == 0
    assert backend.unacked() == []
    assert router.stats.write_failures == 1
    assert router.stats.dead_lettered == 1
    (failure,) = failures
    assert failure.error_type == "OSError"
    assert failure.destination == "memory"
    assert failure.consecutive_failures == 1
    assert written[0].envelope_id == env["id"]
    assert any(0.05 <= wait <= 0.1 for wait in clock.sleeps)  # the write backoff ran on the clock
    assert env["write_failures"]["count"] == 1
    assert env["error"]["type"] == "ConnectionError"
    events = [entry["event"] for entry in logs if entry["logger"] == "resilience.dead_letter"]
    assert "dead_letter_write_failed" in events
    assert events[-1] == "dead_lettered"


async def test_sink_failure_raises_dead_letter_write_error() -> None:
    """The router retries a failed write on a growing backoff capped at write_failure_backoff,
    then turns the sink error into DeadLetterWriteError chained to it."""
    clock = FakeClock()
    store = MemoryStore()
    store.failure = ConnectionRefusedError("db down")
    router = DeadLetterRouter(store, clock=clock, write_failure_backoff=0.3, write_attempts=4)

    async def call_next(delivery: Delivery) -> None:
        raise DeadLetter("no")

    delivery = Delivery({"n": 1})
    with pytest.raises(DeadLetterWriteError) as info:
        await router(delivery, call_next)
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert delivery.outcome is None
    assert store.write_attempts == 4
    low = [0.05, 0.1, 0.15]  # each wait is between these and twice these, at most 0.3
    assert len(clock.sleeps) == 3
    assert all(a <= w <= min(2 * a, 0.3) for a, w in zip(low, clock.sleeps, strict=True))
    assert router.stats.write_failures == 4


async def test_dead_lettered_event_and_log_are_redacted() -> None:
    """The DeadLettered event names the envelope; the log line masks redacted values."""
    store = MemoryStore()
    router = DeadLetterRouter(store)

    async def call_next(delivery: Delivery) -> None:
        raise DeadLetter("bad password s3cr3t-pw")

    from resilience.events import EventBus

    bus = EventBus()
    delivery = Delivery({"password": "s3cr3t-pw"}, key="users", message_id="5", events=bus)
    with capture_events(bus, DeadLettered) as events, capture_logs() as logs:
        await router(delivery, call_next)
    (event,) = events
    assert event.reason == "rejected"
    assert event.stage == "handle"
    assert event.message_id == "5"
    assert event.envelope_id == store.envelopes[0]["id"]
    (log,) = [x for x in logs if x["event"] == "dead_lettered"]
    assert "s3cr3t-pw" not in repr(log)
    assert log["error"] == "bad password [REDACTED]"


async def test_processing_trace_context_is_recorded() -> None:
    """The span active while dead-lettering is recorded as the processing trace context."""
    tracer = TracerProvider().get_tracer("test")
    store = MemoryStore()
    router = DeadLetterRouter(store)

    async def call_next(delivery: Delivery) -> None:
        raise DeadLetter()

    with tracer.start_as_current_span("process") as span:
        await router(Delivery({}, headers={"traceparent": TRACEPARENT}), call_next)
        context = span.get_span_context()
    trace = store.envelopes[0]["trace"]
    assert trace["processing"]["trace_id"] == format(context.trace_id, "032x")
    assert trace["processing"]["span_id"] == format(context.span_id, "016x")
    assert trace["processing"]["traceparent"].startswith(f"00-{context.trace_id:032x}-")
    assert trace["original"]["traceparent"] == TRACEPARENT


# -- backend sinks ---------------------------------------------------------------------------------


async def test_backend_destination_writes_atomically_to_the_dlq_key() -> None:
    """With a DeadLetteringBackend the envelope lands on <key>.dlq and the consumer skips it."""
    backend = MemoryBackend.isolated(keys=["orders"])
    handler = Handler(ValueError("bad"))
    policy = {
        "dead_letter": {"destination": "backend"},
        "classify": {"terminal": ["ValueError"]},
    }
    consumer, _, outcome = await run_one(handler, policy, backend=backend)
    assert outcome is Outcome.DEAD_LETTERED
    (record,) = backend.peek("orders.dlq")
    assert record.payload["schema"] == "dlq.v1"
    assert record.payload["error"]["reason"] == "non_retryable"
    assert backend.size("orders") == 0
    assert backend.unacked() == []
    assert router_of(consumer).sink.name == "backend:<key>.dlq"


class PlainBackend:
    """Only the published protocol: publish and consume."""

    def __init__(self) -> None:
        self.published: list[tuple[str, dict[str, Any]]] = []

    async def publish(self, key: str, payload: dict[str, Any]) -> None:
        self.published.append((key, payload))

    async def consume(self, *, group: str | None = None) -> AsyncIterator[dict[str, Any]]:
        await asyncio.Event().wait()
        yield {}


class HeaderBackend(PlainBackend):
    """Publishes with headers, cannot dead-letter atomically."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[Mapping[str, str] | None] = []

    async def publish_message(
        self, key: str, payload: dict[str, Any], *, headers: Mapping[str, str] | None = None
    ) -> str | None:
        self.published.append((key, payload))
        self.headers.append(headers)
        return None


async def test_backend_sink_falls_back_to_publish() -> None:
    """Without the extensions the sink publishes the envelope to the dead-letter key."""
    backend = PlainBackend()
    sink = BackendSink(backend)  # type: ignore[arg-type]
    envelope = {"schema": "dlq.v1", "id": "abc"}
    await sink.write(envelope, Delivery({}, key="orders"))
    await sink.write(envelope, None)
    assert backend.published == [("orders.dlq", envelope), ("dead-letters", envelope)]


async def test_backend_sink_publishes_with_headers_and_fixed_key() -> None:
    """A header-publishing backend gets the schema and envelope id as headers; key overrides."""
    backend = HeaderBackend()
    sink = BackendSink(backend, key="all.dlq")  # type: ignore[arg-type]
    await sink.write({"schema": "dlq.v1", "id": "abc"}, Delivery({}, key="orders"))
    assert backend.published[0][0] == "all.dlq"
    assert backend.headers == [{"x-dead-letter-schema": "dlq.v1", "x-dead-letter-id": "abc"}]


async def test_backend_destination_refuses_a_memory_backend_reading_every_key() -> None:
    """A MemoryBackend that reads every key would consume its own dead letters: ConfigError."""
    policy = Policy.from_dict({"dead_letter": {"destination": "backend"}})
    with pytest.raises(ConfigError, match="reads every key"):
        policy.pipeline(backend=MemoryBackend.isolated())


def test_backend_destination_needs_a_backend() -> None:
    """@resilient has no backend, so the backend destination is a ConfigError at decoration."""
    with pytest.raises(ConfigError, match="needs the consumer's backend"):

        @resilient(dead_letter={"destination": "backend"})
        async def handler(payload: dict[str, Any]) -> None:
            pass


async def test_resilient_decorator_dead_letters_to_memory() -> None:
    """A @resilient function with a dead_letter section dead-letters instead of raising."""

    @resilient(dead_letter={"destination": "memory"}, retry={"attempts": 1})
    async def handler(payload: dict[str, Any]) -> None:
        raise ConnectionError("down")

    await handler({"n": 1})  # no exception: the failure went to the dead-letter store


async def advance(clock: FakeClock, seconds: int) -> None:
    """Move virtual time one second at a time, letting the loop run in between."""
    for _ in range(seconds):
        clock.advance(1.0)
        for _ in range(5):
            await asyncio.sleep(0)


async def test_router_holds_failures_while_a_pausing_breaker_is_forced_open() -> None:
    """A message past its total timeout because its breaker is forced open is held, then
    processed afresh once the breaker is reset; nothing is dead-lettered."""
    clock = FakeClock()
    store = MemoryStore()
    router = DeadLetterRouter(store, clock=clock)
    breaker = CircuitBreaker("router-hold", clock=clock, registry=BreakerRegistry())
    pipeline = Pipeline(router).total_timeout(30, clock=clock).retry(attempts=2, clock=clock)
    calls: list[int] = []

    async def handler(payload: dict[str, Any]) -> None:
        calls.append(payload["n"])

    call = pipeline.use(breaker).build(handler)
    breaker.force_open()
    delivery = Delivery({"n": 1}, delivery_count=1)
    task = asyncio.ensure_future(call(delivery))
    await advance(clock, 31)  # held by the breaker past the 30 s total timeout
    assert not task.done()
    assert router.stats.held == 1
    assert store.write_attempts == 0
    breaker.reset()
    await advance(clock, 1)
    await task
    assert calls == [1]
    assert delivery.attempt == 1  # a fresh start: attempts and deadline start over
    assert store.write_attempts == 0
    assert delivery.outcome is None


async def test_router_dead_letters_after_a_total_timeout_when_the_breaker_opened_itself() -> None:
    """A breaker that opened by itself may be held open by this very message (poison): the
    total timeout bounds the hold and the message is dead-lettered with reason timeout."""
    clock = FakeClock()
    store = MemoryStore()
    router = DeadLetterRouter(store, clock=clock)
    breaker = CircuitBreaker(
        "router-self", failure_threshold=1, open_wait=100, clock=clock, registry=BreakerRegistry()
    )
    pipeline = Pipeline(router).total_timeout(30, clock=clock).use(breaker)

    async def handler(payload: dict[str, Any]) -> None:
        raise ConnectionError("down")

    delivery = Delivery({"n": 1})
    task = asyncio.ensure_future(pipeline.build(handler)(delivery))
    await advance(clock, 31)
    await task
    assert delivery.outcome is Outcome.DEAD_LETTERED
    assert [e["error"]["reason"] for e in store.envelopes] == ["timeout"]
    assert router.stats.held == 0


class Gate:
    """A stand-in pausing breaker as the router sees it."""

    name = "stand-in"

    def __init__(self) -> None:
        self.resumed = asyncio.Event()

    def holds(self, delivery: Delivery) -> bool:
        return True

    async def wait_resumed(self) -> None:
        await self.resumed.wait()


def gated(reason: str | None, exc: Exception, gate: Gate) -> Any:
    """A rest-of-pipeline that lists ``gate`` on the delivery and fails with ``exc``."""

    async def inner(delivery: Delivery) -> None:
        delivery.extras = {GATES_EXTRA: [gate]}
        delivery.reason = reason
        raise exc

    return inner


async def test_router_dead_letters_a_message_fault_even_during_an_outage() -> None:
    """A terminal failure (the message's own fault) is dead-lettered even while held back."""
    store = MemoryStore()
    router = DeadLetterRouter(store, clock=FakeClock())
    delivery = Delivery({"n": 1})
    await router(delivery, gated(None, DeadLetter("bad order"), Gate()))
    assert delivery.outcome is Outcome.DEAD_LETTERED
    assert [e["error"]["reason"] for e in store.envelopes] == ["rejected"]
    assert router.stats.held == 0


async def test_shutdown_while_held_by_the_router_releases_the_message() -> None:
    """Cancelling a message the router holds propagates CancelledError and writes nothing."""
    store = MemoryStore()
    router = DeadLetterRouter(store, clock=FakeClock())
    task = asyncio.ensure_future(
        router(Delivery({"n": 1}), gated("timeout", ConnectionError("down"), Gate()))
    )
    for _ in range(5):
        await asyncio.sleep(0)
    assert router.stats.held == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.write_attempts == 0


async def test_sink_failure_logs_keep_redacted_values_masked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """When the write fails, no log line (tracebacks included) shows a redacted value."""
    clock = FakeClock()
    backend = MemoryBackend.isolated()
    await backend.publish("orders", {"user": {"password": "hunter2-secret"}})
    store = MemoryStore()
    store.failure = OSError("disk full")
    router = DeadLetterRouter(store, clock=clock, write_failure_backoff=0, write_attempts=1)
    consumer = ResilientConsumer(backend, policy=Pipeline(router), clock=clock)
    consumer.events.subscribe(
        lambda e: setattr(store, "failure", None) if isinstance(e, DeadLetterFailed) else None
    )

    async def handler(payload: dict[str, Any]) -> None:
        raise DeadLetter(f"login failed for {payload}")

    with capture_logs() as logs, caplog.at_level("ERROR"):
        outcomes = await run_until_settled(consumer, handler, 2)
    assert [e.outcome for e in outcomes.settled] == [Outcome.UNSETTLED, Outcome.DEAD_LETTERED]
    formatter = logging.Formatter()
    texts = [formatter.format(record) for record in caplog.records]
    assert any("left unacknowledged" in text for text in texts)
    assert not any("hunter2-secret" in text for text in texts)
    (failed,) = [x for x in logs if x["event"] == "dead_letter_write_failed"]
    assert failed["failure_type"] == "resilience.errors.DeadLetter"
    assert "hunter2-secret" not in repr(logs)
    assert MASK in failed["failure"]
