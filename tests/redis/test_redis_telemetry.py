"""Trace context through a real Redis: publish → stream fields → process span → dead letter."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util._once import Once

from resilience.consumer import ResilientConsumer
from resilience.policy import Policy
from resilience.telemetry import publish_with_context
from resilience.testing import run_until_settled
from tests.redis.redis_support import MakeBackend, stream_entries

pytestmark = pytest.mark.broker


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """A global SDK tracer provider (restored afterwards) exporting to memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(otel_trace, "_TRACER_PROVIDER_SET_ONCE", Once())
    monkeypatch.setattr(otel_trace, "_TRACER_PROVIDER", None)
    otel_trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()


def _traceparent(span: ReadableSpan) -> str:
    context = span.get_span_context()
    assert context is not None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


async def test_trace_context_travels_through_redis_and_survives_dead_lettering(
    spans: InMemorySpanExporter, make_backend: MakeBackend, client: aioredis.Redis, prefix: str
) -> None:
    """publish_with_context stores traceparent in an h: field; each process span links to its
    producer span; the dead-letter entry keeps the producer's context and records the failed
    processing's."""
    stream = f"{prefix}s"
    backend = make_backend()
    tracer = otel_trace.get_tracer("test")
    with tracer.start_as_current_span("checkout"):
        ok_id = await publish_with_context(backend, stream, {"n": 1})
        bad_id = await publish_with_context(backend, stream, {"n": 2})
    sends = {
        dict(s.attributes or {})["messaging.message.id"]: s
        for s in spans.get_finished_spans()
        if s.kind is SpanKind.PRODUCER
    }
    assert set(sends) == {ok_id, bad_id}
    assert bad_id is not None
    ((_, fields),) = stream_entries(await client.xrange(stream, min=bad_id, max=bad_id))
    assert fields[b"h:traceparent"].decode() == _traceparent(sends[bad_id])

    async def handler(payload: dict[str, Any]) -> None:
        if payload["n"] == 2:
            raise ValueError("invalid order")

    policy = Policy.from_dict(
        {
            "retry": False,
            "classify": {"terminal": ["ValueError"]},
            "dead_letter": {"destination": "backend"},
            "telemetry": {},
        }
    )
    await run_until_settled(ResilientConsumer(backend, policy=policy), handler, 2)

    processed = {
        dict(s.attributes or {})["messaging.message.id"]: s
        for s in spans.get_finished_spans()
        if s.kind is SpanKind.CONSUMER
    }
    assert set(processed) == {ok_id, bad_id}
    for entry_id, span in processed.items():
        assert span.name == f"process {stream}"
        attrs = dict(span.attributes or {})
        assert attrs["messaging.system"] == "redis"
        assert attrs["messaging.consumer.group.name"] == "g"
        (link,) = span.links
        assert link.context.span_id == sends[entry_id].context.span_id
    assert processed[ok_id].status.status_code is StatusCode.UNSET
    assert processed[bad_id].status.status_code is StatusCode.ERROR

    ((_, dead),) = stream_entries(await client.xrange(f"{stream}.dlq"))
    assert dead[b"h:traceparent"].decode() == _traceparent(sends[bad_id])
    envelope = json.loads(dead[b"data"])
    assert envelope["trace"]["original"]["traceparent"] == _traceparent(sends[bad_id])
    assert envelope["trace"]["processing"]["span_id"] == (
        f"{processed[bad_id].context.span_id:016x}"
    )
    assert await backend.pending() == 0
