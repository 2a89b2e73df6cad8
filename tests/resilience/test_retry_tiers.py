"""Tiered retry: in-process attempts, then hand-over to a delaying backend, on virtual time."""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import pytest

from abe.backends.message_queue.base.extensions import DelayingBackend, InboundMessage
from abe.backends.message_queue.service.memory import MemoryBackend
from resilience._handover import (
    ATTEMPT_HEADER,
    ELAPSED_HEADER,
    ERROR_HEADER,
    FIRST_FAILURE_HEADER,
    HISTORY_HEADER,
)
from resilience.bench._vloop import run_virtual
from resilience.classify import Classifier
from resilience.clock import FakeClock
from resilience.consumer import ResilientConsumer
from resilience.dead_letter import DeadLetterRouter, MemoryStore
from resilience.delivery import Delivery
from resilience.errors import ConfigError, RetryAfter
from resilience.events import MessageSettled, Outcome
from resilience.pipeline import Pipeline
from resilience.policy import Policy
from resilience.retry import Exponential, Fixed, Retry, RetryBudget
from resilience.testing import capture_events, capture_logs

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Flaky:
    """Fails the first ``failures`` calls for each message id with ``exc``, then succeeds."""

    def __init__(self, failures: int, exc: Exception | None = None) -> None:
        self.failures = failures
        self.exc = exc or ConnectionError("upstream down")
        self.calls: dict[Any, int] = {}
        self.done: list[Any] = []

    async def __call__(self, payload: dict[str, Any]) -> None:
        n = payload.get("n")
        self.calls[n] = self.calls.get(n, 0) + 1
        if self.calls[n] <= self.failures:
            raise self.exc
        self.done.append(n)


async def spin(predicate: Any, limit: float = 100.0) -> None:
    """Poll every 10 ms of loop time until ``predicate()`` holds (at most ``limit`` seconds)."""
    for _ in range(int(limit * 100)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


# -- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize("in_process", [0, -1, 4, True, 1.5])
def test_in_process_out_of_range_is_a_config_error(in_process: Any) -> None:
    """in_process must be an integer from 1 to attempts; anything else is refused loudly."""
    with pytest.raises(ConfigError, match="in_process"):
        Retry(attempts=3, in_process=in_process)


@pytest.mark.parametrize("in_process", [0, 9, "2"])
def test_policy_in_process_is_validated(in_process: Any) -> None:
    """[retry] in_process outside 1..attempts names the key in the error."""
    with pytest.raises(ConfigError, match=r"retry\.in_process"):
        Policy.from_dict({"retry": {"attempts": 8, "in_process": in_process}})


def test_policy_in_process_round_trips() -> None:
    """[retry] in_process is parsed, kept in to_dict and reaches the Retry layer."""
    policy = Policy.from_dict({"retry": {"attempts": 8, "in_process": 2}})
    assert policy.to_dict()["retry"]["in_process"] == 2
    backend = MemoryBackend.isolated()
    (retry,) = [x for x in policy.layers(backend=backend) if isinstance(x, Retry)]
    assert retry.in_process == 2
    assert retry.backend is backend
    assert "in_process" not in Policy().to_dict()["retry"]


def test_memory_backend_is_a_delaying_backend() -> None:
    """The memory backend implements the DelayingBackend extension."""
    assert isinstance(MemoryBackend.isolated(), DelayingBackend)


async def test_backend_without_the_extension_falls_back_with_one_warning() -> None:
    """A backend that cannot delay redelivery keeps waits in process and warns once at build."""
    clock = FakeClock()
    with capture_logs() as logs:
        layer = Retry(attempts=4, in_process=1, wait=Fixed(0.5), backend=object(), clock=clock)
    warnings = [x for x in logs if x["event"] == "retry_broker_tier_unavailable"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    handler = Flaky(3)
    call = Pipeline(layer).build(handler)
    await call(Delivery({"n": 1}, started_at=clock.monotonic()))
    assert clock.sleeps == [0.5, 0.5, 0.5]
    assert handler.calls[1] == 4


# -- the hand-over on the memory backend, virtual time ---------------------------------------------


def test_tiers_hand_over_after_in_process_attempts_and_free_the_slot() -> None:
    """Two attempts in process, then each retry waits in the backend: nothing is held meanwhile."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        backend = MemoryBackend.isolated()
        await backend.publish_message("orders", {"n": 1}, headers={"traceparent": TRACEPARENT})
        handler = Flaky(4)
        policy = Policy.from_dict(
            {"retry": {"attempts": 6, "in_process": 2, "initial": 1, "maximum": 100}}
        )
        consumer = ResilientConsumer(backend, policy=policy)
        with capture_events(consumer.events, MessageSettled) as settled:
            task = asyncio.create_task(consumer.run(handler))
            start = loop.time()
            await spin(lambda: len(settled) == 1)
            # attempts 1 and 2 in process (one 1 s wait), then handed over with the 2 s wait
            assert settled[0].outcome is Outcome.DEFERRED
            assert loop.time() - start == pytest.approx(1.0, abs=0.02)
            assert handler.calls[1] == 2
            assert consumer.in_flight == 0
            assert backend.unacked() == []
            (waiting,) = backend.delayed()
            assert waiting.headers[ATTEMPT_HEADER] == "2"
            assert waiting.headers["traceparent"] == TRACEPARENT
            assert waiting.delivery_count == 2
            while len(settled) < 4:
                await asyncio.sleep(0.25)
            consumer_outcomes = [e.outcome for e in settled]
            await consumer.shutdown()
            await task
        assert consumer_outcomes == [Outcome.DEFERRED] * 3 + [Outcome.RETRIED]
        assert handler.calls[1] == 5
        assert handler.done == [1]
        # waits 1 (in process), then 2, 4, 8 in the broker
        assert loop.time() - start == pytest.approx(15.0, abs=0.3)
        assert backend.size() == 0
        assert backend.delayed() == []
        assert backend.unacked() == []

    run_virtual(scenario())


def test_exhausted_across_tiers_dead_letters_with_every_attempt() -> None:
    """The envelope counts attempts of both tiers and names the process of each earlier one."""

    async def scenario() -> tuple[Mapping[str, Any], InboundMessage | None]:
        backend = MemoryBackend.isolated(keys=["orders"])
        await backend.publish_message(
            "orders", {"n": 1, "password": "hunter2"}, headers={"traceparent": TRACEPARENT}
        )
        handler = Flaky(99, ConnectionError("login hunter2 refused"))
        seen: list[InboundMessage] = []
        original = backend.release_later

        async def spy(message: InboundMessage, delay: float) -> None:
            seen.append(message)
            await original(message, delay)

        backend.release_later = spy  # type: ignore[method-assign]
        policy = Policy.from_dict(
            {
                "retry": {"attempts": 4, "in_process": 2, "initial": 1},
                "dead_letter": {"destination": "memory"},
            }
        )
        consumer = ResilientConsumer(backend, policy=policy)
        with capture_events(consumer.events, MessageSettled) as settled:
            task = asyncio.create_task(consumer.run(handler))
            while not settled or settled[-1].outcome is Outcome.DEFERRED:
                await asyncio.sleep(0.5)
            await consumer.shutdown()
            await task
        assert [e.outcome for e in settled] == [Outcome.DEFERRED] * 2 + [Outcome.DEAD_LETTERED]
        assert handler.calls[1] == 4
        assert consumer.pipeline is not None
        (router,) = [x for x in consumer.pipeline.layers if isinstance(x, DeadLetterRouter)]
        store = router.sink
        assert isinstance(store, MemoryStore)
        (envelope,) = store.envelopes
        return envelope, seen[-1] if seen else None

    envelope, handed = run_virtual(scenario())
    attempts = envelope["attempts"]
    assert envelope["error"]["reason"] == "retries_exhausted"
    assert attempts["total"] == 4
    assert attempts["in_process"] == 1
    earlier = attempts["earlier"]
    assert [r["attempt"] for r in earlier] == [1, 2, 3]
    assert [r["tier"] for r in earlier] == ["in_process", "in_process", "broker"]
    assert {(r["host"], r["pid"]) for r in earlier} == {(envelope["origin"]["host"], os.getpid())}
    assert all(r["type"] == "ConnectionError" for r in earlier)
    assert handed is not None
    error = handed.headers[ERROR_HEADER]
    assert error.startswith("ConnectionError: ")
    assert "hunter2" not in error
    assert float(handed.headers[FIRST_FAILURE_HEADER]) == pytest.approx(earlier[0]["at"])
    assert envelope["trace"]["original"]["traceparent"] == TRACEPARENT


def test_retry_after_cap_sets_the_broker_delay() -> None:
    """A RetryAfter hint longer than max_retry_after waits max_retry_after in the broker."""

    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        backend = MemoryBackend.isolated()
        await backend.publish("orders", {"n": 1})
        handler = Flaky(1, RetryAfter(600))
        policy = Policy.from_dict(
            {"retry": {"attempts": 3, "in_process": 1, "max_retry_after": 30}}
        )
        consumer = ResilientConsumer(backend, policy=policy)
        times: list[float] = []
        with capture_events(consumer.events, MessageSettled) as settled:
            task = asyncio.create_task(consumer.run(handler))
            while len(settled) < 2:
                await asyncio.sleep(1)
                times.append(loop.time())
            await consumer.shutdown()
            await task
        assert [e.outcome for e in settled] == [Outcome.DEFERRED, Outcome.RETRIED]
        return times

    times = run_virtual(scenario())
    assert times[-1] == pytest.approx(30.0, abs=1.0)


async def test_attempt_number_continues_from_the_headers() -> None:
    """A redelivery whose broker count is lower than the carried attempts goes on from them."""
    clock = FakeClock()
    handler = Flaky(99)
    call = Pipeline(Retry(attempts=6, wait=Fixed(1), clock=clock)).build(handler)
    d = Delivery(
        {"n": 1}, started_at=0.0, key="orders", delivery_count=2, headers={ATTEMPT_HEADER: "4"}
    )
    with pytest.raises(ConnectionError):
        await call(d)
    assert handler.calls[1] == 2  # attempts 5 and 6
    assert d.attempt == 6
    assert d.reason == "retries_exhausted"


async def test_max_elapsed_counts_time_spent_in_earlier_deliveries() -> None:
    """Elapsed time carried in the headers counts towards max_elapsed."""
    clock = FakeClock()
    handler = Flaky(99)
    call = Pipeline(Retry(attempts=10, wait=Fixed(5), max_elapsed=60, clock=clock)).build(handler)
    d = Delivery({"n": 1}, started_at=0.0, key="orders", headers={ELAPSED_HEADER: "50"})
    with pytest.raises(ConnectionError):
        await call(d)
    assert clock.sleeps == [5.0, 5.0]  # 50 + 10 reaches 60; one more wait would pass it
    assert d.reason == "retries_exhausted"


class Refusing(MemoryBackend):
    """A delaying backend whose broker refuses every hand-over."""

    async def release_later(self, message: InboundMessage, delay: float) -> None:
        raise ConnectionError("broker unavailable")


async def test_refused_hand_over_waits_in_process_instead() -> None:
    """When the backend cannot take the message, the retry waits in process and nothing is lost."""
    clock = FakeClock()
    backend = Refusing.isolated()
    handler = Flaky(2)
    layer = Retry(attempts=5, in_process=1, wait=Fixed(2), backend=backend, clock=clock)
    message = InboundMessage({"n": 1}, "orders", "1", headers={"traceparent": TRACEPARENT})
    d = Delivery.from_message(message, started_at=0.0)
    with capture_logs() as logs:
        await Pipeline(layer).build(handler)(d)
    assert clock.sleeps == [2.0, 2.0]
    assert d.outcome is None
    assert handler.done == [1]
    assert message.headers == {"traceparent": TRACEPARENT}  # not left half-updated
    assert sum(x["event"] == "retry_handover_failed" for x in logs) == 2


async def test_spent_budget_dead_letters_instead_of_handing_over() -> None:
    """The retry budget is spent the same way: a denied retry is not handed to the broker."""
    clock = FakeClock()
    backend = MemoryBackend.isolated()
    budget = RetryBudget(ratio=0, min_per_second=0, clock=clock)
    layer = Retry(attempts=5, in_process=1, budget=budget, backend=backend, clock=clock)
    message = InboundMessage({"n": 1}, "orders", "1")
    d = Delivery.from_message(message, started_at=0.0)
    with pytest.raises(ConnectionError):
        await Pipeline(layer).build(Flaky(9))(d)
    assert d.reason == "budget_exhausted"
    assert backend.delayed() == []


async def test_non_retryable_failure_is_not_handed_over() -> None:
    """The shared classifier decides: a terminal failure never goes to the broker tier."""
    clock = FakeClock()
    backend = MemoryBackend.isolated()
    classifier = Classifier(terminal=(ValueError,))
    layer = Retry(attempts=5, in_process=1, backend=backend, clock=clock, classifier=classifier)
    d = Delivery.from_message(InboundMessage({"n": 1}, "orders", "1"), started_at=0.0)
    with pytest.raises(ValueError, match="bad"):
        await Pipeline(layer).build(Flaky(9, ValueError("bad")))(d)
    assert backend.delayed() == []
    assert d.reason == "non_retryable"


# -- the memory backend's release_later -----------------------------------------------------------


@pytest.mark.parametrize("delay", [-1.0, math.nan, math.inf])
async def test_memory_release_later_refuses_bad_delays(delay: float) -> None:
    """A negative or non-finite delay is a ValueError and leaves the delivery unsettled."""
    backend = MemoryBackend.isolated()
    await backend.publish("orders", {"n": 1})
    message = await anext(backend.deliveries())
    with pytest.raises(ValueError, match="delay"):
        await backend.release_later(message, delay)
    assert backend.unacked() == [message]


async def test_memory_release_later_on_the_injected_clock() -> None:
    """The message comes back once the injected clock has moved by the delay, counted again."""
    clock = FakeClock()
    backend = MemoryBackend.isolated(clock=clock)
    await backend.publish_message("orders", {"n": 1}, headers={"a": "b"})
    message = await anext(backend.deliveries())
    message.headers = {**message.headers, ATTEMPT_HEADER: "1"}
    await backend.release_later(message, 10)
    await backend.release_later(message, 10)  # already settled: no second copy
    assert backend.unacked() == []
    assert backend.size() == 0
    assert len(backend.delayed()) == 1
    clock.advance(9.9)
    assert backend.size() == 0
    clock.advance(0.1)
    (back,) = backend.peek("orders")
    assert back.delivery_count == 2
    assert back.headers == {"a": "b", ATTEMPT_HEADER: "1"}
    assert backend.delayed() == []


def test_history_header_is_json_with_one_record_per_attempt() -> None:
    """The history header is compact JSON that the next process can read back."""

    async def scenario() -> dict[str, str]:
        backend = MemoryBackend.isolated()
        await backend.publish("orders", {"n": 1})
        policy = Policy.from_dict({"retry": {"attempts": 5, "in_process": 3, "initial": 1}})
        consumer = ResilientConsumer(backend, policy=policy)
        with capture_events(consumer.events, MessageSettled) as settled:
            task = asyncio.create_task(consumer.run(Flaky(99)))
            await spin(lambda: bool(settled))
            await consumer.shutdown()
            await task
        (waiting,) = backend.delayed()
        return dict(waiting.headers)

    headers = run_virtual(scenario())
    history = json.loads(headers[HISTORY_HEADER])
    assert [r["attempt"] for r in history] == [1, 2, 3]
    assert float(headers[ELAPSED_HEADER]) == pytest.approx(1 + 2 + 4)


def test_concurrent_healthy_messages_are_not_held_up() -> None:
    """While failing messages wait in the broker, healthy ones flow at their normal pace."""

    async def scenario() -> tuple[list[float], int]:
        loop = asyncio.get_running_loop()
        backend = MemoryBackend.isolated()
        failing = Flaky(3)
        latencies: list[float] = []
        peak = 0

        async def handler(payload: dict[str, Any]) -> None:
            nonlocal peak
            peak = max(peak, consumer.in_flight)
            if payload["bad"]:
                await failing(payload)
                return
            await asyncio.sleep(0.01)
            latencies.append(loop.time() - payload["t"])

        policy = Policy.from_dict(
            {"retry": {"attempts": 6, "in_process": 1, "backoff": "fixed", "initial": 5}}
        )
        consumer = ResilientConsumer(backend, policy=policy, concurrency=2)
        task = asyncio.create_task(consumer.run(handler))
        for i in range(4):
            await backend.publish("orders", {"n": i, "bad": True, "t": loop.time()})
        for i in range(40):
            await backend.publish("orders", {"n": 100 + i, "bad": False, "t": loop.time()})
            await asyncio.sleep(0.1)
        while len(failing.done) < 4:
            await asyncio.sleep(1)
        await consumer.shutdown()
        await task
        return latencies, peak

    latencies, peak = run_virtual(scenario())
    assert len(latencies) == 40
    assert max(latencies) < 0.05  # never queued behind a 5 s wait
    assert peak <= 2


async def test_tiered_retry_from_pipeline_builder() -> None:
    """Pipeline.retry(in_process=..., backend=...) builds the same two-tier layer."""
    clock = FakeClock()
    backend = MemoryBackend.isolated(clock=clock)
    pipeline = Pipeline().retry(
        attempts=3, in_process=1, wait=Exponential(3, 10), backend=backend, clock=clock
    )
    (layer,) = pipeline.layers
    assert isinstance(layer, Retry)
    assert layer.in_process == 1
    await backend.publish("orders", {"n": 1})
    message = await anext(backend.deliveries())
    d = Delivery.from_message(message, started_at=0.0)
    await pipeline.build(Flaky(5))(d)
    assert d.outcome is Outcome.DEFERRED
    assert clock.sleeps == []
    clock.advance(3)
    assert backend.size() == 1
