"""Fixed configuration folded into inlined hook bodies: which reads of ``self`` are replaced by
their value when the pipeline is built, which tests are decided then, and that the folded run
behaves exactly as the run calling its hooks."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import pytest

from resilience._inline import Inlined, inline_hook
from resilience.breaker import CircuitBreaker
from resilience.budget import RetryBudget
from resilience.dead_letter import DeadLetterRouter, MemoryStore
from resilience.delivery import Delivery
from resilience.hooks import FixedAttributes, HookLayer, compile_hooks
from resilience.retry import Retry
from resilience.timeout import Timeout


def _enter(layer: object, name: str = "enter") -> Inlined:
    args = ("delivery",) if name == "enter" else ("t0", "delivery")
    inlined = inline_hook(layer, name, args, "t0" if name == "enter" else "pending", "_0e_")
    assert inlined is not None
    return inlined


def _source(layer: object, name: str = "enter") -> str:
    return "\n".join(_enter(layer, name).lines)


class _Probe:
    """A value whose truth is counted: a folded test must test it as often as the call."""

    def __init__(self, truth: bool) -> None:
        self.truth = truth
        self.tested = 0

    def __bool__(self) -> bool:
        self.tested += 1
        return self.truth


@dataclass(frozen=True)
class _Config(HookLayer):
    """A frozen dataclass layer (instance ``__dict__``) whose ``enter`` tests its fields."""

    flag: bool
    limit: int | None
    name: str
    marker: object

    def enter(self, delivery: Delivery) -> Any:
        calls: Any = delivery.payload["calls"]
        probe = delivery.payload["probe"]
        first = self.flag and calls.append("and")  # ``C and f()``: f only when C is true
        second = calls.append("or") or self.flag  # ``f() or C``: the value is C
        third = delivery.payload.get("x") or self.limit  # ``x or C`` keeps a true x
        fourth = self.limit if self.flag else self.name
        if not self.flag:
            calls.append("not flag")
        elif self.limit is None:
            calls.append("no limit")
        else:
            calls.append("limit")
        if probe or not self.flag:  # the probe's truth is tested once either way
            calls.append("probe or not flag")
        fifth = not (probe or self.flag)  # a value: the probe is tested twice when true
        if self.marker is not None and self.limit == 3:
            calls.append("marker and three")
        return (first, second, third, fourth, fifth, self.marker, self.name != "n")


@dataclass(frozen=True, slots=True)
class _Slotted(HookLayer):
    """A frozen, slotted dataclass layer: its fields are slots."""

    big: int
    ratio: float

    def enter(self, delivery: Delivery) -> Any:
        value = delivery.payload.get("value")
        return (value is self.big, value == self.big, self.ratio * 2)


class _Plain(HookLayer):
    """A layer with ordinary attributes: nothing is fixed, every read happens at each call."""

    def __init__(self) -> None:
        self.limit = 1
        self.tokens: list[str] = []

    def enter(self, delivery: Delivery) -> Any:
        if self.limit > 1:
            return "high"
        return "low"

    def leave(self, token: str, delivery: Delivery) -> None:
        self.tokens.append(token)


class _Declared(FixedAttributes, HookLayer):
    """A layer declaring one attribute fixed (written once), and one it may change."""

    __slots__ = ("mode", "seen")
    fixed_attributes = frozenset({"mode"})

    def __init__(self, mode: str | None) -> None:
        self.mode = mode
        self.seen = 0

    def enter(self, delivery: Delivery) -> Any:
        self.seen += 1
        if self.mode is None:
            return "no mode"
        return self.mode


class _Loose(_Declared):
    """Replaces the guarded ``__setattr__``: its declaration is no longer trusted."""

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)


@dataclass(frozen=True)
class _Unbound(HookLayer):
    """Reads a local before its only assignment on one path: that read must still raise."""

    limit: int

    def enter(self, delivery: Delivery) -> Any:
        if delivery.payload.get("early"):
            return cap  # type: ignore[has-type,used-before-def]  # noqa: F821
        cap = self.limit
        return cap


def _config_cases() -> list[_Config]:
    marker = object()
    return [
        _Config(flag, limit, name, mark)
        for flag in (True, False)
        for limit in (None, 0, 3)
        for name in ("n", "other")
        for mark in (marker, None)
    ]


@pytest.mark.parametrize("layer", _config_cases(), ids=repr)
@pytest.mark.parametrize("truth", [True, False])
@pytest.mark.parametrize("x", [None, 0, "given"])
def test_a_folded_body_returns_and_calls_exactly_what_the_hook_does(
    layer: _Config, truth: bool, x: Any
) -> None:
    """Every ``and`` / ``or`` / ``not`` / ``if`` / ``elif`` / conditional expression over the
    fields, folded, gives the hook's own value, calls and truth tests (short circuit kept)."""
    inlined = _enter(layer)
    source = "\n".join(inlined.lines)
    assert "_0e_self." not in source  # every field read is folded

    def run(enter: Any) -> tuple[Any, list[str], int]:
        calls: list[str] = []
        probe = _Probe(truth)
        delivery = Delivery({"calls": calls, "probe": probe, "x": x})
        return enter(delivery), calls, probe.tested

    namespace = dict(inlined.namespace)
    code = "def enter(delivery):\n" + "\n".join("    " + line for line in inlined.lines)
    code += "\n    return t0\n"
    exec(compile(code, "<folded>", "exec"), namespace)
    assert run(namespace["enter"]) == run(layer.enter)


def test_dead_branches_are_dropped_and_the_kept_ones_unwrapped() -> None:
    """A test decided at build time leaves only the branch taken, with no ``if`` around it."""
    source = _source(_Config(False, None, "n", None))
    assert "and'" not in source  # ``False and f()``: f is never called, nor written
    assert "'no limit'" not in source
    assert "'limit'" not in source
    assert "'marker and three'" not in source
    assert "calls.append('not flag')" in source
    assert "if not" not in source
    source = _source(_Config(True, 3, "n", object()))
    assert "'not flag'" not in source
    assert "'no limit'" not in source
    assert "calls.append('limit')" in source
    assert "_0e_calls.append('marker and three')" in source
    assert "if _0e_self_marker" not in source  # ``marker is not None`` decided


def test_fixed_reads_become_literals_or_the_very_object() -> None:
    """Literals are written in; any other value is a name bound to the same object; an
    identity comparison keeps the object even for a number."""
    marker = object()
    inlined = _enter(_Config(True, 3, "n", marker))
    assert inlined.namespace["_0e_self_marker"] is marker
    big = 10**6 + 1
    layer = _Slotted(big, 0.25)
    inlined = _enter(layer)
    source = "\n".join(inlined.lines)
    assert "* 2" in source
    assert "0.25 * 2" in source
    assert "== 1000001" in source
    assert "is _0e_self_big" in source
    assert inlined.namespace["_0e_self_big"] is big
    namespace = dict(inlined.namespace)
    code = "def enter(delivery):\n" + "\n".join("    " + line for line in inlined.lines)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ``x is 1000001`` would warn
        exec(compile(code + "\n    return t0\n", "<folded>", "exec"), namespace)
    assert namespace["enter"](Delivery({"value": big})) == (True, True, 0.5)
    assert layer.enter(Delivery({"value": big})) == (True, True, 0.5)


def test_the_built_in_layers_fold_their_configuration() -> None:
    """Timeout, retry, breaker and dead-letter routing read no configuration per message."""
    total = _source(Timeout(2.0, total=True))
    assert "_0e_self." not in total
    assert "+ 2.0" in total
    assert "if " + "_0e_limit is None or" in total  # the total branch, unwrapped
    attempt = _source(Timeout(2.0))
    assert "_0e_limit is not None and _0e_limit < _0e_deadline" in attempt
    assert "delivery.deadline = " not in attempt
    timeout = Timeout(1.0)
    assert _enter(timeout).namespace["_0e_self__watchdog"] is timeout._watchdog
    assert _enter(timeout).namespace["_0e_self_clock"] is timeout.clock
    assert _source(Retry(attempts=4)).splitlines() == [
        "if delivery.attempt > 4:",
        "    t0 = _0e_SLOW_PATH",
        "else:",
        "    t0 = None",
    ]
    budget = RetryBudget()
    with_budget = _enter(Retry(budget=budget))
    assert with_budget.namespace["_0e_self_budget"] is budget
    assert "is not None" not in "\n".join(with_budget.lines)
    breaker = CircuitBreaker("inline-fixed")
    enter = _enter(breaker)
    assert enter.namespace["_0e_self_breaker"] is breaker.breaker
    assert "_0e_self.breaker" not in "\n".join(enter.lines)
    assert "_0e_self.breaker" not in _source(breaker, "leave")
    assert "_validate" not in _source(DeadLetterRouter(MemoryStore()))
    validating = _source(DeadLetterRouter(MemoryStore(), validate=lambda payload: True))
    assert "_validate" not in validating
    assert "decode_error is not None or True:" in validating  # the message is still read


def test_an_attribute_that_is_not_fixed_is_read_at_each_call() -> None:
    """A plain attribute stays a read of the layer: a change after the build is seen."""
    layer = _Plain()
    assert "_0e_self.limit > 1" in _source(layer)
    assert "self.seen" in _source(_Declared("m"))  # declared layers fold only their names


async def test_a_change_to_a_plain_attribute_after_the_build_is_seen() -> None:
    layer = _Plain()

    async def below(delivery: Delivery) -> None:
        return None

    call = compile_hooks((layer,), below)
    await call(Delivery({}))
    layer.limit = 2
    await call(Delivery({}))
    assert layer.tokens == ["low", "high"]


def test_a_declared_fixed_attribute_cannot_change_after_it_is_written() -> None:
    """Assigning or deleting a declared attribute once written raises; others stay free."""
    layer = _Declared("m")
    layer.seen = 5
    with pytest.raises(AttributeError, match="fixed"):
        layer.mode = "other"
    with pytest.raises(AttributeError, match="fixed"):
        del layer.mode
    assert layer.mode == "m"
    breaker = CircuitBreaker("inline-fixed-guard")
    with pytest.raises(AttributeError, match="fixed"):
        breaker.breaker = CircuitBreaker("inline-fixed-other").breaker
    router = DeadLetterRouter(MemoryStore())
    with pytest.raises(AttributeError, match="fixed"):
        router._validate = lambda payload: True


def test_a_declared_attribute_is_folded_only_while_the_guard_is_in_place() -> None:
    assert _source(_Declared(None)).count("no mode") == 1
    assert "_0e_self.mode" not in _source(_Declared("m"))
    assert "'m'" in _source(_Declared("m"))
    loose = _Loose("m")
    loose.mode = "changed"  # its own __setattr__: nothing guards the name
    assert "_0e_self.mode" in _source(loose)


async def test_a_local_read_before_its_assignment_still_raises() -> None:
    """A local holding a fixed value is replaced only where its assignment came first."""
    layer = _Unbound(7)
    source = _source(layer)
    assert "return" not in source
    with pytest.raises(UnboundLocalError):
        layer.enter(Delivery({"early": True}))

    async def below(delivery: Delivery) -> None:
        return None

    for inline in (True, False):
        call = compile_hooks((layer,), below, inline=inline)
        with pytest.raises(UnboundLocalError):
            await call(Delivery({"early": True}))
        await call(Delivery({}))
