"""The consumer's worker loop with the pipeline's outermost compiled run pasted in
(:func:`resilience.hooks.host`), and the slow path taken where a token may be ``SLOW_PATH``."""

from __future__ import annotations

import asyncio
import dis
import gc
import logging
import sys
import weakref
from collections import Counter
from typing import Any

import pytest

from abe.backends.message_queue.base.extensions import InboundMessage
from abe.backends.message_queue.service.memory import MemoryBackend
from resilience.consumer import ResilientConsumer, _Settler
from resilience.delivery import Delivery, _Maker, new_delivery
from resilience.events import EventBus, Outcome
from resilience.hooks import SLOW_PATH, HookLayer, compile_hooks, host, terminal
from resilience.logging import LogContext, current_delivery
from resilience.pipeline import CallNext, Pipeline
from resilience.policy import Policy
from resilience.retry import Fixed, Retry
from resilience.testing import run_until_settled


async def _publish(backend: MemoryBackend, n: int) -> None:
    for i in range(n):
        await backend.publish("jobs", {"i": i})


class _Layer(HookLayer):
    """Counts its hooks; ``slow_when`` decides (by payload) when ``enter`` declines."""

    def __init__(self, slow_when: int = -1) -> None:
        self.slow_when = slow_when
        self.calls: Counter[str] = Counter()

    def enter(self, delivery: Delivery) -> Any:
        self.calls["enter"] += 1
        if delivery.payload["i"] == self.slow_when:
            return SLOW_PATH  # the literal: the run takes the slow path right here
        return None

    def leave(self, token: Any, delivery: Delivery) -> None:
        self.calls["leave"] += 1

    async def fail(
        self, token: Any, delivery: Delivery, exc: BaseException, call_next: CallNext
    ) -> None:
        self.calls["fail"] += 1
        raise exc

    async def slow(self, delivery: Delivery, call_next: CallNext) -> None:
        self.calls["slow"] += 1
        await call_next(delivery)


class _Helper(_Layer):
    """Declines through a helper's return value (the run checks the token)."""

    def enter(self, delivery: Delivery) -> Any:
        self.calls["enter"] += 1
        return self._decide(delivery)

    def _decide(self, delivery: Delivery) -> Any:
        return SLOW_PATH if delivery.payload["i"] == self.slow_when else None


class _Raising(_Layer):
    """Its slow path fails."""

    async def slow(self, delivery: Delivery, call_next: CallNext) -> None:
        self.calls["slow"] += 1
        raise LookupError("declined and failed")


def _awaited_by_worker() -> list[bool]:
    """Whether the running handler (the caller) is awaited by the worker loop's own frame."""
    awaiting = sys._getframe(2)  # the handler's caller: the frame that awaits its coroutine
    return [awaiting.f_code.co_name == "work"]


@pytest.mark.parametrize("policy", ["empty", "Policy()", "hooked"])
async def test_the_worker_awaits_the_handler_itself(policy: str) -> None:
    """With an empty pipeline or a compiled run outermost, the message's only coroutine is
    the handler's: the worker loop's frame awaits it."""
    backend = MemoryBackend.isolated()
    await _publish(backend, 2)
    seen: list[bool] = []

    async def handler(payload: dict[str, Any]) -> None:
        seen.extend(_awaited_by_worker())

    chosen: Any = {"empty": Pipeline(), "Policy()": Policy(), "hooked": [_Layer(), _Layer()]}
    consumer = ResilientConsumer(backend, policy=chosen[policy])
    outcomes = await run_until_settled(consumer, handler, 2)
    assert seen == [True, True]
    assert outcomes.counts == Counter({Outcome.SUCCESS: 2})


async def test_plain_middleware_outermost_is_awaited_as_it_is() -> None:
    """A plain middleware outermost: the worker awaits the pipeline, which runs every layer."""
    backend = MemoryBackend.isolated()
    await _publish(backend, 2)
    order: list[str] = []
    inner = _Layer()

    async def plain(delivery: Delivery, call_next: CallNext) -> None:
        order.append("plain")
        await call_next(delivery)

    seen: list[bool] = []

    async def handler(payload: dict[str, Any]) -> None:
        order.append("handler")
        seen.extend(_awaited_by_worker())

    outcomes = await run_until_settled(
        ResilientConsumer(backend, policy=[plain, inner]), handler, 2
    )
    assert order == ["plain", "handler"] * 2
    assert seen == [False, False]
    assert inner.calls == Counter(enter=2, leave=2)
    assert outcomes.counts == Counter({Outcome.SUCCESS: 2})


@pytest.mark.parametrize("kind", [_Layer, _Helper])
@pytest.mark.parametrize("inline", [True, False], ids=["inlined", "called"])
async def test_a_declining_enter_takes_the_slow_path_in_the_loop(
    kind: type[_Layer], inline: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``return SLOW_PATH`` (inlined: the exit itself) and a helper's ``SLOW_PATH`` (a checked
    token) both run the layer's slow path, inside the outer layers, in the worker loop."""
    if not inline:
        build = Pipeline.build
        monkeypatch.setattr(
            Pipeline,
            "compile",
            lambda self, handler, inline=True: build(self, handler, inline=False),
        )
    backend = MemoryBackend.isolated()
    await _publish(backend, 3)
    outer, inner = _Layer(), kind(slow_when=1)
    handled: list[int] = []

    async def handler(payload: dict[str, Any]) -> None:
        handled.append(payload["i"])

    outcomes = await run_until_settled(
        ResilientConsumer(backend, policy=[outer, inner]), handler, 3
    )
    assert handled == [0, 1, 2]
    assert inner.calls == Counter(enter=3, leave=2, slow=1)
    assert outer.calls == Counter(enter=3, leave=3)
    assert outcomes.counts == Counter({Outcome.SUCCESS: 3})


async def test_a_failing_slow_path_reaches_each_outer_layer_once_in_the_loop() -> None:
    """The slow path's failure goes through each outer layer's ``fail`` once, then settles."""
    backend = MemoryBackend.isolated()
    await _publish(backend, 2)
    outer, middle, inner = _Layer(), _Layer(), _Raising(slow_when=0)

    async def handler(payload: dict[str, Any]) -> None:
        return None

    outcomes = await run_until_settled(
        ResilientConsumer(backend, policy=[outer, middle, inner]), handler, 2
    )
    assert inner.calls == Counter(enter=2, slow=1, leave=1)
    assert middle.calls == Counter(enter=2, fail=1, leave=1)
    assert outer.calls == Counter(enter=2, fail=1, leave=1)
    assert outcomes.counts == Counter({Outcome.FAILED: 1, Outcome.SUCCESS: 1})
    assert backend.unacked() == []


async def test_a_handler_failure_goes_through_fail_and_a_retry_in_the_loop() -> None:
    """The handler's failure reaches the layers' ``fail`` (innermost first); a retry runs the
    inner layers' hooks again and the message succeeds."""
    backend = MemoryBackend.isolated()
    await _publish(backend, 1)
    outer, inner = _Layer(), _Layer()
    attempts = 0

    async def handler(payload: dict[str, Any]) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionError("flaky")

    policy = [outer, Retry(attempts=2, wait=Fixed(0.0)), inner]
    outcomes = await run_until_settled(ResilientConsumer(backend, policy=policy), handler, 1)
    assert attempts == 2
    assert inner.calls == Counter(enter=2, fail=1, leave=1)
    assert outer.calls == Counter(enter=1, leave=1)
    assert outcomes.counts == Counter({Outcome.RETRIED: 1})


async def test_the_loop_lets_go_of_a_failure_once_it_is_settled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker's frame outlives each message: a failed message's exception is not kept
    alive by it until the next failure."""
    monkeypatch.setattr(logging.getLogger("resilience.consumer"), "disabled", True)
    backend = MemoryBackend.isolated()
    await _publish(backend, 2)

    class Boom(Exception):
        pass

    refs: list[weakref.ref[Boom]] = []
    alive: list[bool] = []

    async def handler(payload: dict[str, Any]) -> None:
        if payload["i"] == 0:
            error = Boom()
            refs.append(weakref.ref(error))
            raise error
        gc.collect()  # a failure's traceback holds frames that hold it: cycles
        alive.append(refs[0]() is not None)

    outcomes = await run_until_settled(ResilientConsumer(backend, policy=[_Layer()]), handler, 2)
    assert outcomes.counts == Counter({Outcome.FAILED: 1, Outcome.SUCCESS: 1})
    assert alive == [False]


@pytest.mark.parametrize("policy", ["empty", "Policy()", "plain"])
async def test_shutdown_while_a_handler_runs_finishes_it(policy: str) -> None:
    """A graceful shutdown lets the running handler finish (acknowledged) and takes no more."""
    backend = MemoryBackend.isolated()
    await _publish(backend, 3)
    started, release = asyncio.Event(), asyncio.Event()

    async def handler(payload: dict[str, Any]) -> None:
        started.set()
        await release.wait()

    async def plain(delivery: Delivery, call_next: CallNext) -> None:
        await call_next(delivery)

    chosen: Any = {"empty": Pipeline(), "Policy()": Policy(), "plain": [plain, _Layer()]}
    consumer = ResilientConsumer(backend, policy=chosen[policy])
    task = asyncio.create_task(consumer.run(handler))
    await started.wait()
    assert consumer.in_flight == 1
    stopper = asyncio.create_task(consumer.shutdown())
    await asyncio.sleep(0)
    release.set()
    await stopper
    await task
    assert backend.size("jobs") == 2
    assert backend.unacked() == []
    assert consumer.in_flight == 0


async def test_cancelling_the_run_releases_the_message_in_the_loop() -> None:
    """Cancelling the consumer's task mid-message releases the message and propagates."""
    backend = MemoryBackend.isolated()
    await _publish(backend, 1)
    started = asyncio.Event()
    layer = _Layer()

    async def handler(payload: dict[str, Any]) -> None:
        started.set()
        await asyncio.Event().wait()

    consumer = ResilientConsumer(backend, policy=[layer])
    task = asyncio.create_task(consumer.run(handler))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert layer.calls == Counter(enter=1, fail=1)
    assert backend.unacked() == []
    assert backend.size("jobs") == 1  # released: delivered again


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="CPython 3.11's specializer")
async def test_the_loop_is_specialized_while_it_runs() -> None:
    """The worker loop's instructions get specialized as it runs (its back edge warms the
    code up): the pasted hooks run as fast as in a function of their own."""
    backend = MemoryBackend.isolated()
    await _publish(backend, 50)
    codes: list[Any] = []

    async def handler(payload: dict[str, Any]) -> None:
        task = asyncio.current_task()
        assert task is not None
        codes.append(task.get_coro().cr_code)  # type: ignore[union-attr]

    await run_until_settled(ResilientConsumer(backend, policy=Policy()), handler, 50)
    names = {i.opname for i in dis.get_instructions(codes[0], adaptive=True)}
    assert "LOAD_ATTR_SLOT" in names or "LOAD_ATTR_INSTANCE_VALUE" in names


def test_host_refuses_a_template_that_uses_the_runs_names() -> None:
    """The template's names must not be the run's (``error``, ``t0``, ...)."""
    run = compile_hooks([_Layer()], terminal(_noop_handler), _noop_handler, fresh=True)
    clashing = "async def work(delivery):\n    error = 1\n    await run(delivery)\n"
    with pytest.raises(ValueError, match="error"):
        host(clashing, run, {}, "<test>")
    with pytest.raises(ValueError, match="once"):
        host("async def work(delivery):\n    pass\n", run, {}, "<test>")
    fine = host("async def work(delivery):\n    await run(delivery)\n", run, {}, "<test>")
    assert callable(fine["work"])
    handler_named = "async def work(delivery, handler):\n    await run(delivery)\n"
    with pytest.raises(ValueError, match="handler"):
        host(handler_named, terminal(_noop_handler), {}, "<test>")
    plain = _Slotted()  # a plain callable, not weakly referable: awaited as it is
    assert host(handler_named, plain, {}, "<test>")["run"] is plain


class _Slotted:
    __slots__ = ()

    async def __call__(self, delivery: Delivery) -> None:
        return None


async def _noop_handler(payload: Any) -> None:
    return None


def _is_ops(call: Any) -> int:
    return sum(1 for i in dis.get_instructions(call) if i.opname == "IS_OP")


def test_an_inlined_return_of_slow_path_is_the_exit_itself() -> None:
    """No token check after an inlined ``return SLOW_PATH`` / ``return None``; a helper's
    result and a called hook are checked."""
    literal = compile_hooks([_Layer()], terminal(_noop_handler), _noop_handler)
    helper = compile_hooks([_Helper()], terminal(_noop_handler), _noop_handler)
    called = compile_hooks([_Layer()], terminal(_noop_handler), _noop_handler, inline=False)
    assert _is_ops(literal) == 0
    assert _is_ops(helper) == 1
    assert _is_ops(called) == 1


@pytest.mark.parametrize("kind", [_Layer, _Helper])
@pytest.mark.parametrize("inline", [True, False], ids=["inlined", "called"])
async def test_the_compiled_run_takes_the_slow_path(kind: type[_Layer], inline: bool) -> None:
    """The same through a compiled run awaited on its own."""
    outer, inner = _Layer(), kind(slow_when=0)
    handled: list[int] = []

    async def handler(payload: dict[str, Any]) -> None:
        handled.append(payload["i"])

    call = Pipeline(outer, inner).build(handler, inline=inline)
    await call(Delivery({"i": 0}))
    await call(Delivery({"i": 1}))
    assert handled == [0, 1]
    assert inner.calls == Counter(enter=2, slow=1, leave=1)
    assert outer.calls == Counter(enter=2, leave=2)


class _Ordered(_Layer):
    """Returns a number it compared with a number (never ``SLOW_PATH``), or a helper's result."""

    def enter(self, delivery: Delivery) -> Any:
        self.calls["enter"] += 1
        token = delivery.payload["i"] - self.slow_when
        if token == 0:
            return self._decide(delivery)
        if token < 0:
            return None
        return token

    def _decide(self, delivery: Delivery) -> Any:
        return SLOW_PATH


async def test_a_value_an_ordering_test_has_seen_is_not_checked() -> None:
    """``if token < 0: ... return token``: the sentinel has no order, so the test would have
    raised; only the helper's result is checked, and it still takes the slow path."""
    run = compile_hooks([_Ordered(slow_when=1)], terminal(_noop_handler), _noop_handler)
    assert _is_ops(run) == 1
    layer = _Ordered(slow_when=1)
    handled: list[int] = []

    async def handler(payload: dict[str, Any]) -> None:
        handled.append(payload["i"])

    call = Pipeline(layer).build(handler)
    for i in range(3):
        await call(Delivery({"i": i}))
    assert handled == [0, 1, 2]
    assert layer.calls == Counter(enter=3, slow=1, leave=2)


async def test_the_loop_makes_and_settles_each_delivery_with_bodies_pasted_in() -> None:
    """The worker loop makes a delivery with the body of ``new_delivery`` (``MAKER.make``) and
    settles a success with the body of the consumer's settle function pasted in, not a call per
    message, and the report it makes for a listener likewise (the settle body's call of
    ``report`` pasted in turn); the delivery has every field new_delivery sets and each message
    is acknowledged and reported."""
    pasted = {_Maker.make.__code__, _Settler.settle.__code__, _Settler.report.__code__}
    backend = MemoryBackend.isolated()
    await _publish(backend, 3)
    calls: list[str] = []
    made: list[tuple[Any, ...]] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code in pasted:
            calls.append(frame.f_code.co_name)

    async def handler(payload: dict[str, Any]) -> None:
        delivery = current_delivery()
        assert delivery is not None
        made.append(
            (
                delivery.payload is payload,
                delivery.attempt,
                delivery.task is asyncio.current_task(),
                delivery.outcome,
                delivery.deadline,
                delivery.extras,
            )
        )

    consumer = ResilientConsumer(backend, policy=Pipeline(LogContext()))
    sys.setprofile(profile)
    try:
        outcomes = await run_until_settled(consumer, handler, 3)
    finally:
        sys.setprofile(None)
    assert outcomes.counts == Counter({Outcome.SUCCESS: 3})
    assert made == [(True, 1, True, None, None, None)] * 3
    assert calls == []
    assert backend.unacked() == []
    # new_delivery itself is the same body, called
    message = InboundMessage({"i": 0}, "jobs", "1", 2)
    delivery = new_delivery(message, 5.0, EventBus(), None)
    assert (delivery.attempt, delivery.started_at, delivery.now, delivery.clock) == (
        2,
        5.0,
        None,
        None,
    )


async def test_the_pasted_report_hears_listeners_that_change_while_the_loop_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The bus's emit is pasted into the loop with the report, yet it reads the listeners of
    the moment: one subscribed while the loop runs hears the next records, several hear each
    record in order, one unsubscribed hears no more, and a failing one is logged and skipped
    without stopping the others or the loop (each message still settled once)."""
    backend = MemoryBackend.isolated()
    await _publish(backend, 6)
    heard: list[tuple[str, int]] = []
    unsubscribe: dict[str, Any] = {}
    ids: dict[str, int] = {}

    def listener(name: str) -> Any:
        def hear(event: Any) -> None:
            heard.append((name, int(event.message_id)))
            if name == "failing":
                raise RuntimeError("listener broke")

        return hear

    consumer = ResilientConsumer(backend, policy=Pipeline(LogContext(), Retry()))
    unsubscribe["first"] = consumer.events.subscribe(listener("first"))

    async def handler(payload: dict[str, Any]) -> None:
        delivery = current_delivery()
        assert delivery is not None
        ids[str(payload["i"])] = int(delivery.message_id or 0)
        if payload["i"] == 1:
            unsubscribe["second"] = consumer.events.subscribe(listener("second"))
        elif payload["i"] == 2:
            unsubscribe["first"]()
        elif payload["i"] == 3:
            unsubscribe["failing"] = consumer.events.subscribe(listener("failing"))
        elif payload["i"] == 4:
            unsubscribe["second"]()

    with caplog.at_level(logging.ERROR, logger="resilience.events"):
        outcomes = await run_until_settled(consumer, handler, 6)
    assert outcomes.counts == Counter({Outcome.SUCCESS: 6})
    n = [ids[str(i)] for i in range(6)]
    assert [h for h in heard if h[0] != "outcomes"] == [
        ("first", n[0]),
        ("first", n[1]),
        ("second", n[1]),
        ("second", n[2]),
        ("second", n[3]),
        ("failing", n[3]),
        ("failing", n[4]),
        ("failing", n[5]),
    ]
    assert [r.getMessage().startswith("event listener") for r in caplog.records] == [True] * 3
    assert backend.unacked() == []
