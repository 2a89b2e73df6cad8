"""A pasted hook body pastes the bodies of the layer's own simple methods it calls as
statements (``self.m(a, b)``), and behaves exactly as the call would."""

from __future__ import annotations

from typing import Any

import pytest

from abe.backends.message_queue.base import InboundMessage
from resilience._inline import inline_hook
from resilience.delivery import Delivery, new_delivery
from resilience.events import EventBus
from resilience.hooks import FixedAttributes, HookLayer


class _Delegating(FixedAttributes, HookLayer):
    """An ``enter`` that hands parts of its work to other methods of the layer (its shape
    fixed, so the pasted body keeps only that shape's branch)."""

    fixed_attributes = frozenset({"shape"})

    def __init__(self, shape: str) -> None:
        self.shape = shape
        self.seen: list[Any] = []

    def enter(self, delivery: Delivery) -> Any:
        shape = self.shape
        if shape == "simple":
            self.note(delivery, "simple")
        elif shape == "keyword":
            self.note(delivery, label="keyword")
        elif shape == "expression":
            self.note(delivery, "ex" + "pression")
        elif shape == "value":
            kept = self.note(delivery, "value")
            self.seen.append(kept)
        elif shape == "loop":
            self.count(delivery)
        elif shape == "nested":
            self.outer(delivery)
        else:
            self.again(delivery)
        return len(self.seen)

    def note(self, delivery: Delivery, label: str) -> str:
        mark = f"{label}:{delivery.attempt}"
        if delivery.payload.get("fail"):
            raise ValueError(mark)
        self.seen.append(mark)
        return mark

    def count(self, delivery: Delivery) -> None:
        for key in delivery.payload:  # a loop: not pasted
            self.seen.append(key)

    def outer(self, delivery: Delivery) -> None:
        self.seen.append("outer")
        self.note(delivery, "inner")

    def again(self, delivery: Delivery) -> None:
        left = delivery.payload["left"]
        if left:
            delivery.payload["left"] = left - 1
            self.seen.append(left)
            self.again(delivery)


def _pasted(layer: _Delegating) -> tuple[str, Any]:
    inlined = inline_hook(layer, "enter", ("delivery",), "t0", "_0e_")
    assert inlined is not None
    body = "\n".join("    " + line for line in inlined.lines)
    scope: dict[str, Any] = dict(inlined.namespace)
    exec(f"def run(delivery):\n{body}\n    return t0\n", scope)
    return "\n".join(inlined.lines), scope["run"]


def _delivery(**payload: Any) -> Delivery:
    message = InboundMessage(dict(payload), "jobs", "7", 2)
    return new_delivery(message, 0.0, EventBus(), None)


@pytest.mark.parametrize(
    ("shape", "method", "pasted"),
    [
        ("simple", "note", True),
        ("nested", "outer", True),
        ("keyword", "note", False),
        ("expression", "note", False),
        ("value", "note", False),
        ("loop", "count", False),
    ],
)
@pytest.mark.parametrize("fail", [False, True])
def test_an_own_method_called_as_a_statement_is_pasted_and_behaves_as_the_call(
    shape: str, method: str, pasted: bool, fail: bool
) -> None:
    """``self.note(delivery, "simple")`` (names and literals, value unused) is ``note``'s body
    in the run, and a method it calls likewise; a call with keywords, an expression argument,
    a used value or a body the inliner rejects stays a call. Either way the run does what
    calling ``enter`` does: the same effects, result and exception."""
    called, inlined = _Delegating(shape), _Delegating(shape)
    source, run = _pasted(inlined)
    assert (f"_0e_self.{method}(" not in source) is pasted
    assert ("_0e_self.note(" not in source) is (shape in ("simple", "nested", "loop"))
    outcomes = []
    for layer, enter in ((called, called.enter), (inlined, run)):
        try:
            outcomes.append(("returned", enter(_delivery(fail=fail))))
        except ValueError as exc:
            outcomes.append(("raised", str(exc)))
        outcomes.append(("seen", layer.seen))
    assert outcomes[:2] == outcomes[2:]


def test_pasting_stops_at_the_nesting_limit_and_the_rest_is_a_call() -> None:
    """A method that calls itself is pasted a few levels deep, then called: the run still
    does exactly what the recursive call does."""
    called, inlined = _Delegating("recursive"), _Delegating("recursive")
    source, run = _pasted(inlined)
    assert source.count("left - 1") == 3
    assert source.count(".again(delivery)") == 1
    assert called.enter(_delivery(left=6)) == run(_delivery(left=6)) == 6
    assert called.seen == inlined.seen == [6, 5, 4, 3, 2, 1]
