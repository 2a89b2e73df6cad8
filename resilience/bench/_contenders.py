"""The contenders of the overhead benchmark: how each consumer and wrapper is set up.

Each contender is a function ``setup(backend) -> (consumer, wrap)``: the consumer to run over
``backend`` and a function that wraps the benchmark's no-op handler (identity for the project's
own consumers, a peer library's retry or breaker for the others). Peers import lazily and raise
:class:`Unavailable` when missing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from abe.backends.message_queue.consumer import AsyncLoopConsumer
from abe.backends.message_queue.service.memory import MemoryBackend
from resilience.consumer import ResilientConsumer
from resilience.events import EventBus
from resilience.pipeline import Pipeline
from resilience.policy import Policy

from .policies import has_section

__all__ = ["CONTENDERS", "KEY", "Setup", "Unavailable", "full_pipeline_policy"]

KEY = "bench.overhead"

Handler = Callable[[dict[str, Any]], Awaitable[None]]
Wrap = Callable[[Handler], Handler]
Consumer = AsyncLoopConsumer
Setup = Callable[[MemoryBackend], tuple[Consumer, Wrap]]


class Unavailable(Exception):
    """A contender's library is not installed (or the project module has not landed)."""


def full_pipeline_policy(*, telemetry: bool = False) -> Policy:
    """The default policy with every available section: dead-letter routing to the backend,
    a circuit breaker and (when ``telemetry``) the telemetry section, all at their defaults."""
    data: dict[str, Any] = {}
    if has_section("dead_letter"):
        data["dead_letter"] = {"destination": "backend"}
    if has_section("circuit_breaker"):
        data["circuit_breaker"] = {}
    if telemetry:
        if not has_section("telemetry"):
            raise Unavailable("resilience.telemetry is not installed")
        data["telemetry"] = {}
    return Policy.from_dict(data)


def _same(handler: Handler) -> Handler:
    return handler


# -- contenders ---------------------------------------------------------------------------------


def _bare(backend: MemoryBackend) -> tuple[Consumer, Wrap]:
    return AsyncLoopConsumer(backend), _same


def _resilient_empty(backend: MemoryBackend) -> tuple[Consumer, Wrap]:
    return ResilientConsumer(backend, policy=Pipeline()), _same


def _resilient_core(backend: MemoryBackend) -> tuple[Consumer, Wrap]:
    return ResilientConsumer(backend, policy=Policy()), _same


def _resilient(backend: MemoryBackend) -> tuple[Consumer, Wrap]:
    return ResilientConsumer(backend, policy=full_pipeline_policy()), _same


def _resilient_telemetry(backend: MemoryBackend) -> tuple[Consumer, Wrap]:
    return ResilientConsumer(backend, policy=full_pipeline_policy(telemetry=True)), _same


def _sdk() -> tuple[Any, Any]:
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            SimpleSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )
    except ImportError as exc:
        raise Unavailable(f"opentelemetry-sdk is not installed ({exc})") from None

    class _NoopExporter(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(_NoopExporter()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    return tracer_provider, meter_provider


def _resilient_sdk(backend: MemoryBackend, *, metrics: bool = True) -> tuple[Consumer, Wrap]:
    try:
        from resilience.telemetry import Telemetry
    except ImportError as exc:
        raise Unavailable(f"resilience.telemetry is not installed ({exc})") from None
    tracer_provider, meter_provider = _sdk()
    bus = EventBus()
    layers = full_pipeline_policy().layers(backend=backend, events=bus)
    telemetry = Telemetry(
        system="memory",
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        metrics=metrics,
        events=bus,
    )
    pipeline = Pipeline(telemetry, *layers)
    return ResilientConsumer(backend, policy=pipeline, events=bus), _same


def _resilient_sdk_traces(backend: MemoryBackend) -> tuple[Consumer, Wrap]:
    return _resilient_sdk(backend, metrics=False)


_SPAN_ATTRIBUTES = {
    "messaging.system": "memory",
    "messaging.operation.type": "process",
    "messaging.operation.name": "process",
    "messaging.destination.name": KEY,
}
_METRIC_ATTRIBUTES = {
    "messaging.system": "memory",
    "messaging.operation.name": "process",
    "messaging.destination.name": KEY,
    "outcome": "success",
}


def _span(backend: MemoryBackend, *, histogram: bool = False) -> tuple[Consumer, Wrap]:
    import time

    from opentelemetry.trace import SpanKind

    tracer_provider, meter_provider = _sdk()
    start = tracer_provider.get_tracer("bench").start_as_current_span
    name = f"process {KEY}"
    record = (
        meter_provider.get_meter("bench")
        .create_histogram("messaging.process.duration", unit="s")
        .record
    )
    monotonic = time.monotonic

    def wrap(inner: Handler) -> Handler:
        async def handler(payload: dict[str, Any]) -> None:
            with start(name, kind=SpanKind.CONSUMER, attributes=_SPAN_ATTRIBUTES):
                await inner(payload)

        async def timed(payload: dict[str, Any]) -> None:
            with start(name, kind=SpanKind.CONSUMER, attributes=_SPAN_ATTRIBUTES):
                began = monotonic()
                await inner(payload)
                record(monotonic() - began, _METRIC_ATTRIBUTES)

        return timed if histogram else handler

    return AsyncLoopConsumer(backend), wrap


def _span_histogram(backend: MemoryBackend) -> tuple[Consumer, Wrap]:
    return _span(backend, histogram=True)


def _tenacity(backend: MemoryBackend) -> tuple[Consumer, Wrap]:
    import tenacity

    def wrap(inner: Handler) -> Handler:
        async def handler(payload: dict[str, Any]) -> None:
            async for attempt in tenacity.AsyncRetrying(
                stop=tenacity.stop_after_attempt(3),
                wait=tenacity.wait_exponential(multiplier=0.1, max=30),
                reraise=True,
            ):
                with attempt:
                    await inner(payload)

        return handler

    return AsyncLoopConsumer(backend), wrap


def _stamina(backend: MemoryBackend) -> tuple[Consumer, Wrap]:
    try:
        import stamina
    except ImportError as exc:
        raise Unavailable(f"stamina is not installed ({exc})") from None

    def wrap(inner: Handler) -> Handler:
        wrapped: Handler = stamina.retry(on=Exception, attempts=3)(inner)
        return wrapped

    return AsyncLoopConsumer(backend), wrap


def _aiobreaker(backend: MemoryBackend) -> tuple[Consumer, Wrap]:
    try:
        import aiobreaker
    except ImportError as exc:
        raise Unavailable(f"aiobreaker is not installed ({exc})") from None
    breaker = aiobreaker.CircuitBreaker(fail_max=5, timeout_duration=timedelta(seconds=10))

    def wrap(inner: Handler) -> Handler:
        async def handler(payload: dict[str, Any]) -> None:
            await breaker.call_async(inner, payload)

        return handler

    return AsyncLoopConsumer(backend), wrap


def _purgatory(backend: MemoryBackend) -> tuple[Consumer, Wrap]:
    try:
        import purgatory
    except ImportError as exc:
        raise Unavailable(f"purgatory is not installed ({exc})") from None
    factory = purgatory.AsyncCircuitBreakerFactory(default_threshold=5, default_ttl=10)

    def wrap(inner: Handler) -> Handler:
        async def handler(payload: dict[str, Any]) -> None:
            async with await factory.get_breaker("bench"):
                await inner(payload)

        return handler

    return AsyncLoopConsumer(backend), wrap


@dataclass(frozen=True, slots=True)
class _Contender:
    name: str
    description: str
    setup: Setup


CONTENDERS: tuple[_Contender, ...] = (
    _Contender("bare", "AsyncLoopConsumer over MemoryBackend (the published consumer)", _bare),
    _Contender(
        "resilient, no middleware",
        "ResilientConsumer with an empty pipeline: delivery objects and acks only",
        _resilient_empty,
    ),
    _Contender(
        "resilient, retry+timeout",
        "ResilientConsumer with Policy() as is: retry and per-attempt timeout",
        _resilient_core,
    ),
    _Contender(
        "pipeline",
        "ResilientConsumer, full default pipeline (retry, timeout, breaker, dead-letter), "
        "at-least-once acks, no telemetry",
        _resilient,
    ),
    _Contender(
        "pipeline+telemetry (no SDK)",
        "the same with the [telemetry] section and no OpenTelemetry SDK configured",
        _resilient_telemetry,
    ),
    _Contender(
        "pipeline+telemetry (SDK)",
        "the same with tracing and metrics on an SDK with a no-op exporter",
        _resilient_sdk,
    ),
    _Contender(
        "pipeline+telemetry (SDK, traces only)",
        "the same with metrics off: what the spans alone cost",
        _resilient_sdk_traces,
    ),
    _Contender("bare+otel span", "bare consumer, one SDK CONSUMER span with attributes", _span),
    _Contender(
        "bare+otel span+histogram",
        "the same span plus one SDK duration histogram record (four attributes) inside it: "
        "the same two signals instrumented by hand",
        _span_histogram,
    ),
    _Contender(
        "bare+tenacity", "bare consumer, handler wrapped per call in AsyncRetrying", _tenacity
    ),
    _Contender("bare+stamina", "bare consumer, handler decorated with stamina.retry", _stamina),
    _Contender("bare+aiobreaker", "bare consumer, handler called through aiobreaker", _aiobreaker),
    _Contender("bare+purgatory", "bare consumer, handler inside a purgatory breaker", _purgatory),
)
