"""structlog configuration and the message / trace context on log lines."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace as otel_trace
from opentelemetry.metrics import _internal as metrics_internal
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

from abe.backends.message_queue.service.memory import MemoryBackend
from resilience.clock import FakeClock
from resilience.consumer import ResilientConsumer
from resilience.delivery import Delivery
from resilience.logging import (
    DeliveryContextFilter,
    LogContext,
    configure_logging,
    current_delivery,
)
from resilience.pipeline import Pipeline
from resilience.policy import Policy
from resilience.testing import run_until_settled


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """A global SDK tracer provider (no meter provider) exporting to memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(otel_trace, "_TRACER_PROVIDER_SET_ONCE", Once())
    monkeypatch.setattr(otel_trace, "_TRACER_PROVIDER", None)
    monkeypatch.setattr(metrics_internal, "_METER_PROVIDER_SET_ONCE", Once())
    monkeypatch.setattr(metrics_internal, "_METER_PROVIDER", None)
    otel_trace.set_tracer_provider(provider)
    assert otel_metrics.get_meter_provider() is not None
    yield exporter
    provider.shutdown()


@pytest.fixture
def out() -> io.StringIO:
    """Where configure_logging writes (JSON lines)."""
    stream = io.StringIO()
    configure_logging("json", stream=stream, level=logging.DEBUG)
    return stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """The JSON log lines written so far."""
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def ids(span: ReadableSpan) -> tuple[str, str]:
    """The span's trace and span id as log lines write them."""
    return format(span.context.trace_id, "032x"), format(span.context.span_id, "016x")


async def consume(
    policy: dict[str, Any], handler: Any, count: int = 1, **options: Any
) -> ResilientConsumer:
    """Publish ``count`` messages on "orders" and consume them with ``policy``."""
    backend = MemoryBackend.isolated()
    for i in range(count):
        await backend.publish_message("orders", {"order": i})
    consumer = ResilientConsumer(
        backend, policy=Policy.from_dict(policy), clock=FakeClock(), **options
    )
    await run_until_settled(consumer, handler, count)
    return consumer


async def test_log_lines_carry_message_attempt_and_trace_ids(
    spans: InMemorySpanExporter, out: io.StringIO
) -> None:
    """structlog and stdlib lines inside the pipeline carry message id, key, the current attempt
    and the process span's trace and span ids; so does the retry layer's own line."""
    calls = 0

    async def handler(payload: dict[str, Any]) -> None:
        nonlocal calls
        calls += 1
        structlog.get_logger("app").info("charging", amount=3)
        logging.getLogger("app.stdlib").warning("stdlib line %s", calls)
        if calls == 1:
            raise ConnectionError("card service down")

    await consume({"retry": {"attempts": 3}, "telemetry": {}}, handler)
    (span,) = spans.get_finished_spans()
    trace_id, span_id = ids(span)
    logged = lines(out)
    charging = [x for x in logged if x["event"] == "charging"]
    stdlib = [x for x in logged if x["event"].startswith("stdlib line")]
    (retry,) = [x for x in logged if x["event"] == "retry_scheduled"]
    assert [x["attempt"] for x in charging] == [1, 2]
    assert [x["attempt"] for x in stdlib] == [1, 2]
    for line in [*charging, *stdlib, retry]:
        assert line["message_id"] == "1"
        assert line["key"] == "orders"
        assert line["trace_id"] == trace_id
        assert line["span_id"] == span_id
    assert charging[0]["amount"] == 3
    assert charging[0]["level"] == "info"
    assert charging[0]["logger"] == "app"
    assert stdlib[1]["event"] == "stdlib line 2"
    assert stdlib[0]["level"] == "warning"
    assert "timestamp" in charging[0]


async def test_lines_in_a_handler_span_carry_that_span(
    spans: InMemorySpanExporter, out: io.StringIO
) -> None:
    """A line logged inside a span the handler opened carries the child span's id."""
    tracer = otel_trace.get_tracer("app")

    async def handler(payload: dict[str, Any]) -> None:
        with tracer.start_as_current_span("charge card"):
            structlog.get_logger("app").info("inside child")

    await consume({"telemetry": {}}, handler)
    (child,) = [s for s in spans.get_finished_spans() if s.name == "charge card"]
    (line,) = [x for x in lines(out) if x["event"] == "inside child"]
    assert (line["trace_id"], line["span_id"]) == ids(child)
    assert line["message_id"] == "1"


async def test_concurrent_messages_keep_their_own_context(
    spans: InMemorySpanExporter, out: io.StringIO
) -> None:
    """Interleaved messages each log their own message id and span id."""

    async def handler(payload: dict[str, Any]) -> None:
        for step in range(3):
            structlog.get_logger("app").info("step", step=step, order=payload["order"])
            await asyncio.sleep(0)

    await consume({"telemetry": {}}, handler, count=4, concurrency=4)
    by_id = {
        format(s.context.span_id, "016x"): dict(s.attributes or {})["messaging.message.id"]
        for s in spans.get_finished_spans()
    }
    steps = [x for x in lines(out) if x["event"] == "step"]
    assert len(steps) == 12
    for line in steps:
        assert line["message_id"] == str(line["order"] + 1)
        assert by_id[line["span_id"]] == line["message_id"]


async def test_outside_the_pipeline_lines_have_no_message_context(out: io.StringIO) -> None:
    """Without a message or span, no ids are added."""
    structlog.get_logger("app").info("idle")
    (line,) = [x for x in lines(out) if x["event"] == "idle"]
    assert not {"message_id", "key", "attempt", "trace_id", "span_id"} & set(line)


async def test_log_context_works_without_opentelemetry(out: io.StringIO) -> None:
    """With log_context = true and no SDK, lines still carry message id, key and attempt."""

    async def handler(payload: dict[str, Any]) -> None:
        assert current_delivery() is not None
        structlog.get_logger("app").info("no otel")

    await consume({"telemetry": {"log_context": True}}, handler)
    (line,) = [x for x in lines(out) if x["event"] == "no otel"]
    assert (line["message_id"], line["key"], line["attempt"]) == ("1", "orders", 1)
    assert "trace_id" not in line
    assert current_delivery() is None


async def test_log_context_middleware_resets_after_errors() -> None:
    """LogContext binds the delivery for the call only, also when the call raises."""
    delivery = Delivery({"order": 1}, key="orders", message_id="7")
    seen: list[Delivery | None] = []

    async def call_next(d: Delivery) -> None:
        seen.append(current_delivery())
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await LogContext()(delivery, call_next)
    assert seen == [delivery]
    assert current_delivery() is None


async def test_consumer_error_lines_render_as_json_with_the_traceback(
    spans: InMemorySpanExporter, out: io.StringIO
) -> None:
    """The consumer's own stdlib error line is rendered by the same handler, traceback included."""

    async def handler(payload: dict[str, Any]) -> None:
        raise ValueError("bad order")

    await consume({"retry": False, "telemetry": {}}, handler)
    (line,) = [x for x in lines(out) if x["logger"] == "resilience.consumer"]
    assert line["level"] == "error"
    assert "bad order" in line["event"]
    assert "ValueError: bad order" in line["exception"]


def test_console_format_is_readable_not_json() -> None:
    """The console renderer writes key=value text for people."""
    stream = io.StringIO()
    configure_logging("console", stream=stream)
    structlog.get_logger("demo").info("hello", order=5)
    text = stream.getvalue()
    assert "hello" in text
    assert "order=5" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_auto_format_is_json_when_not_a_terminal() -> None:
    """auto picks JSON for a stream that is not a terminal."""
    stream = io.StringIO()
    configure_logging("auto", stream=stream)
    structlog.get_logger("svc").warning("disk low", free=3)
    assert json.loads(stream.getvalue())["free"] == 3


def test_reconfiguring_replaces_the_handler_and_keeps_users_handlers() -> None:
    """A second call swaps its own handler; handlers users added keep receiving records."""
    received: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            received.append(record)

    root = logging.getLogger()
    mine = Collect()
    root.addHandler(mine)
    try:
        first = configure_logging("json", stream=io.StringIO())
        second = configure_logging("json", stream=io.StringIO())
        assert first not in root.handlers
        assert second in root.handlers
        assert mine in root.handlers
        structlog.get_logger("app").info("to everyone")
        logging.getLogger("abe").info("plain stdlib")
        assert [r.name for r in received] == ["app", "abe"]
    finally:
        root.removeHandler(mine)


def test_unknown_format_is_rejected() -> None:
    """An unknown format raises ValueError naming the choices."""
    with pytest.raises(ValueError, match="auto, json, console"):
        configure_logging("xml", stream=io.StringIO())  # type: ignore[arg-type]


async def test_stdlib_filter_fills_format_fields(spans: InMemorySpanExporter) -> None:
    """DeliveryContextFilter lets plain stdlib formats use %(message_id)s and %(trace_id)s."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(DeliveryContextFilter())
    handler.setFormatter(
        logging.Formatter("%(message_id)s %(key)s %(attempt)s %(trace_id)s %(message)s")
    )
    log = logging.getLogger("plain")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:

        async def work(payload: dict[str, Any]) -> None:
            log.info("inside")

        await consume({"telemetry": {}}, work)
        log.info("outside")
    finally:
        log.removeHandler(handler)
        log.propagate = True
    (span,) = spans.get_finished_spans()
    inside, outside = stream.getvalue().splitlines()
    assert inside == f"1 orders 1 {ids(span)[0]} inside"
    assert outside == "None None None None outside"


BUILDS = [
    pytest.param({"fuse": True, "inline": True}, id="inlined"),
    pytest.param({"fuse": True, "inline": False}, id="hooks-called"),
    pytest.param({"fuse": False, "inline": False}, id="linked"),
]


@pytest.mark.parametrize("build", BUILDS)
async def test_log_context_is_the_calls_only_and_its_child_tasks_keep_it(
    build: dict[str, bool],
) -> None:
    """The delivery is current for the call only (the caller's value comes back, also after
    nested calls and errors); a task the handler spawns keeps seeing it after the call ended."""
    outer = Delivery({"n": 1}, key="orders", message_id="outer")
    inner = Delivery({"n": 2}, key="orders", message_id="inner")
    seen: list[tuple[str, Delivery | None]] = []
    release = asyncio.Event()
    children: list[asyncio.Task[None]] = []

    async def child() -> None:
        await release.wait()
        seen.append(("child after the call", current_delivery()))

    async def inner_handler(payload: dict[str, Any]) -> None:
        seen.append(("inner", current_delivery()))
        if payload.get("fail"):
            raise ValueError("inner failed")

    inner_call = Pipeline(LogContext()).build(inner_handler, **build)

    async def outer_handler(payload: dict[str, Any]) -> None:
        seen.append(("outer", current_delivery()))
        children.append(asyncio.create_task(child()))
        await inner_call(inner)
        seen.append(("outer after inner", current_delivery()))
        failing = Delivery({"fail": True}, key="orders", message_id="failing")
        with pytest.raises(ValueError, match="inner failed"):
            await inner_call(failing)
        seen.append(("outer after a failed inner", current_delivery()))

    outer_call = Pipeline(LogContext()).build(outer_handler, **build)
    assert current_delivery() is None
    await outer_call(outer)
    assert current_delivery() is None
    release.set()
    await asyncio.gather(*children)
    assert [(where, d.message_id if d else None) for where, d in seen] == [
        ("outer", "outer"),
        ("inner", "inner"),
        ("outer after inner", "outer"),
        ("inner", "failing"),
        ("outer after a failed inner", "outer"),
        ("child after the call", "outer"),
    ]


async def test_consumer_tasks_spawned_per_message_keep_their_message() -> None:
    """With the log-context layer in a consumer, a task a handler spawns sees that handler's
    message even while the worker already processes the next one."""
    backend = MemoryBackend.isolated()
    for i in range(3):
        await backend.publish("orders", {"i": i})
    consumer = ResilientConsumer(
        backend, policy=Policy.from_dict({"telemetry": {"log_context": True}})
    )
    gate = asyncio.Event()
    seen: dict[int, str | None] = {}
    children: list[asyncio.Task[None]] = []

    async def child(i: int) -> None:
        await gate.wait()
        delivery = current_delivery()
        seen[i] = None if delivery is None else str(delivery.payload["i"])

    async def handler(payload: dict[str, Any]) -> None:
        children.append(asyncio.create_task(child(payload["i"])))

    await run_until_settled(consumer, handler, 3)
    gate.set()
    await asyncio.gather(*children)
    assert seen == {0: "0", 1: "1", 2: "2"}
