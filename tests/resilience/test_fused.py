"""The fused success path: which layers fuse, and that fusing changes no behaviour."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from abe.backends.message_queue.base import InboundMessage
from abe.backends.message_queue.service.memory import MemoryBackend
from resilience._fused import fusable_suffix
from resilience.bench import Workload, builtin_policies, compare, parse_scenario
from resilience.breaker import BreakerState, CircuitBreaker
from resilience.clock import FakeClock
from resilience.consumer import ResilientConsumer
from resilience.dead_letter import DeadLetterRouter, MemoryStore
from resilience.delivery import Delivery
from resilience.errors import DeadLetter, Drop
from resilience.events import MessageSettled, Outcome
from resilience.pipeline import CallNext, Compiled, Handler, Pipeline
from resilience.policy import Policy
from resilience.retry import Fixed, Retry
from resilience.timeout import Timeout

SCENARIOS = ("transient", "outage:start=20,duration=200", "poison", "latency", "rate_limited")


def _unfuse(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every pipeline link each layer as its own frame (``compile(fuse=False)``)."""
    compile_ = Pipeline.compile

    def unfused(self: Pipeline, handler: Handler, *, fuse: bool = True) -> Compiled:
        return compile_(self, handler, fuse=False)

    monkeypatch.setattr(Pipeline, "compile", unfused)


@pytest.fixture(params=[True, False], ids=["fused", "unfused"])
def fusing(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run a test with the pipeline fused (the default) and with every layer linked."""
    fuse: bool = request.param
    if not fuse:
        _unfuse(monkeypatch)
    return fuse


class Sink:
    """A dead-letter sink that keeps what it is given."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    async def write(self, message: InboundMessage | None, record: dict[str, Any]) -> None:
        self.records.append(record)


async def _noop(delivery: Delivery, call_next: CallNext) -> None:
    await call_next(delivery)


def test_the_recommended_order_fuses_whole() -> None:
    """Dead-letter routing, retry, breaker and attempt timeout, in that order, fuse entirely;
    any subset of them in that order too."""
    layers: list[Any] = [
        DeadLetterRouter(Sink()),
        Retry(),
        CircuitBreaker("fused-order"),
        Timeout(1.0),
    ]
    assert fusable_suffix(layers) == 0
    assert fusable_suffix([layers[1], layers[3]]) == 0
    assert fusable_suffix([layers[0], layers[2]]) == 0
    assert fusable_suffix([]) == 0


def test_only_an_inner_run_in_order_fuses() -> None:
    """Fusing stops at a layer out of order, a user's middleware, a total timeout, a router
    with a validator, or a subclass of a built-in layer."""

    class MyRetry(Retry):
        pass

    timeout, retry = Timeout(1.0), Retry()
    assert fusable_suffix([_noop, retry, timeout]) == 1
    assert fusable_suffix([timeout, retry]) == 1  # out of order: only the inner one fuses
    assert fusable_suffix([retry, _noop]) == 2
    assert fusable_suffix([Timeout(5.0, total=True), retry]) == 1
    assert fusable_suffix([DeadLetterRouter(Sink(), validate=lambda p: None), retry]) == 1
    assert fusable_suffix([MyRetry(), timeout]) == 1


def test_compile_reports_a_fused_run_only_when_it_covers_every_layer() -> None:
    async def handler(payload: dict[str, Any]) -> None:
        return None

    assert Pipeline(Retry(), Timeout(1.0)).compile(handler).fused is not None
    assert Pipeline().compile(handler).fused is not None
    assert Pipeline(_noop, Retry()).compile(handler).fused is None
    assert Pipeline(Retry()).compile(handler, fuse=False).fused is None


@pytest.mark.parametrize("concurrency", [1, 3])
def test_fusing_changes_no_simulated_result(
    concurrency: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every built-in policy against every fault scenario gives the same numbers fused and
    unfused: calls to the dependency, outcomes, simulated latencies, breaker open time."""
    policies = list(builtin_policies().values())
    scenarios = [parse_scenario(spec) for spec in SCENARIOS]
    workload = Workload(messages=300, rate=1.0, concurrency=concurrency, seed=7)
    fused = compare(policies, scenarios, workload)
    _unfuse(monkeypatch)
    linked = compare(policies, scenarios, workload)
    strip = [dataclasses.replace(r, wall=0.0) for r in fused]
    assert strip == [dataclasses.replace(r, wall=0.0) for r in linked]
    assert sum(r.dead_lettered for r in fused) > 0  # the failure paths did run
    assert sum(r.calls for r in fused) > sum(r.succeeded + r.dead_lettered for r in fused)


async def _drain(consumer: ResilientConsumer, handler: Handler, until: Any) -> None:
    task = asyncio.create_task(consumer.run(handler))
    for _ in range(1000):
        if until():
            break
        await asyncio.sleep(0)
    await consumer.shutdown()
    await task


async def test_a_listener_added_during_a_message_sees_it_settle(fusing: bool) -> None:
    """The fast path notices a listener subscribed while the handler ran."""
    backend = MemoryBackend.isolated()
    await backend.publish("jobs", {"i": 1})
    consumer = ResilientConsumer(backend, policy=Policy())
    settled: list[MessageSettled] = []

    async def handler(payload: dict[str, Any]) -> None:
        consumer.events.subscribe(lambda event: settled.append(event))  # type: ignore[arg-type]

    await _drain(consumer, handler, lambda: settled)
    assert [(e.outcome, e.attempts) for e in settled] == [(Outcome.SUCCESS, 1)]
    assert backend.unacked() == []


async def test_a_failing_ack_is_logged_and_the_loop_goes_on(
    fusing: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """An ack that raises is logged with the message id; the next message is still handled."""
    backend = MemoryBackend.isolated()
    for i in range(2):
        await backend.publish("jobs", {"i": i})
    seen: list[int] = []
    real = backend.ack_nowait

    def flaky_ack(message: InboundMessage) -> None:
        if message.payload["i"] == 0:
            raise ConnectionError("ack lost")
        real(message)

    backend.ack_nowait = flaky_ack  # type: ignore[method-assign]

    async def handler(payload: dict[str, Any]) -> None:
        seen.append(payload["i"])

    with caplog.at_level(logging.ERROR, logger="resilience.consumer"):
        await _drain(ResilientConsumer(backend, policy=Policy()), handler, lambda: len(seen) == 2)
    assert seen == [0, 1]
    assert "Acknowledging message 1 failed" in caplog.text
    assert [m.payload["i"] for m in backend.unacked()] == [0]


async def test_a_handler_that_swallows_the_timeout_still_succeeds(fusing: bool) -> None:
    """A handler that catches the attempt timeout's cancellation and returns has succeeded:
    the message is acked once and the consumer goes on, cancelled by nothing."""
    clock = FakeClock()
    backend = MemoryBackend.isolated()
    for i in range(2):
        await backend.publish("jobs", {"i": i})
    done: list[int] = []
    swallowed: list[int] = []

    async def handler(payload: dict[str, Any]) -> None:
        if payload["i"] == 0:
            try:
                await clock.sleep(10)
            except asyncio.CancelledError:
                swallowed.append(0)
        done.append(payload["i"])

    policy = Pipeline(Retry(attempts=3, wait=Fixed(0.0), clock=clock), Timeout(1.0, clock=clock))
    consumer = ResilientConsumer(backend, policy=policy, clock=clock)
    task = asyncio.create_task(consumer.run(handler))
    for _ in range(50):  # the handler's fake sleep moves time past the timeout by itself
        await asyncio.sleep(0)
    assert swallowed == [0]
    assert done == [0, 1]
    assert backend.unacked() == []
    assert not task.done()
    await consumer.shutdown()
    await task  # a graceful stop: the swallowed timeout left no cancel request behind


async def test_an_open_breaker_pauses_the_fused_loop(fusing: bool) -> None:
    """In pause mode the consumer stops pulling while the breaker is open, then goes on."""
    clock = FakeClock()
    backend = MemoryBackend.isolated()
    for i in range(6):
        await backend.publish("jobs", {"i": i})
    calls: list[int] = []
    healthy = False

    async def handler(payload: dict[str, Any]) -> None:
        calls.append(payload["i"])
        if not healthy:
            raise ConnectionError("down")

    breaker = CircuitBreaker(
        f"fused-pause-{fusing}", clock=clock, failure_threshold=2, open_wait=30.0
    )
    policy = Pipeline(Retry(attempts=1, clock=clock), breaker)
    consumer = ResilientConsumer(backend, policy=policy, clock=clock)
    task = asyncio.create_task(consumer.run(handler))
    for _ in range(50):
        await asyncio.sleep(0)
    assert calls == [0, 1]  # two failures opened it; the held message waits
    assert breaker.breaker.state is BreakerState.OPEN
    healthy = True
    clock.advance(30.0)
    for _ in range(200):
        await asyncio.sleep(0)
    assert sorted(set(calls)) == [0, 1, 2, 3, 4, 5]
    assert backend.size() == 0
    await consumer.shutdown()
    await task


BEHAVIOURS = st.one_of(
    st.just(("ok", 0)),
    st.tuples(st.just("transient"), st.integers(1, 4)),
    st.just(("terminal", 0)),
    st.just(("drop", 0)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plan=st.lists(BEHAVIOURS, min_size=1, max_size=25),
    stop_at=st.none() | st.integers(0, 24),
)
def test_the_fast_path_loses_nothing(plan: list[tuple[str, int]], stop_at: int | None) -> None:
    """With no event listener (the consumer's inlined fast path), under random failures and a
    shutdown that cancels a message mid-handler, every message ends exactly once: handled,
    dropped, dead-lettered, or back in the queue (the cancelled one redelivered, the rest never
    pulled). Nothing is lost or left unacknowledged."""
    if stop_at is not None and stop_at >= len(plan):
        stop_at = None

    async def scenario() -> None:
        backend = MemoryBackend.isolated(keys=["jobs"])
        for i in range(len(plan)):
            await backend.publish("jobs", {"i": i})
        store = MemoryStore()
        calls: Counter[int] = Counter()
        handled: list[int] = []
        dropped: list[int] = []
        reached = asyncio.Event()

        async def handler(payload: dict[str, Any]) -> None:
            i = payload["i"]
            calls[i] += 1
            kind, failures = plan[i]
            if i == stop_at:
                reached.set()
                await asyncio.Event().wait()  # until the shutdown cancels it
            if kind == "transient" and calls[i] <= failures:
                raise ConnectionError("flaky")
            if kind == "terminal":
                raise DeadLetter("no")
            if kind == "drop":
                dropped.append(i)
                raise Drop("duplicate")
            handled.append(i)

        pipeline = (
            Pipeline()
            .dead_letter(store)
            .retry(attempts=3, wait=Fixed(0))
            .circuit_breaker(f"fast-path-{id(plan)}", failure_threshold=10_000)
            .timeout(30)
        )
        consumer = ResilientConsumer(backend, policy=pipeline, drain_timeout=0)
        assert not consumer.events  # nobody listens: the fast path runs
        task = asyncio.create_task(consumer.run(handler))
        for _ in range(10_000):
            if reached.is_set() or (backend.size() == 0 and not backend.unacked()):
                break
            await asyncio.sleep(0)
        await consumer.shutdown()
        await asyncio.gather(task, return_exceptions=True)  # cancelled when stop_at is set

        dead = [envelope["payload"]["i"] for envelope in store.envelopes]
        queued = {m.payload["i"]: m.delivery_count for m in backend.peek("jobs")}
        assert backend.unacked() == []
        ends = Counter(handled) + Counter(dropped) + Counter(dead) + Counter(queued.keys())
        assert ends == Counter(range(len(plan)))  # each message ends exactly once
        for i, (kind, failures) in enumerate(plan):
            if stop_at is not None and i >= stop_at:
                assert queued[i] == (2 if i == stop_at else 1)
            elif kind == "ok" or (kind == "transient" and failures < 3):
                assert i in handled
            elif kind == "drop":
                assert i in dropped
            else:
                assert i in dead

    asyncio.run(scenario())
