"""The contenders of the overhead benchmark: how each consumer and wrapper is set up.

Each contender is a function ``setup(backend) -> (consumer, wrap)``: the consumer to run over
``backend`` and a function that wraps the benchmark's no-op handler (identity for the project's
own consumers, a peer library's retry or breaker for the others). Peers import lazily and raise
:class:`Unavailable` when missing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import tenacity

from abe.backends.message_queue.consumer import AsyncLoopConsumer
from abe.backends.message_queue.service.memory import MemoryBackend
from resilience.consumer import ResilientConsumer
from resilience.events import EventBus
from resilience.pipeline import Pipeline
from resilience.policy import Policy

from .policies import has_section

__all__ = [
    "CONTENDERS",
    "KEY",
    "Setup",
    "TaskPerMessage",
    "Unavailable",
    "full_pipeline_policy",
]

KEY = "bench.overhead"

logger = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[None]]
Wrap = Callable[[Handler], Handler]
Consumer = AsyncLoopConsumer
Setup = Callable[[MemoryBackend], tuple[Consumer, Wrap]]


class Unavailable(Exception):
    """A contender's library is not installed (or the project module has not landed)."""


def full_pipeline_policy(
    *, telemetry: bool = False, total_timeout: bool = False, log_context: bool = False
) -> Policy:
    """The default policy with every available section: dead-letter routing to the backend,
    a circuit breaker and (when ``telemetry``) the telemetry section, all at their defaults;
    ``total_timeout`` adds a whole-message limit (60 s) to the per-attempt one, ``log_context``
    the log-context layer (telemetry off)."""
    data: dict[str, Any] = {}
    if total_timeout:
        data["timeout"] = {"attempt": 10.0, "total": 60.0}
    if log_context:
        data["telemetry"] = {"enabled": False, "log_context": True}
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


def _total(concurrency: int) -> Setup:
    def setup(backend: MemoryBackend) -> tuple[Consumer, Wrap]:
        policy = full_pipeline_policy(total_timeout=True)
        return ResilientConsumer(backend, policy=policy, concurrency=concurrency), _same

    return setup


def _resilient_core_8(backend: MemoryBackend) -> tuple[Consumer, Wrap]:
    return ResilientConsumer(backend, policy=Policy(), concurrency=8), _same


def _resilient_listener(backend: MemoryBackend) -> tuple[Consumer, Wrap]:
    consumer = ResilientConsumer(backend, policy=full_pipeline_policy())
    consumer.events.subscribe(_ignore)
    return consumer, _same


def _ignore(event: object) -> None:
    return None


def _resilient_log_context(backend: MemoryBackend) -> tuple[Consumer, Wrap]:
    return ResilientConsumer(backend, policy=full_pipeline_policy(log_context=True)), _same


class TaskPerMessage(AsyncLoopConsumer):
    """A hand-written concurrent consumer: one task per message, at most ``concurrency`` at
    once (``asyncio.Semaphore`` + ``create_task``), the usual way to add concurrency to the
    published loop. The concurrent baseline."""

    def __init__(self, backend: MemoryBackend, concurrency: int) -> None:
        super().__init__(backend)
        self.concurrency = concurrency

    async def _consume(self, handler: Handler) -> None:
        slots = asyncio.Semaphore(self.concurrency)
        running: set[asyncio.Task[None]] = set()

        async def one(payload: dict[str, Any]) -> None:
            try:
                await handler(payload)
            except Exception:
                logger.exception("Error processing message")
            finally:
                slots.release()

        try:
            async for payload in self.backend.consume(group=self.group):
                await slots.acquire()
                task = asyncio.create_task(one(payload))
                running.add(task)
                task.add_done_callback(running.discard)
        finally:
            for task in list(running):
                task.cancel()


def _task_per_message(concurrency: int) -> Setup:
    def setup(backend: MemoryBackend) -> tuple[Consumer, Wrap]:
        return TaskPerMessage(backend, concurrency), _same

    return setup


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
        "pipeline+total timeout",
        "the full pipeline with a whole-message timeout too (the README's quick-start shape)",
        _total(1),
    ),
    _Contender(
        "pipeline+total timeout, concurrency 8",
        "the same with 8 workers",
        _total(8),
    ),
    _Contender(
        "pipeline+total timeout, concurrency 64",
        "the same with 64 workers",
        _total(64),
    ),
    _Contender(
        "Policy(), concurrency 8",
        "ResilientConsumer with Policy() as is and 8 workers",
        _resilient_core_8,
    ),
    _Contender(
        "pipeline+listener",
        "the full pipeline with a listener on the consumer's events (a settlement record per "
        "message)",
        _resilient_listener,
    ),
    _Contender(
        "pipeline+log context",
        "the full pipeline with the log-context layer ([telemetry] log_context, no SDK)",
        _resilient_log_context,
    ),
    _Contender(
        "task per message, concurrency 8",
        "hand-written concurrent consumer: asyncio.Semaphore(8) + create_task per message",
        _task_per_message(8),
    ),
    _Contender(
        "task per message, concurrency 64",
        "the same with Semaphore(64)",
        _task_per_message(64),
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
