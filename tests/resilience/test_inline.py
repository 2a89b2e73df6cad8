"""Inlined hook bodies: which hooks the compiled run pastes in, and that an inlined run behaves
exactly as the same run calling its hooks (differential tests, every built-in layer)."""

from __future__ import annotations

import asyncio
import textwrap
from collections import Counter
from collections.abc import Awaitable
from typing import Any

import pytest

from abe.backends.message_queue.base import InboundMessage
from resilience._inline import inline_hook
from resilience.breaker import CircuitBreaker, CountWindow
from resilience.clock import FakeClock
from resilience.dead_letter import DeadLetterRouter, MemoryStore
from resilience.delivery import Delivery
from resilience.hooks import SLOW_PATH, HookLayer, compile_hooks
from resilience.logging import LogContext
from resilience.pipeline import CallNext, Pipeline
from resilience.retry import Fixed, Retry
from resilience.telemetry import Telemetry
from resilience.timeout import Timeout

_RATE = 1.0
"""A module-level name bound once: an inlined hook reads it when the pipeline is built."""

_LIMIT = 1
_LIMIT = 2  # bound twice: a hook reading it must stay a call (it is read at each call)


def _called(call: CallNext) -> set[str]:
    """The hooks a compiled run calls (``e0``, ``l2``, ...) rather than pastes in."""
    namespace: dict[str, Any] = call.__globals__
    return {name for name in namespace if name[:1] in "el" and name[1:].isdigit()}


async def _ok(payload: dict[str, Any]) -> None:
    return None


def test_the_built_in_success_path_hooks_are_inlined() -> None:
    """Dead-letter routing, retry, breaker and both timeouts run with no hook call at all; the
    log context's ``enter`` (a C method) and telemetry stay calls where they must."""
    layers: list[Any] = [
        DeadLetterRouter(MemoryStore()),
        Timeout(5.0, total=True),
        Retry(),
        CircuitBreaker("inline-built-ins"),
        Timeout(1.0),
    ]
    assert _called(Pipeline(*layers).compile(_ok)) == set()
    assert _called(Pipeline(*layers).compile(_ok, inline=False)) == {
        "e0",
        "e1",
        "e2",
        "e3",
        "e4",
        "l1",
        "l3",
        "l4",
    }
    assert "e0" in _called(Pipeline(LogContext()).compile(_ok))  # ContextVar.set: no source


class _Recorder(HookLayer):
    """An inlinable layer (assignments, ``if``, ``raise``, early returns) recording its hooks;
    ``leave`` returns an awaitable when asked to."""

    def __init__(self, mode: str = "") -> None:
        self.calls: Counter[str] = Counter()
        self.mode = mode
        self.finished = 0

    def enter(self, delivery: Delivery) -> Any:
        self.calls["enter"] += 1
        if self.mode == "raise on enter":
            raise LookupError("enter failed")
        if self.mode == "decline":
            return SLOW_PATH
        return delivery.attempt * 10

    def leave(self, token: Any, delivery: Delivery) -> Awaitable[None] | None:
        self.calls["leave"] += 1
        if token != delivery.attempt * 10:
            raise AssertionError("the token did not reach leave")
        if self.mode == "awaitable leave":
            return self._finish()
        if self.mode == "raise on leave":
            raise KeyError("leave failed")
        return None

    async def _finish(self) -> None:
        await asyncio.sleep(0)
        self.finished += 1

    async def fail(
        self, token: Any, delivery: Delivery, exc: BaseException, call_next: CallNext
    ) -> None:
        self.calls["fail"] += 1
        raise exc

    async def slow(self, delivery: Delivery, call_next: CallNext) -> None:
        self.calls["slow"] += 1
        await call_next(delivery)


@pytest.mark.parametrize(
    "mode", ["", "raise on enter", "decline", "awaitable leave", "raise on leave"]
)
@pytest.mark.parametrize("handler_fails", [False, True], ids=["success", "failure"])
async def test_an_inlined_run_matches_the_called_run(mode: str, handler_fails: bool) -> None:
    """Success, handler failure, SLOW_PATH, an ``enter`` or ``leave`` that raises and a
    ``leave`` returning an awaitable: every layer sees the same hooks, the handler the same
    calls and the caller the same exception, inlined or called."""

    async def run(inline: bool) -> tuple[list[Counter[str]], int, str, int]:
        layers = [_Recorder(), _Recorder(mode), _Recorder()]
        calls = 0

        async def handler(payload: dict[str, Any]) -> None:
            nonlocal calls
            calls += 1
            if handler_fails:
                raise ConnectionError("down")

        call = Pipeline(*layers).build(handler, inline=inline)
        assert bool(_called(call)) is not inline
        try:
            await call(Delivery({"n": 1}))
            ended = "returned"
        except Exception as exc:
            ended = type(exc).__name__
        return [layer.calls for layer in layers], calls, ended, layers[1].finished

    inlined, called = await run(True), await run(False)
    assert inlined == called
    if mode == "awaitable leave" and not handler_fails:
        assert inlined[3] == 1  # the awaitable was awaited


def _scenarios() -> list[tuple[str, Any, str]]:
    """``(name, layer factory, case)`` for every built-in layer and the cases its hooks take."""
    return [
        ("retry", lambda c: Retry(attempts=3, wait=Fixed(0), clock=c), "flaky"),
        ("retry", lambda c: Retry(attempts=3, wait=Fixed(0), clock=c), "over the limit"),
        ("attempt timeout", lambda c: Timeout(1.0, clock=c), "ok"),
        ("attempt timeout", lambda c: Timeout(1.0, clock=c), "slow"),
        ("attempt timeout", lambda c: Timeout(1.0, clock=c), "swallows"),
        ("total timeout", lambda c: Timeout(1.0, total=True, clock=c), "slow"),
        ("total timeout", lambda c: Timeout(1.0, total=True, clock=c), "broken"),
        ("breaker", lambda c: CircuitBreaker("inline-diff", clock=c, mode="fail_fast"), "broken"),
        (
            "timed breaker",
            lambda c: CircuitBreaker(
                "inline-timed", clock=c, slow_call_duration=0.5, window=CountWindow(4)
            ),
            "slow",
        ),
        ("dead letter", lambda c: DeadLetterRouter(MemoryStore(), clock=c), "broken"),
        ("dead letter", lambda c: DeadLetterRouter(MemoryStore(), clock=c), "undecodable"),
        ("log context", lambda c: LogContext(), "broken"),
        ("telemetry", lambda c: Telemetry(traces=False, metrics=False), "flaky"),
    ]


@pytest.mark.parametrize(
    ("name", "factory", "case"),
    _scenarios(),
    ids=[f"{name}-{case}" for name, _, case in _scenarios()],
)
async def test_each_built_in_layer_behaves_the_same_inlined(
    name: str, factory: Any, case: str
) -> None:
    """Each built-in layer, inside a retry and with a second copy of itself, ends every
    delivery (success, failure, SLOW_PATH, timeout, swallowed timeout) exactly as the run
    that calls its hooks: same handler calls, exception, outcome, reason and clock."""

    async def run(inline: bool) -> tuple[int, str, Any, Any, float]:
        clock = FakeClock()
        calls = 0

        async def handler(payload: dict[str, Any]) -> None:
            nonlocal calls
            calls += 1
            if case == "broken" or (case == "flaky" and calls == 1):
                raise ConnectionError("down")
            if case in ("slow", "swallows") and calls == 1:
                try:
                    await clock.sleep(5.0)
                except asyncio.CancelledError:
                    if case == "slow":
                        raise

        outer = Retry(attempts=2, wait=Fixed(0), clock=clock)
        call = Pipeline(outer, factory(clock), factory(clock)).build(handler, inline=inline)
        count = 5 if case == "over the limit" else 1
        message = InboundMessage({"n": 1}, "k", "m-1", count, {})
        if case == "undecodable":
            message.decode_error = ValueError("not JSON")
        delivery = Delivery(message.payload, message)
        delivery.clock = clock
        task = asyncio.ensure_future(call(delivery))
        delivery.task = task
        for _ in range(100):
            await asyncio.sleep(0)
            if task.done():
                break
        try:
            await task
            ended = "returned"
        except Exception as exc:
            ended = type(exc).__name__
        return calls, ended, delivery.outcome, delivery.reason, clock.monotonic()

    assert await run(True) == await run(False)


class _Overridden(Timeout):
    """A timeout whose ``enter`` is replaced: the run must call the override."""

    entered: int = 0

    def enter(self, delivery: Delivery) -> Any:
        type(self).entered += 1
        return super().enter(delivery)


async def test_a_subclass_overriding_a_hook_is_called_not_inlined() -> None:
    """Only the exact function found on the layer's class is inlined: an override (here one
    using ``super()``) is called, and the inherited ``leave`` is still inlined."""
    call = Pipeline(_Overridden(1.0)).compile(_ok)
    assert _called(call) == {"e0"}
    await call(Delivery({"n": 1}))
    assert _Overridden.entered == 1


class _Complex(HookLayer):
    """A user layer whose hooks loop, build comprehensions and read a rebound global."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def enter(self, delivery: Delivery) -> Any:
        total = 0
        for value in delivery.payload.values():
            total += value
        return [total * _LIMIT for _ in range(2)]

    def leave(self, token: Any, delivery: Delivery) -> None:
        self.seen.extend(token)


async def test_a_user_layer_with_a_complex_body_still_works() -> None:
    """A hook with a loop, a comprehension and a global the module rebinds stays a call (its
    simple neighbour is inlined), and the layer works as written."""
    layer = _Complex()
    call = Pipeline(layer).compile(_ok)
    assert _called(call) == {"e0"}
    await call(Delivery({"a": 1, "b": 2}))
    assert layer.seen == [6, 6]


class _Hooked(HookLayer):
    """A layer with one hook of each kind the inliner must refuse or accept."""

    def __init__(self) -> None:
        self.log: list[str] = []

    def enter(self, delivery: Delivery) -> Any:
        try:
            rate = delivery.payload["rate"]
        except KeyError:
            return _RATE  # a return inside ``try``: the body becomes a ``while True`` block
        self.log.append("rated")
        return rate

    def leave(self, token: Any, delivery: Delivery) -> None:
        self.log.append(f"left {token} at {_LIMIT}")  # _LIMIT is rebound: not inlined


async def test_a_hook_the_inliner_rejects_falls_back_to_a_call() -> None:
    """A hook reading a module name bound twice is called (it sees the value at call time);
    its neighbour in the same layer, with a return inside ``try``, is inlined."""
    global _LIMIT
    layer = _Hooked()
    call = Pipeline(layer).compile(_ok)
    assert _called(call) == {"l0"}
    _LIMIT = 3
    try:
        await call(Delivery({"rate": 7}))
        await call(Delivery({}))
    finally:
        _LIMIT = 2
    assert layer.log == ["rated", "left 7 at 3", "left 1.0 at 3"]


def test_hooks_without_source_or_unsafe_shapes_are_not_inlined() -> None:
    """A hook defined with no source file, one using ``super()``, a closure, ``**kwargs`` or a
    private (mangled) attribute, or one replaced on the instance, stays a call."""
    namespace: dict[str, Any] = {"HookLayer": HookLayer}
    exec(
        textwrap.dedent(
            """
            class Sourceless(HookLayer):
                def enter(self, delivery):
                    return 1
            """
        ),
        namespace,
    )
    sourceless = namespace["Sourceless"]()
    factor = 2

    class Shapes(HookLayer):
        def enter(self, delivery: Delivery) -> Any:
            return factor  # a closure

        def leave(self, token: Any, delivery: Delivery) -> None:
            options: dict[str, Any] = {"sep": ""}
            print(token, **options)

    class Private(HookLayer):
        def __init__(self) -> None:
            self.__seen = 0

        def enter(self, delivery: Delivery) -> Any:
            self.__seen += 1  # ``self._Private__seen``: mangled only inside the class
            return self.__seen

    replaced = _Recorder()
    replaced.enter = lambda delivery: 1  # type: ignore[method-assign]
    for layer, name in [
        (sourceless, "enter"),
        (Shapes(), "enter"),
        (Shapes(), "leave"),
        (replaced, "enter"),
        (Private(), "enter"),
        (_Overridden(1.0), "enter"),
    ]:
        assert inline_hook(layer, name, ("delivery",), "t0", "_0e_") is None, (layer, name)
    assert inline_hook(_Recorder(), "enter", ("delivery",), "t0", "_0e_") is not None


async def test_compile_hooks_can_call_every_hook() -> None:
    """``compile_hooks(..., inline=False)`` binds every hook as a call; the default pastes
    the simple ones in; both end the delivery alike."""
    layer = _Recorder()

    async def below(delivery: Delivery) -> None:
        return None

    called = compile_hooks((layer,), below, inline=False)
    inlined = compile_hooks((layer,), below)
    assert _called(called) == {"e0", "l0"}
    assert _called(inlined) == set()
    await called(Delivery({}))
    await inlined(Delivery({}))
    assert layer.calls == Counter(enter=2, leave=2)
