"""Span helpers of :class:`~resilience.telemetry.Telemetry`: per-destination constants, the
producer context from headers, and the final outcome and status of a process span."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ..classify import Classifier, Verdict
from ..errors import Unsettled
from ..events import Outcome
from .events import (
    ATTEMPT,
    CONSUMER_GROUP,
    DEAD_LETTER_REASON,
    DESTINATION,
    ERROR_TYPE,
    EVENT_DEAD_LETTERED,
    LINK_KIND,
    OPERATION_NAME,
    OPERATION_TYPE,
    OUTCOME,
    REASON,
    REPLAY_COUNT,
    SYSTEM,
)
from .metrics import base_attributes

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span

    from ..delivery import Delivery

__all__ = [
    "DEAD_LETTER_TRACEPARENT_HEADER",
    "OUTCOME_VALUES",
    "REPLAY_COUNT_HEADER",
    "Destination",
    "close_terminal",
    "context_from",
    "settled_outcome",
]

_TERMINAL = frozenset({Outcome.DEAD_LETTERED, Outcome.FAILED, Outcome.UNSETTLED})
OUTCOME_VALUES = {outcome: outcome.value for outcome in Outcome}
_W3C = TraceContextTextMapPropagator()

# Headers resilience.dead_letter's replay sets (kept in step by a test; importing that package
# here would load its sinks for every telemetry user).
DEAD_LETTER_TRACEPARENT_HEADER = "x-dead-letter-traceparent"
REPLAY_COUNT_HEADER = "x-replay-count"


class Destination:
    """Per-destination constants, built once: span name, attributes, metric attributes, count."""

    __slots__ = (
        "consumed",
        "consumed_attrs",
        "delivery_group",
        "metric_attrs",
        "outcome_attrs",
        "span_attrs",
        "span_name",
    )

    def __init__(
        self, system: str, key: str | None, delivery_group: str | None, group: str | None
    ) -> None:
        self.delivery_group = delivery_group
        # The conventions name the span "process <destination>", or just "process" when the
        # destination is unknown (a decorated function called directly).
        self.span_name = f"process {key}" if key else "process"
        self.span_attrs: dict[str, Any] = {
            SYSTEM: system,
            OPERATION_TYPE: "process",
            OPERATION_NAME: "process",
        }
        self.metric_attrs = base_attributes(system, group)
        if key:
            self.span_attrs[DESTINATION] = key
            self.metric_attrs[DESTINATION] = key
        if group is not None:
            self.span_attrs[CONSUMER_GROUP] = group
        # The conventions require messaging.operation.name on every messaging metric.
        self.consumed_attrs = {**self.metric_attrs, OPERATION_NAME: "process"}
        self.outcome_attrs = {
            outcome: {**self.metric_attrs, OPERATION_NAME: "process", OUTCOME: outcome.value}
            for outcome in Outcome
        }
        self.consumed = 0


def context_from(
    headers: Mapping[str, str], attrs: dict[str, Any], as_parent: bool
) -> tuple[Context | None, list[Link] | None]:
    """The producer's context from W3C headers, as the parent or as a link.

    A replayed dead letter also gets a link to the processing that dead-lettered it, and
    its replay count as an attribute (added to ``attrs``).

    Args:
        headers: The message headers (not empty).
        attrs: The span's start attributes.
        as_parent: Return the producer's context as parent instead of linking it.

    Returns:
        ``(parent context or None, links or None)``.
    """
    parent = None
    links = []
    extracted = propagate.extract(headers)
    producer = trace.get_current_span(extracted).get_span_context()
    if producer.is_valid:
        if as_parent:
            parent = extracted
        else:
            links.append(Link(producer))
    failed = headers.get(DEAD_LETTER_TRACEPARENT_HEADER)
    if failed:
        context = _W3C.extract({"traceparent": failed})
        processing = trace.get_current_span(context).get_span_context()
        if processing.is_valid:
            links.append(Link(processing, {LINK_KIND: "dead_lettered_processing"}))
    replays = headers.get(REPLAY_COUNT_HEADER)
    if replays and replays.isascii() and replays.isdigit() and len(replays) <= 9:
        attrs[REPLAY_COUNT] = int(replays)  # a malformed count is left out, never an error
    return parent, links or None


def settled_outcome(
    delivery: Delivery, exc: BaseException | None, classifier: Classifier
) -> tuple[Outcome, str | None]:
    """The outcome the consumer will settle ``delivery`` with, and ``error.type`` if terminal.

    Args:
        delivery: The message, after the rest of the pipeline ran.
        exc: What the rest of the pipeline raised, if anything.
        classifier: Tells an ignored failure (dropped) from a terminal one.

    Returns:
        ``(outcome, error type or None)``.
    """
    if exc is None:
        outcome = delivery.outcome
        if outcome is None:
            retried = delivery.attempt > _count(delivery)
            return (Outcome.RETRIED if retried else Outcome.SUCCESS), None
        if outcome in _TERMINAL:
            return outcome, _last_failure(delivery) or delivery.reason or "unknown"
        return outcome, None
    if isinstance(exc, asyncio.CancelledError):
        return Outcome.CANCELLED, None
    if isinstance(exc, Unsettled):
        return Outcome.UNSETTLED, type(exc).__qualname__
    if isinstance(exc, Exception) and classifier.classify(exc) is Verdict.IGNORED:
        return Outcome.DROPPED, None
    return Outcome.FAILED, type(exc).__qualname__


def close_terminal(
    span: Span,
    delivery: Delivery,
    outcome: Outcome,
    error_type: str | None,
    exc: BaseException | None,
) -> None:
    """Set the final attributes; for a terminal outcome also the error status and events.

    Args:
        span: The process span (not ended).
        delivery: The message.
        outcome: From :func:`settled_outcome`.
        error_type: From :func:`settled_outcome`.
        exc: The exception that escaped, if any (recorded as an ``exception`` event).
    """
    if error_type is None:
        span.set_attributes({OUTCOME: OUTCOME_VALUES[outcome], ATTEMPT: delivery.attempt})
        return
    attrs: dict[str, Any] = {
        OUTCOME: outcome.value,
        ATTEMPT: delivery.attempt,
        ERROR_TYPE: error_type,
    }
    if delivery.reason is not None:
        attrs[REASON] = delivery.reason
    span.set_attributes(attrs)
    if outcome is Outcome.DEAD_LETTERED and not any(
        event.name == EVENT_DEAD_LETTERED for event in getattr(span, "events", ())
    ):
        span.add_event(EVENT_DEAD_LETTERED, {DEAD_LETTER_REASON: delivery.reason or "unknown"})
    if exc is not None:
        span.record_exception(exc)
    description = delivery.reason or error_type
    if exc is not None:
        description = f"{description}: {exc}"
    span.set_status(Status(StatusCode.ERROR, description))


def _count(delivery: Delivery) -> int:
    message = delivery.message
    return message.delivery_count if message is not None else delivery.delivery_count


def _last_failure(delivery: Delivery) -> str | None:
    failures = delivery.failures
    if not failures:
        return None
    return max(failures.items(), key=lambda item: item[1].last)[0]
