"""Telemetry: CONSUMER spans, span events, metrics and trace-context propagation."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace as otel_trace
from opentelemetry.metrics import _internal as metrics_internal
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util._once import Once

from abe.backends.message_queue.service.memory import MemoryBackend
from resilience.clock import FakeClock
from resilience.consumer import ResilientConsumer
from resilience.errors import Drop
from resilience.events import EventBus
from resilience.pipeline import Pipeline
from resilience.policy import Policy, resilient
from resilience.telemetry import Telemetry, inject_context, publish_with_context
from resilience.testing import run_until_settled

_names = itertools.count()


@dataclass
class Otel:
    """An SDK tracer and meter provider installed as the global ones for one test."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader

    def finished(self, name: str | None = None) -> list[ReadableSpan]:
        """Finished spans, optionally only those called ``name``."""
        return [s for s in self.spans.get_finished_spans() if name is None or s.name == name]

    def points(self, metric: str) -> list[Any]:
        """Data points of ``metric`` from a fresh collection."""
        data = self.reader.get_metrics_data()
        found: list[Any] = []
        if data is None:
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for item in scope.metrics:
                    if item.name == metric:
                        found.extend(item.data.data_points)
        return found


def install(monkeypatch: pytest.MonkeyPatch, processor: Any = None) -> Otel:
    """Install fresh SDK providers as the globals (restored by ``monkeypatch``)."""
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(processor or SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    monkeypatch.setattr(otel_trace, "_TRACER_PROVIDER_SET_ONCE", Once())
    monkeypatch.setattr(otel_trace, "_TRACER_PROVIDER", None)
    monkeypatch.setattr(metrics_internal, "_METER_PROVIDER_SET_ONCE", Once())
    monkeypatch.setattr(metrics_internal, "_METER_PROVIDER", None)
    otel_trace.set_tracer_provider(tracer_provider)
    otel_metrics.set_meter_provider(meter_provider)
    return Otel(tracer_provider, meter_provider, spans, reader)


@pytest.fixture
def otel(monkeypatch: pytest.MonkeyPatch) -> Iterator[Otel]:
    """Global SDK providers with an in-memory span exporter and metric reader."""
    installed = install(monkeypatch)
    yield installed
    installed.tracer_provider.shutdown()
    installed.meter_provider.shutdown()


class Flaky:
    """Raises ``exc`` on the first ``failures`` calls, then succeeds."""

    def __init__(self, failures: int = 0, exc: BaseException | None = None) -> None:
        self.failures = failures
        self.exc = exc or ConnectionError("connection refused")
        self.calls = 0

    async def __call__(self, payload: dict[str, Any]) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc


async def consume(
    policy: dict[str, Any],
    handler: Any,
    payloads: Sequence[dict[str, Any]] = ({"order": 1},),
    *,
    group: str | None = "billing",
    clock: FakeClock | None = None,
) -> tuple[ResilientConsumer, MemoryBackend]:
    """Publish ``payloads`` on "orders", consume them all with ``policy``, stop."""
    backend = MemoryBackend.isolated()
    for payload in payloads:
        await backend.publish_message("orders", payload)
    consumer = ResilientConsumer(
        backend, group, policy=Policy.from_dict(policy), clock=clock or FakeClock()
    )
    await run_until_settled(consumer, handler, len(payloads))
    return consumer, backend


def events_of(span: ReadableSpan, name: str) -> list[dict[str, Any]]:
    """Attributes of the span's events called ``name``."""
    return [dict(e.attributes or {}) for e in span.events if e.name == name]


# -- spans -----------------------------------------------------------------------------------------


async def test_success_makes_one_consumer_span_with_messaging_attributes(otel: Otel) -> None:
    """A successful message gives one CONSUMER span named after its destination, unmarked."""
    await consume({"telemetry": {}}, Flaky())
    (span,) = otel.finished()
    assert span.name == "process orders"
    assert span.kind is SpanKind.CONSUMER
    attrs = dict(span.attributes or {})
    assert attrs == {
        "messaging.system": "memory",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "orders",
        "messaging.consumer.group.name": "billing",
        "messaging.message.id": "1",
        "resilience.delivery_count": 1,
        "resilience.outcome": "success",
        "resilience.attempt": 1,
    }
    assert span.status.status_code is StatusCode.UNSET
    assert not span.events
    assert span.parent is None


async def test_retried_message_shows_each_attempt_and_wait(otel: Otel) -> None:
    """Success after retries: one span, outcome retried, an event per failure and per wait."""
    clock = FakeClock()
    await consume({"retry": {"attempts": 5}, "telemetry": {}}, Flaky(2), clock=clock)
    (span,) = otel.finished()
    attrs = dict(span.attributes or {})
    assert attrs["resilience.outcome"] == "retried"
    assert attrs["resilience.attempt"] == 3
    assert "error.type" not in attrs
    assert span.status.status_code is StatusCode.UNSET
    failed = events_of(span, "resilience.attempt.failed")
    assert [e["resilience.attempt"] for e in failed] == [1, 2]
    assert {e["error.type"] for e in failed} == {"ConnectionError"}
    assert failed[0]["resilience.verdict"] == "retryable"
    retries = events_of(span, "resilience.retry.scheduled")
    assert [e["resilience.retry.wait"] for e in retries] == pytest.approx([0.1, 0.2])
    assert [e["resilience.retry.next_attempt"] for e in retries] == [2, 3]
    assert clock.sleeps == pytest.approx([0.1, 0.2])


async def test_dead_lettered_message_is_an_error_span_with_a_dead_letter_event(otel: Otel) -> None:
    """Dead-lettering is terminal: error status, error.type, reason and one dead-letter event."""
    policy = {"retry": {"attempts": 2}, "dead_letter": {"destination": "memory"}, "telemetry": {}}
    await consume(policy, Flaky(10))
    (span,) = otel.finished()
    attrs = dict(span.attributes or {})
    assert attrs["resilience.outcome"] == "dead_lettered"
    assert attrs["error.type"] == "ConnectionError"
    assert attrs["resilience.reason"] == "retries_exhausted"
    assert span.status.status_code is StatusCode.ERROR
    assert "retries_exhausted" in (span.status.description or "")
    (dead,) = events_of(span, "resilience.dead_lettered")
    assert dead["resilience.dead_letter.reason"] == "retries_exhausted"
    assert dead["resilience.dead_letter.destination"] == "memory"
    assert dead["resilience.dead_letter.record_id"]
    assert len(events_of(span, "resilience.attempt.failed")) == 2
    (point,) = otel.points("resilience.dead_letters")
    assert point.value == 1
    assert point.attributes["resilience.dead_letter.reason"] == "retries_exhausted"


async def test_failure_without_dead_letter_records_the_exception(otel: Otel) -> None:
    """A terminal failure escaping the pipeline: outcome failed, error status, exception event."""
    await consume({"retry": False, "telemetry": {}}, Flaky(1, ValueError("bad order")))
    (span,) = otel.finished()
    attrs = dict(span.attributes or {})
    assert attrs["resilience.outcome"] == "failed"
    assert attrs["error.type"] == "ValueError"
    assert span.status.status_code is StatusCode.ERROR
    (exception,) = events_of(span, "exception")
    assert exception["exception.type"] == "ValueError"
    assert exception["exception.message"] == "bad order"


async def test_dropped_message_is_not_an_error(otel: Otel) -> None:
    """A message the handler drops is acknowledged and its span is not marked as an error."""
    await consume({"telemetry": {}}, Flaky(1, Drop("duplicate")))
    (span,) = otel.finished()
    assert dict(span.attributes or {})["resilience.outcome"] == "dropped"
    assert span.status.status_code is StatusCode.UNSET


async def test_breaker_opening_and_rejections_appear_as_span_events(otel: Otel) -> None:
    """The span of the failure that trips the breaker carries the state change; later ones the
    rejection; the transition is counted and the state gauge reads open."""
    name = f"telemetry-{next(_names)}"
    policy = {
        "retry": False,
        "circuit_breaker": {"name": name, "mode": "fail_fast", "failure_threshold": 2},
        "telemetry": {},
    }
    await consume(policy, Flaky(10), [{"order": i} for i in range(3)])
    first, second, third = otel.finished()
    assert not events_of(first, "resilience.breaker.state_change")
    (change,) = events_of(second, "resilience.breaker.state_change")
    assert change["resilience.breaker.name"] == name
    assert change["resilience.breaker.state"] == "open"
    assert change["resilience.breaker.previous_state"] == "closed"
    (rejected,) = events_of(third, "resilience.breaker.not_permitted")
    assert rejected["resilience.breaker.name"] == name
    assert dict(third.attributes or {})["error.type"] == "CircuitOpen"
    transitions = [
        p
        for p in otel.points("resilience.breaker.transitions")
        if p.attributes["resilience.breaker.name"] == name
    ]
    assert [(p.attributes["resilience.breaker.state"], p.value) for p in transitions] == [
        ("open", 1)
    ]
    states = {
        p.attributes["resilience.breaker.name"]: p.value
        for p in otel.points("resilience.breaker.state")
    }
    assert states[name] == 2


async def test_cancelled_message_span_ends_unmarked_and_the_message_is_released(
    otel: Otel,
) -> None:
    """Shutdown cancels an in-flight message: its span ends with outcome cancelled, no error."""
    backend = MemoryBackend.isolated()
    await backend.publish_message("orders", {"order": 1})
    started = asyncio.Event()

    async def hang(payload: dict[str, Any]) -> None:
        started.set()
        await asyncio.Event().wait()

    consumer = ResilientConsumer(
        backend, policy=Policy.from_dict({"telemetry": {}}), drain_timeout=0
    )
    task = asyncio.create_task(consumer.run(hang))
    await started.wait()
    await consumer.shutdown()
    await asyncio.gather(task, return_exceptions=True)
    (span,) = otel.finished()
    assert dict(span.attributes or {})["resilience.outcome"] == "cancelled"
    assert span.status.status_code is StatusCode.UNSET
    assert backend.size("orders") == 1


async def test_concurrent_messages_get_spans_of_their_own(otel: Otel) -> None:
    """With concurrency, every message has its own span, ids and outcome."""
    backend = MemoryBackend.isolated()
    for i in range(6):
        await backend.publish_message("orders", {"order": i})

    async def handler(payload: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        if payload["order"] % 2:
            raise Drop("odd")

    consumer = ResilientConsumer(
        backend, policy=Policy.from_dict({"telemetry": {}}), concurrency=3, clock=FakeClock()
    )
    await run_until_settled(consumer, handler, 6)
    spans = otel.finished()
    by_id = {str(dict(s.attributes or {})["messaging.message.id"]): s for s in spans}
    assert sorted(by_id) == ["1", "2", "3", "4", "5", "6"]
    outcomes = {k: dict(s.attributes or {})["resilience.outcome"] for k, s in by_id.items()}
    assert outcomes == {
        "1": "success",
        "2": "dropped",
        "3": "success",
        "4": "dropped",
        "5": "success",
        "6": "dropped",
    }
    assert len({s.context.span_id for s in spans}) == 6


# -- metrics ---------------------------------------------------------------------------------------


async def test_metrics_count_messages_durations_and_retries(otel: Otel) -> None:
    """Duration histogram (virtual seconds), consumed counter with the attributes the
    conventions require, retries counter, in-flight gauge."""
    clock = FakeClock()
    handler = Flaky(2)
    consumer, _ = await consume(  # keep the consumer: observable counts live as long as it does
        {"retry": {"attempts": 5}, "telemetry": {}},
        handler,
        [{"order": 1}, {"order": 2}],
        clock=clock,
    )
    durations = {
        p.attributes["resilience.outcome"]: p for p in otel.points("messaging.process.duration")
    }
    assert durations["retried"].count == 1
    assert durations["retried"].sum == pytest.approx(0.3)
    assert durations["success"].count == 1
    assert durations["success"].sum == pytest.approx(0.0)
    retried = durations["retried"].attributes
    assert retried["messaging.system"] == "memory"
    assert retried["messaging.destination.name"] == "orders"
    assert retried["messaging.consumer.group.name"] == "billing"
    assert retried["messaging.operation.name"] == "process"
    (consumed,) = otel.points("messaging.client.consumed.messages")
    assert consumed.value == 2
    assert dict(consumed.attributes) == {
        "messaging.system": "memory",
        "messaging.operation.name": "process",
        "messaging.destination.name": "orders",
        "messaging.consumer.group.name": "billing",
    }
    (retries,) = otel.points("resilience.retries")
    assert retries.value == 2
    assert retries.attributes["error.type"] == "ConnectionError"
    (in_flight,) = otel.points("resilience.in_flight")
    assert in_flight.value == 0
    assert consumer.pipeline is not None


async def test_retries_carry_the_delivery_group_when_none_is_configured(otel: Otel) -> None:
    """Without a group given to the consumer, retries are counted under the group the backend
    delivered in, like the duration and consumed-messages metrics."""
    backend = MemoryBackend.isolated()
    await backend.publish_message("orders", {"order": 1})
    real_deliveries = backend.deliveries

    def in_group(*, group: str | None = None) -> Any:
        return real_deliveries(group="from-backend")

    backend.deliveries = in_group  # type: ignore[method-assign]
    policy = Policy.from_dict({"retry": {"attempts": 3}, "telemetry": {}})
    consumer = ResilientConsumer(backend, policy=policy, clock=FakeClock())
    await run_until_settled(consumer, Flaky(1), 1)
    (duration,) = otel.points("messaging.process.duration")
    (retries,) = otel.points("resilience.retries")
    assert duration.attributes["messaging.consumer.group.name"] == "from-backend"
    assert retries.attributes["messaging.consumer.group.name"] == "from-backend"


async def test_in_flight_gauge_counts_messages_being_processed(otel: Otel) -> None:
    """While a handler runs, the in-flight gauge reads 1."""
    seen: list[int] = []

    async def handler(payload: dict[str, Any]) -> None:
        seen.extend(p.value for p in otel.points("resilience.in_flight"))

    await consume({"telemetry": {}}, handler)
    assert seen == [1]


async def test_failed_message_duration_carries_error_type(otel: Otel) -> None:
    """The duration of a failed message is recorded with its error.type."""
    await consume({"retry": False, "telemetry": {}}, Flaky(1, ValueError("bad")))
    (point,) = otel.points("messaging.process.duration")
    assert point.attributes["error.type"] == "ValueError"
    assert point.attributes["resilience.outcome"] == "failed"


async def test_metrics_only_when_traces_are_off(otel: Otel) -> None:
    """traces = false keeps metrics and emits no span."""
    await consume({"telemetry": {"traces": False}}, Flaky())
    assert otel.finished() == []
    (point,) = otel.points("messaging.process.duration")
    assert point.count == 1


# -- trace context ---------------------------------------------------------------------------------


async def test_publish_then_consume_links_to_the_producer_span(otel: Otel) -> None:
    """publish_with_context sends traceparent from a PRODUCER span; the process span links it."""
    backend = MemoryBackend.isolated()
    tracer = otel.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("checkout"):
        message_id = await publish_with_context(backend, "orders", {"order": 1})
    (send,) = otel.finished("send orders")
    assert send.kind is SpanKind.PRODUCER
    assert dict(send.attributes or {})["messaging.message.id"] == message_id
    assert dict(send.attributes or {})["messaging.operation.type"] == "send"
    # the conventions name the span "<messaging.operation.name> <destination>"
    assert dict(send.attributes or {})["messaging.operation.name"] == "send"
    assert backend.peek("orders")[0].headers["traceparent"].split("-")[2] == (
        format(send.context.span_id, "016x")
    )
    consumer = ResilientConsumer(backend, policy=Policy.from_dict({"telemetry": {}}))
    await run_until_settled(consumer, Flaky(), 1)
    (process,) = otel.finished("process orders")
    (link,) = process.links
    assert link.context.span_id == send.context.span_id
    assert link.context.trace_id == send.context.trace_id
    assert process.context.trace_id != send.context.trace_id
    assert process.parent is None


async def test_parent_mode_continues_the_producer_trace(otel: Otel) -> None:
    """link_mode = "parent" makes the producer's span the process span's parent."""
    backend = MemoryBackend.isolated()
    with otel.tracer_provider.get_tracer("test").start_as_current_span("checkout"):
        await publish_with_context(backend, "orders", {"order": 1})
    consumer = ResilientConsumer(
        backend, policy=Policy.from_dict({"telemetry": {"link_mode": "parent"}})
    )
    await run_until_settled(consumer, Flaky(), 1)
    (send,) = otel.finished("send orders")
    (process,) = otel.finished("process orders")
    assert process.parent is not None
    assert process.parent.span_id == send.context.span_id
    assert process.context.trace_id == send.context.trace_id
    assert not process.links


async def test_handler_spans_are_children_of_the_process_span(otel: Otel) -> None:
    """Spans the handler opens are children of the message's process span."""
    tracer = otel.tracer_provider.get_tracer("handler")

    async def handler(payload: dict[str, Any]) -> None:
        with tracer.start_as_current_span("charge card"):
            pass

    await consume({"telemetry": {}}, handler)
    (child,) = otel.finished("charge card")
    (process,) = otel.finished("process orders")
    assert child.parent is not None
    assert child.parent.span_id == process.context.span_id


async def test_inject_context_adds_traceparent_and_keeps_headers(otel: Otel) -> None:
    """inject_context copies the given headers and adds the current span's traceparent."""
    given = {"x-tenant": "acme"}
    assert "traceparent" not in inject_context(given)
    with otel.tracer_provider.get_tracer("t").start_as_current_span("s") as span:
        headers = inject_context(given)
    assert headers["x-tenant"] == "acme"
    assert headers["traceparent"].split("-")[1] == format(span.get_span_context().trace_id, "032x")
    assert given == {"x-tenant": "acme"}


async def test_publish_without_header_support_falls_back_to_plain_publish(otel: Otel) -> None:
    """A backend with only publish() still gets the message (the trace context is lost)."""

    class PlainBackend:
        def __init__(self) -> None:
            self.published: list[tuple[str, dict[str, Any]]] = []

        async def publish(self, key: str, payload: dict[str, Any]) -> None:
            self.published.append((key, payload))

    backend = PlainBackend()
    assert await publish_with_context(backend, "orders", {"order": 1}) is None
    assert backend.published == [("orders", {"order": 1})]
    (send,) = otel.finished("send orders")
    assert dict(send.attributes or {})["messaging.system"] == "plain"


async def test_publish_failure_marks_the_producer_span(otel: Otel) -> None:
    """A publish that raises leaves an error PRODUCER span and the error propagates."""

    class Broken:
        async def publish_message(self, key: str, payload: Any, *, headers: Any = None) -> str:
            raise ConnectionError("broker down")

        async def publish(self, key: str, payload: Any) -> None:
            raise AssertionError("not used")

    with pytest.raises(ConnectionError):
        await publish_with_context(Broken(), "orders", {"order": 1})
    (send,) = otel.finished("send orders")
    assert send.status.status_code is StatusCode.ERROR
    assert dict(send.attributes or {})["error.type"] == "ConnectionError"


async def test_publish_without_sdk_still_sends_headers() -> None:
    """With no SDK, publish_with_context adds no span and no traceparent, and still publishes."""
    backend = MemoryBackend.isolated()
    message_id = await publish_with_context(backend, "orders", {"order": 1}, headers={"a": "b"})
    (message,) = backend.peek("orders")
    assert message.message_id == message_id
    assert dict(message.headers) == {"a": "b"}


# -- never breaks a handler ------------------------------------------------------------------------


class FailingExporter(SpanExporter):
    """An exporter whose every export raises."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        raise ConnectionError("collector unreachable")

    def shutdown(self) -> None:
        pass


class RaisingProcessor(SimpleSpanProcessor):
    """A span processor that raises when a span starts or ends."""

    def __init__(self, where: str) -> None:
        super().__init__(InMemorySpanExporter())
        self.where = where

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if self.where == "start":
            raise RuntimeError("processor broke on start")

    def on_end(self, span: ReadableSpan) -> None:
        if self.where == "end":
            raise RuntimeError("processor broke on end")


async def test_exporter_failure_is_logged_and_the_message_is_acked(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An exporter that raises is logged by the SDK; the handler runs and the message is acked."""
    install(monkeypatch, SimpleSpanProcessor(FailingExporter()))
    handler = Flaky()
    with caplog.at_level(logging.ERROR):
        _, backend = await consume({"telemetry": {}}, handler)
    assert handler.calls == 1
    assert backend.unacked() == []
    assert backend.size() == 0
    assert any("collector unreachable" in r.getMessage() or r.exc_info for r in caplog.records)


@pytest.mark.parametrize("where", ["start", "end"])
async def test_span_processor_failure_is_logged_not_raised(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    """A span processor raising on start or end is logged by telemetry; the message succeeds."""
    install(monkeypatch, RaisingProcessor(where))
    handler = Flaky()
    with caplog.at_level(logging.WARNING, logger="resilience.telemetry"):
        _, backend = await consume({"telemetry": {}}, handler, [{"a": 1}, {"a": 2}])
    assert handler.calls == 2
    assert backend.unacked() == []
    warnings = [r for r in caplog.records if r.name == "resilience.telemetry"]
    assert len(warnings) == 1  # logged once, not per message
    assert "Telemetry failed" in warnings[0].getMessage()
    assert "processing goes on" in warnings[0].getMessage()


# -- other ways in ---------------------------------------------------------------------------------


async def test_decorated_handler_gets_spans_and_retry_events(otel: Otel) -> None:
    """@resilient with telemetry traces calls of the decorated function, retries included."""
    clock = FakeClock()
    flaky = Flaky(1)

    @resilient(retry={"attempts": 3}, telemetry={"enabled": True}, clock=clock)
    async def handler(payload: dict[str, Any]) -> None:
        await flaky(payload)

    await handler({"order": 1})
    (span,) = otel.finished()
    assert span.name == "process"
    assert "messaging.destination.name" not in dict(span.attributes or {})
    assert dict(span.attributes or {})["resilience.outcome"] == "retried"
    assert len(events_of(span, "resilience.retry.scheduled")) == 1


async def test_telemetry_in_a_hand_built_pipeline_with_explicit_providers() -> None:
    """Telemetry takes its providers as arguments; no global SDK is needed."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    clock = FakeClock()
    bus = EventBus()
    telemetry = Telemetry(
        system="memory", tracer_provider=provider, meter_provider=meters, events=bus, clock=clock
    )
    backend = MemoryBackend.isolated()
    await backend.publish_message("orders", {"order": 1})
    consumer = ResilientConsumer(
        backend,
        policy=Pipeline(telemetry).retry(attempts=3, clock=clock),
        events=bus,
        clock=clock,
    )
    await run_until_settled(consumer, Flaky(1), 1)
    (span,) = exporter.get_finished_spans()
    assert dict(span.attributes or {})["resilience.outcome"] == "retried"
    assert len([e for e in span.events if e.name == "resilience.retry.scheduled"]) == 1
    assert telemetry.in_flight == 0
    meters.shutdown()
    provider.shutdown()


async def test_replayed_dead_letter_links_to_producer_and_failed_processing(otel: Otel) -> None:
    """A message replayed from the dead-letter store links to its producer and to the processing
    that dead-lettered it, and carries its replay count."""
    from resilience.dead_letter import DEAD_LETTER_TRACEPARENT_HEADER, REPLAY_COUNT_HEADER
    from resilience.dead_letter.replay import replay_headers

    policy = {"retry": False, "dead_letter": {"destination": "memory"}, "telemetry": {}}
    backend = MemoryBackend.isolated()
    with otel.tracer_provider.get_tracer("test").start_as_current_span("checkout"):
        await publish_with_context(backend, "orders", {"order": 1})
    consumer = ResilientConsumer(backend, policy=Policy.from_dict(policy), clock=FakeClock())
    await run_until_settled(consumer, Flaky(1, ValueError("bad")), 1)
    (send,) = otel.finished("send orders")
    (failed,) = otel.finished("process orders")
    assert consumer.pipeline is not None
    (router,) = [x for x in consumer.pipeline.layers if hasattr(x, "sink")]
    (envelope,) = router.sink.envelopes
    headers = replay_headers(envelope)
    assert headers[DEAD_LETTER_TRACEPARENT_HEADER].split("-")[2] == (
        format(failed.context.span_id, "016x")
    )
    await backend.publish_message("orders", envelope["payload"], headers=headers)
    await run_until_settled(ResilientConsumer(backend, policy=Policy.from_dict(policy)), Flaky(), 1)
    replayed = otel.finished("process orders")[1]
    assert {link.context.span_id for link in replayed.links} == {
        send.context.span_id,
        failed.context.span_id,
    }
    (kind,) = [link.attributes for link in replayed.links if link.attributes]
    assert dict(kind or {}) == {"resilience.link": "dead_lettered_processing"}
    assert dict(replayed.attributes or {})["resilience.replay_count"] == int(
        headers[REPLAY_COUNT_HEADER]
    )


def test_replay_header_names_match_the_dead_letter_module() -> None:
    """Telemetry's copies of the replay header names are the dead-letter module's."""
    from resilience.dead_letter import DEAD_LETTER_TRACEPARENT_HEADER, REPLAY_COUNT_HEADER
    from resilience.telemetry import spans as _telemetry_spans

    assert _telemetry_spans.DEAD_LETTER_TRACEPARENT_HEADER == DEAD_LETTER_TRACEPARENT_HEADER
    assert _telemetry_spans.REPLAY_COUNT_HEADER == REPLAY_COUNT_HEADER


async def test_body_size_is_reported_when_the_backend_knows_it(otel: Otel) -> None:
    """A delivery whose backend measured the encoded body gets messaging.message.body.size."""
    from abe.backends.message_queue.base.extensions import InboundMessage

    backend = MemoryBackend.isolated()
    backend.channel.put(InboundMessage({"order": 1}, "orders", "9", body_size=42))
    consumer = ResilientConsumer(
        backend, "billing", policy=Policy.from_dict({"telemetry": {}}), clock=FakeClock()
    )
    await run_until_settled(consumer, Flaky(), 1)
    (span,) = otel.finished()
    assert dict(span.attributes or {})["messaging.message.body.size"] == 42
