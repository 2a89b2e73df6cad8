"""Pipeline composition and the failure classifier."""

from __future__ import annotations

from typing import Any

import pytest

from resilience.classify import Classifier, Verdict, terminal_reason
from resilience.delivery import Delivery
from resilience.errors import (
    AttemptTimeout,
    CircuitOpen,
    DeadLetter,
    DeliveryLimitExceeded,
    Drop,
    RetryAfter,
    TotalTimeout,
)
from resilience.pipeline import CallNext, Pipeline


class Recorder:
    """Middleware that records entering and leaving."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    async def __call__(self, delivery: Delivery, call_next: CallNext) -> None:
        self.log.append(f"{self.name}>")
        await call_next(delivery)
        self.log.append(f"<{self.name}")


async def test_first_listed_is_outermost() -> None:
    """Layers wrap in listing order: the first one listed runs first and finishes last."""
    log: list[str] = []

    async def handler(payload: dict[str, Any]) -> None:
        log.append("handler")

    pipeline = Pipeline(Recorder("a", log)).use(Recorder("b", log)).use(Recorder("c", log))
    await pipeline.build(handler)(Delivery({}))
    assert log == ["a>", "b>", "c>", "handler", "<c", "<b", "<a"]


async def test_pipeline_is_frozen_after_build() -> None:
    """Adding middleware after build raises RuntimeError."""

    async def handler(payload: dict[str, Any]) -> None:
        return None

    pipeline = Pipeline()
    pipeline.build(handler)
    assert pipeline.frozen
    with pytest.raises(RuntimeError, match="frozen"):
        pipeline.use(Recorder("late", []))


async def test_plain_function_middleware_with_other_parameter_names() -> None:
    """A middleware function whose parameters have other names is linked too."""
    seen: list[Any] = []

    async def tag(d: Delivery, nxt: CallNext) -> None:
        d.payload["tagged"] = True
        await nxt(d)

    async def handler(payload: dict[str, Any]) -> None:
        seen.append(payload)

    await Pipeline(tag).build(handler)(Delivery({"x": 1}))  # type: ignore[arg-type]
    assert seen == [{"x": 1, "tagged": True}]


async def test_middleware_can_short_circuit() -> None:
    """A middleware that does not call call_next keeps the handler from running."""
    called = False

    async def handler(payload: dict[str, Any]) -> None:
        nonlocal called
        called = True

    async def reject(delivery: Delivery, call_next: CallNext) -> None:
        return None

    await Pipeline(reject).build(handler)(Delivery({}))
    assert not called


def test_non_callable_middleware_is_rejected() -> None:
    """use() refuses objects that are not callable."""
    with pytest.raises(TypeError, match="callable"):
        Pipeline().use("retry")  # type: ignore[arg-type]


def test_builder_methods_add_layers_in_order() -> None:
    """The builder reads like the policy and keeps its order."""
    pipeline = Pipeline().total_timeout(10).retry(attempts=2).timeout(1)
    assert [type(x).__name__ for x in pipeline.layers] == ["Timeout", "Retry", "Timeout"]
    assert pipeline.layers[0].total is True  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("exc", "verdict"),
    [
        (ConnectionError(), Verdict.RETRYABLE),
        (RetryAfter(1), Verdict.RETRYABLE),
        (CircuitOpen("db"), Verdict.RETRYABLE),
        (AttemptTimeout(1), Verdict.RETRYABLE),
        (DeadLetter(), Verdict.TERMINAL),
        (TotalTimeout(1), Verdict.TERMINAL),
        (DeliveryLimitExceeded(5, 3), Verdict.TERMINAL),
        (Drop(), Verdict.IGNORED),
    ],
)
def test_default_classification(exc: Exception, verdict: Verdict) -> None:
    """The default classifier retries ordinary errors and honours control exceptions."""
    assert Classifier().classify(exc) is verdict


def test_configured_types_and_predicates() -> None:
    """Predicates win over types; ignored beats terminal beats retryable."""

    def http(exc: BaseException) -> Verdict | None:
        status = getattr(exc, "status", None)
        if status is None:
            return None
        return Verdict.RETRYABLE if status >= 500 else Verdict.TERMINAL

    class HttpError(Exception):
        def __init__(self, status: int) -> None:
            self.status = status

    classifier = Classifier(
        retryable=(OSError,),
        terminal=(ValueError,),
        ignored=(KeyError,),
        predicates=(http,),
    )
    assert classifier.classify(HttpError(503)) is Verdict.RETRYABLE
    assert classifier.classify(HttpError(404)) is Verdict.TERMINAL
    assert classifier.classify(KeyError("x")) is Verdict.IGNORED
    assert classifier.classify(ValueError()) is Verdict.TERMINAL
    assert classifier.classify(ConnectionError()) is Verdict.RETRYABLE
    assert classifier.classify(RuntimeError()) is Verdict.TERMINAL  # not listed as retryable


def test_classifier_rejects_non_exception_types() -> None:
    """Classifier arguments must be exception types."""
    with pytest.raises(TypeError, match="exception types"):
        Classifier(retryable=("ConnectionError",))  # type: ignore[arg-type]


def test_terminal_reasons() -> None:
    """Each terminal cause maps to its dead-letter reason."""
    assert terminal_reason(DeadLetter(), Verdict.TERMINAL) == "rejected"
    assert terminal_reason(TotalTimeout(1), Verdict.TERMINAL) == "timeout"
    assert terminal_reason(DeliveryLimitExceeded(4, 3), Verdict.TERMINAL) == "delivery_limit"
    assert terminal_reason(ValueError(), Verdict.TERMINAL) == "non_retryable"
    assert terminal_reason(ConnectionError(), Verdict.RETRYABLE) == "retries_exhausted"


async def test_builder_adds_a_shared_circuit_breaker() -> None:
    """Pipeline.circuit_breaker() adds a breaker; two pipelines with one name share state."""
    from resilience.breaker import BreakerRegistry, CircuitBreaker
    from resilience.clock import FakeClock

    clock = FakeClock()
    registry = BreakerRegistry()
    first = CircuitBreaker("payments", clock=clock, registry=registry, failure_threshold=2)
    second = CircuitBreaker("payments", clock=clock, registry=registry, failure_threshold=2)
    pipeline = Pipeline().retry(attempts=2).circuit_breaker("payments-builder", failure_threshold=3)
    assert type(pipeline.layers[-1]).__name__ == "CircuitBreaker"
    first.force_open()
    assert second.state.value.startswith("forced")


def test_the_package_re_exports_the_everyday_names() -> None:
    """``from resilience import ...`` gives the same objects as their own modules."""
    import resilience
    from resilience.breaker import CircuitBreaker
    from resilience.consumer import ResilientConsumer
    from resilience.dead_letter import DeadLetterRouter
    from resilience.policy import Policy, resilient
    from resilience.retry import Retry

    assert resilience.ResilientConsumer is ResilientConsumer
    assert resilience.Policy is Policy
    assert resilience.Pipeline is Pipeline
    assert resilience.Retry is Retry
    assert resilience.CircuitBreaker is CircuitBreaker
    assert resilience.DeadLetterRouter is DeadLetterRouter
    assert resilience.resilient is resilient
