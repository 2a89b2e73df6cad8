"""Compiled hook runs: which layers take part, and that compiling changes no behaviour
(differential tests between compiled and fully linked pipelines)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import Counter
from typing import Any

import pytest

from abe.backends.message_queue.base import InboundMessage
from abe.backends.message_queue.service.memory import MemoryBackend
from resilience.bench import Workload, builtin_policies, compare, parse_scenario
from resilience.breaker import BreakerState, CircuitBreaker
from resilience.clock import FakeClock
from resilience.consumer import ResilientConsumer
from resilience.dead_letter import DeadLetterRouter, MemoryStore
from resilience.delivery import Delivery
from resilience.events import MessageSettled, Outcome
from resilience.hooks import SLOW_PATH, HookLayer, has_hooks
from resilience.logging import LogContext
from resilience.pipeline import CallNext, Handler, Pipeline
from resilience.policy import Policy
from resilience.retry import Fixed, Retry
from resilience.telemetry import Telemetry
from resilience.timeout import Timeout

SCENARIOS = ("transient", "outage:start=20,duration=200", "poison", "latency", "rate_limited")


def _unfuse(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every pipeline link each layer as its own frame (``build(fuse=False)``)."""
    build = Pipeline.build

    def unfused(self: Pipeline, handler: Handler, *, inline: bool = True) -> CallNext:
        return build(self, handler, fuse=False)

    monkeypatch.setattr(Pipeline, "compile", unfused)


def _uninline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every compiled run call its hooks (``build(inline=False)``)."""
    build = Pipeline.build

    def called(self: Pipeline, handler: Handler, *, inline: bool = True) -> CallNext:
        return build(self, handler, inline=False)

    monkeypatch.setattr(Pipeline, "compile", called)


@pytest.fixture(params=["inlined", "called", "linked"])
def fusing(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the hooks compiled and simple ones inlined (the default), compiled
    and every hook called, and with every layer linked."""
    mode: str = request.param
    if mode == "called":
        _uninline(monkeypatch)
    elif mode == "linked":
        _unfuse(monkeypatch)
    return mode


async def _noop(delivery: Delivery, call_next: CallNext) -> None:
    await call_next(delivery)


def test_every_built_in_layer_offers_the_hooks() -> None:
    """Dead-letter routing, retry, breaker, both timeouts, log context and telemetry take part
    in compiled runs; plain middleware and a subclass replacing ``__call__`` do not."""

    class MyRetry(Retry):
        async def __call__(self, delivery: Delivery, call_next: CallNext) -> None:
            await call_next(delivery)

    layers: list[Any] = [
        Telemetry(traces=False, metrics=False),
        LogContext(),
        DeadLetterRouter(MemoryStore()),
        Timeout(5.0, total=True),
        Retry(),
        CircuitBreaker("hooks-order"),
        Timeout(1.0),
    ]
    assert all(has_hooks(layer) for layer in layers)
    assert not has_hooks(_noop)
    assert not has_hooks(MyRetry())


async def test_plain_middleware_anywhere_splits_the_run_and_still_runs(fusing: str) -> None:
    """A plain middleware between hook layers runs on every attempt, inside retry and outside
    the attempt timeout, exactly where it is listed."""
    seen: list[str] = []

    async def spy(delivery: Delivery, call_next: CallNext) -> None:
        seen.append(f"spy {delivery.attempt}")
        await call_next(delivery)

    async def handler(payload: dict[str, Any]) -> None:
        seen.append("handler")
        if len(seen) < 4:
            raise ConnectionError("flaky")

    call = Pipeline(Retry(attempts=3, wait=Fixed(0)), spy, Timeout(5.0)).compile(handler)
    await call(Delivery({"n": 1}))
    assert seen == ["spy 1", "handler", "spy 2", "handler"]


@pytest.mark.parametrize("concurrency", [1, 3])
def test_compiling_changes_no_simulated_result(
    concurrency: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every built-in policy against every fault scenario gives the same numbers compiled (with
    hook bodies inlined, and with every hook called) and linked: calls to the dependency,
    outcomes, simulated latencies, breaker open time."""
    policies = list(builtin_policies().values())
    scenarios = [parse_scenario(spec) for spec in SCENARIOS]
    workload = Workload(messages=300, rate=1.0, concurrency=concurrency, seed=7)
    fused = compare(policies, scenarios, workload)
    with monkeypatch.context() as patch:
        _uninline(patch)
        called = compare(policies, scenarios, workload)
    _unfuse(monkeypatch)
    linked = compare(policies, scenarios, workload)
    strip = [dataclasses.replace(r, wall=0.0) for r in fused]
    assert strip == [dataclasses.replace(r, wall=0.0) for r in called]
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


async def test_a_listener_added_during_a_message_sees_it_settle(fusing: str) -> None:
    """The fast path notices a listener subscribed while the handler ran."""
    backend = MemoryBackend.isolated()
    await backend.publish("jobs", {"i": 1})
    consumer = ResilientConsumer(backend, policy=Policy())
    settled: list[MessageSettled] = []

    async def handler(payload: dict[str, Any]) -> None:
        consumer.events.subscribe(lambda event: settled.append(event))

    await _drain(consumer, handler, lambda: settled)
    assert [(e.outcome, e.attempts) for e in settled] == [(Outcome.SUCCESS, 1)]
    assert backend.unacked() == []


async def test_a_failing_ack_is_logged_and_the_loop_goes_on(
    fusing: str, caplog: pytest.LogCaptureFixture
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


async def test_a_handler_that_swallows_the_timeout_still_succeeds(fusing: str) -> None:
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


async def test_an_open_breaker_pauses_the_consumer(fusing: str) -> None:
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
        f"hooks-pause-{fusing}", clock=clock, failure_threshold=2, open_wait=30.0
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


@pytest.mark.parametrize("outcome", ["ok", "flaky", "broken"])
async def test_calling_a_layer_directly_matches_its_linked_form(outcome: str) -> None:
    """``await layer(delivery, call_next)`` and the pipeline's linked form of the same layer
    call the rest as often and end alike."""

    async def run(direct: bool) -> tuple[int, str]:
        calls = 0

        async def call_next(delivery: Delivery) -> None:
            nonlocal calls
            calls += 1
            if outcome == "broken" or (outcome == "flaky" and calls == 1):
                raise ConnectionError("down")

        retry = Retry(attempts=2, wait=Fixed(0))
        delivery = Delivery({"n": 1})
        try:
            if direct:
                await retry(delivery, call_next)
            else:
                await retry.link(call_next)(delivery)
        except ConnectionError:
            return calls, "raised"
        return calls, "returned"

    assert await run(True) == await run(False)


class _Counting(HookLayer):
    """A hooked layer that counts its hook calls and re-raises failures."""

    def __init__(self, decline: bool = False, raise_on_enter: bool = False) -> None:
        self.calls: Counter[str] = Counter()
        self.decline = decline
        self.raise_on_enter = raise_on_enter

    def enter(self, delivery: Delivery) -> Any:
        self.calls["enter"] += 1
        if self.raise_on_enter:
            raise LookupError("enter failed")
        return SLOW_PATH if self.decline else "token"

    def leave(self, token: Any, delivery: Delivery) -> None:
        self.calls["leave"] += 1

    async def fail(
        self, token: Any, delivery: Delivery, exc: BaseException, call_next: CallNext
    ) -> None:
        self.calls["fail"] += 1
        raise exc

    async def slow(self, delivery: Delivery, call_next: CallNext) -> None:
        self.calls["slow"] += 1
        raise ValueError("declined and failed")


@pytest.mark.parametrize(
    ("fuse", "inline"),
    [(True, True), (True, False), (False, True)],
    ids=["inlined", "called", "linked"],
)
@pytest.mark.parametrize("inner_kind", ["declines", "raises on enter"])
async def test_an_inner_layers_own_failure_reaches_each_outer_layer_once(
    fuse: bool, inline: bool, inner_kind: str
) -> None:
    """When an inner layer's slow path or enter hook raises, every outer layer sees the
    exception exactly once (its ``fail``), compiled or linked."""
    outer, middle = _Counting(), _Counting()
    inner = _Counting(decline=inner_kind == "declines", raise_on_enter=inner_kind != "declines")

    async def handler(payload: dict[str, Any]) -> None:
        raise AssertionError("never reached")

    call = Pipeline(outer, middle, inner).build(handler, fuse=fuse, inline=inline)
    with pytest.raises((ValueError, LookupError)):
        await call(Delivery({"n": 1}))
    assert outer.calls == Counter(enter=1, fail=1)
    assert middle.calls == Counter(enter=1, fail=1)
