"""Publishing with the trace context in the message headers (W3C ``traceparent``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from abe.backends.message_queue.base.extensions import HeaderPublishingBackend

from .._version import __version__
from .events import (
    DESTINATION,
    ERROR_TYPE,
    MESSAGE_ID,
    OPERATION_NAME,
    OPERATION_TYPE,
    SYSTEM,
)
from .setup import SCHEMA_URL, messaging_system, tracing_configured

if TYPE_CHECKING:
    from opentelemetry.trace import Span

__all__ = ["inject_context", "publish_with_context"]

logger = logging.getLogger("resilience.telemetry")


def inject_context(headers: Mapping[str, str] | None = None) -> dict[str, str]:
    """Headers with the current trace context (W3C ``traceparent``/``tracestate``) added.

    Args:
        headers: Headers to start from (not modified).

    Returns:
        A new dict; without a current span it holds only ``headers`` (and baggage, if any).
    """
    carrier: dict[str, str] = dict(headers) if headers else {}
    propagate.inject(carrier)
    return carrier


async def publish_with_context(
    backend: Any,
    key: str,
    payload: dict[str, Any],
    *,
    headers: Mapping[str, str] | None = None,
    system: str | None = None,
) -> str | None:
    """Publish ``payload`` with the current trace context in its headers.

    With an OpenTelemetry SDK configured, the publish runs in a ``PRODUCER`` span ``send <key>``
    whose context is injected, so the consumer's ``process`` span links to it. Backends that
    cannot carry headers (no ``publish_message``) get a plain ``publish``: the context is lost.

    Args:
        backend: Any message-queue backend.
        key: Destination key.
        payload: The message body.
        headers: Extra headers to send along.
        system: ``messaging.system`` for the span (derived from the backend by default).

    Returns:
        The broker's message id when the backend reports one.

    Raises:
        Exception: whatever the backend's publish raises.
    """
    can_carry = isinstance(backend, HeaderPublishingBackend)
    span: Span | None = None
    token: object = None
    provider = trace.get_tracer_provider()
    if tracing_configured(provider):
        try:
            tracer = provider.get_tracer("resilience", __version__, schema_url=SCHEMA_URL)
            span = tracer.start_span(
                f"send {key}",
                kind=SpanKind.PRODUCER,
                attributes={
                    SYSTEM: system or messaging_system(backend),
                    OPERATION_TYPE: "send",
                    OPERATION_NAME: "send",  # the span is named "<operation name> <key>"
                    DESTINATION: key,
                },
            )
            token = otel_context.attach(trace.set_span_in_context(span))
        except Exception:
            logger.warning("Telemetry failed to start the publish span", exc_info=True)
    try:
        if can_carry:
            message_id: str | None = await backend.publish_message(
                key, payload, headers=inject_context(headers) or None
            )
        else:
            await backend.publish(key, payload)
            message_id = None
    except BaseException as exc:
        if span is not None:
            _end_publish_span(span, None, exc)
        raise
    else:
        if span is not None:
            _end_publish_span(span, message_id, None)
    finally:
        if token is not None:
            otel_context.detach(token)  # type: ignore[arg-type]
    return message_id


def _end_publish_span(span: Span, message_id: str | None, exc: BaseException | None) -> None:
    try:
        try:
            if message_id is not None:
                span.set_attribute(MESSAGE_ID, message_id)
            if exc is not None and not isinstance(exc, asyncio.CancelledError):
                span.set_attribute(ERROR_TYPE, type(exc).__qualname__)
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
        finally:
            span.end()
    except Exception:
        logger.warning("Telemetry failed to end the publish span", exc_info=True)
