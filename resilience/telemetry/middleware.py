"""OpenTelemetry traces and metrics for every message, following the messaging conventions.

:class:`Telemetry` is the outermost middleware. Per delivery it opens one ``CONSUMER`` span named
``process <destination>`` with the messaging attributes (``messaging.system``,
``messaging.operation.type`` = ``process``, destination, consumer group, message id) and the
project's own (``resilience.attempt``, ``resilience.delivery_count``, ``resilience.outcome``);
links it to (or parents it on) the producer's span read from the message's W3C ``traceparent``
header; adds a span event per failed attempt, scheduled retry, breaker state change and
dead-lettering; marks the span as an error only when the outcome is terminal; and records
``messaging.process.duration``. Log lines written meanwhile carry the message and trace ids
(:mod:`resilience.logging`).

Cost: the ``[telemetry]`` policy section decides when the pipeline is built. With no
OpenTelemetry SDK configured (``enabled = "auto"``, the default) it adds no layer at all, so
nothing is paid per message. With the SDK, most of the cost is the SDK's own span (and duration
record); what the instrumentation adds on top is measured by ``resilience bench overhead`` (see
``benchmarks/README.md``). Telemetry never
breaks a handler: a failing tracer, span processor or meter is logged, and the message goes on.

:func:`publish_with_context` publishes with the current trace context in the headers;
:func:`configure_otel` sets up the SDK with a console or OTLP exporter (for the command line).
"""

from __future__ import annotations

import logging
from contextvars import Token
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import Link, SpanKind

from .._version import __version__
from ..classify import Classifier, default_classifier
from ..clock import Clock, default_clock
from ..errors import ConfigError
from ..events import EventBus, Outcome
from ..hooks import HookLayer
from ..logging import _DELIVERY
from .events import (
    ATTEMPT,
    DEAD_LETTER_REASON,
    DELIVERY_COUNT,
    ERROR_TYPE,
    MESSAGE_BODY_SIZE,
    MESSAGE_ID,
    OUTCOME,
    EventRecorder,
)
from .metrics import Instruments, base_attributes, instruments_for
from .setup import SCHEMA_URL
from .spans import (
    OUTCOME_VALUES,
    Destination,
    close_terminal,
    context_from,
    settled_outcome,
)

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from abe.backends.message_queue.base.extensions import InboundMessage

    from ..delivery import Delivery
    from ..types import CallNext

__all__ = ["LINK_MODES", "Telemetry"]

LINK_MODES = ("link", "parent")
"""How a message's span relates to the producer's span: linked to it, or its child."""

_Token = tuple[Destination, "Span | None", object, "Token[Delivery | None]", float]

logger = logging.getLogger("resilience.telemetry")

# Read once: an ``Enum`` class attribute goes through ``EnumType``'s attribute hook each time.
_RETRIED = Outcome.RETRIED
_SUCCESS = Outcome.SUCCESS


class Telemetry(HookLayer):
    """Middleware: one CONSUMER span per delivery, span events, metrics and log context.

    Put it outermost (the policy's order 10). Instances hold metric counters and breaker states
    across messages; everything per message lives on the stack.

    Args:
        system: ``messaging.system`` (``"redis"``, ``"memory"``, ...).
        link_mode: ``"link"`` (default) links the span to the producer's span from the message
            headers; ``"parent"`` makes it the span's parent (one trace from publish to process).
        group: Consumer group reported when a delivery does not carry one.
        tracer_provider: Where spans go; the global provider when ``None``.
        meter_provider: Where metrics go; the global provider when ``None``.
        traces: Emit spans.
        metrics: Record metrics.
        events: The consumer's event bus. When it has listeners, this middleware listens
            along; otherwise each delivery gets a private bus that the middleware inside
            (retry, breaker, dead-letter) emit their events on, so the consumer does not build
            a settlement record per message just for telemetry.
        clock: Time source for ``messaging.process.duration``.
        classifier: Tells a dropped message (ignored failure) from a failed one.

    Raises:
        ConfigError: ``link_mode`` is not ``"link"`` or ``"parent"``.
    """

    __slots__ = (
        "__weakref__",
        "_bus",
        "_classifier",
        "_destinations",
        "_fault_counts",
        "_in_flight",
        "_instruments",
        "_joined",
        "_monotonic",
        "_parent",
        "_recorder",
        "_system",
        "_tracer",
        "group",
        "link_mode",
    )

    def __init__(
        self,
        *,
        system: str = "unknown",
        link_mode: str = "link",
        group: str | None = None,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        traces: bool = True,
        metrics: bool = True,
        events: EventBus | None = None,
        clock: Clock | None = None,
        classifier: Classifier | None = None,
    ) -> None:
        if link_mode not in LINK_MODES:
            raise ConfigError(f"link_mode must be one of link, parent; got {link_mode!r}")
        if not isinstance(system, str) or not system:
            raise ConfigError(f"system must be a non-empty string, got {system!r}")
        self._system = system
        self.link_mode = link_mode
        self._parent = link_mode == "parent"
        self.group = group
        self._classifier = classifier or default_classifier
        self._monotonic = (clock or default_clock).monotonic
        self._destinations: dict[Any, Destination] = {}
        self._in_flight = 0
        self._fault_counts: dict[str, int] = {}
        self._tracer: Tracer | None = None
        if traces:
            provider = tracer_provider or trace.get_tracer_provider()
            self._tracer = provider.get_tracer("resilience", __version__, schema_url=SCHEMA_URL)
        self._instruments: Instruments | None = None
        if metrics:
            self._instruments = instruments_for(meter_provider or _global_meters(), self)
        self._recorder = EventRecorder(self._instruments, base_attributes(system, group))
        # A private bus for deliveries whose own bus has no listener: subscribing to the
        # consumer's bus would make the consumer build a MessageSettled record per message.
        self._bus = EventBus(self._recorder)
        self._joined: tuple[EventBus, ...] = (self._bus,)
        if events is not None and events:
            self._subscribe(events)

    # -- the per-message path ------------------------------------------------------------------

    def enter(self, delivery: Delivery) -> _Token:
        """Open the delivery's span, make it current, and start the duration.

        Args:
            delivery: The message.

        Returns:
            What :meth:`leave` / :meth:`fail` need to close the span.
        """
        bus = delivery.events
        if bus is not self._bus:
            if not bus:
                delivery.events = self._bus  # nobody listens there: use ours
            elif bus not in self._joined:  # identity: EventBus has no __eq__
                self._subscribe(bus)  # someone listens there already: listen along
        message = delivery.message
        if message is not None:
            destination = self._destinations.get(message.key)
            if destination is None or destination.delivery_group != message.group:
                destination = self._destination(message.key, message.group)
        else:
            destination = self._destination(delivery.key, delivery.group)
        destination.consumed += 1
        span: Span | None = None
        token: object = None
        if self._tracer is not None:
            try:
                span, parent = self._start(delivery, message, destination)
                token = otel_context.attach(trace.set_span_in_context(span, parent))
            except Exception:
                self._fault("start the message span")
        log_token = _DELIVERY.set(delivery)
        self._in_flight += 1
        start = self._monotonic() if self._instruments is not None else 0.0
        return (destination, span, token, log_token, start)

    def leave(self, token: _Token, delivery: Delivery) -> None:
        """Close the span and record the duration of a call that returned.

        Args:
            token: What :meth:`enter` returned.
            delivery: The message.
        """
        destination, span, otel_token, log_token, start = token
        try:
            if delivery.outcome is not None:
                self._finish(delivery, destination, span, None, start)
            else:
                # The success path, inline: no terminal outcome, no error. Recorded while the
                # span is still current, so a histogram exemplar points at this trace.
                message = delivery.message
                attempt = delivery.attempt
                count = message.delivery_count if message is not None else delivery.delivery_count
                outcome = _RETRIED if attempt > count else _SUCCESS
                instruments = self._instruments
                try:
                    if span is not None:
                        try:
                            span.set_attributes(
                                {OUTCOME: OUTCOME_VALUES[outcome], ATTEMPT: attempt}
                            )
                        finally:
                            span.end()
                    if instruments is not None:
                        instruments.duration.record(
                            self._monotonic() - start, destination.outcome_attrs[outcome]
                        )
                except Exception:
                    self._fault("finish the message span or metrics")
        finally:
            self._exit(otel_token, log_token)

    async def fail(
        self, token: _Token, delivery: Delivery, exc: BaseException, call_next: CallNext
    ) -> None:
        """Close the span with the failure, and re-raise it.

        Args:
            token: What :meth:`enter` returned.
            delivery: The message.
            exc: What the rest of the pipeline raised.
            call_next: Unused.

        Raises:
            BaseException: ``exc``, unchanged.
        """
        destination, span, otel_token, log_token, start = token
        try:
            self._finish(delivery, destination, span, exc, start)
        finally:
            self._exit(otel_token, log_token)
        raise exc

    def _exit(self, otel_token: object, log_token: Token[Delivery | None]) -> None:
        self._in_flight -= 1
        _DELIVERY.reset(log_token)
        if otel_token is not None:
            otel_context.detach(otel_token)  # type: ignore[arg-type]

    def _subscribe(self, bus: EventBus) -> None:
        bus.subscribe(self._recorder)
        self._joined = (*self._joined, bus)

    def _destination(self, key: str | None, group: str | None) -> Destination:
        # Looked up by key on the hot path; several groups on one key fall back to (key, group).
        both = (key, group)
        destination = self._destinations.get(both)
        if destination is None:
            reported = group if group is not None else self.group
            destination = Destination(self._system, key or None, group, reported)
            self._destinations[both] = destination
            self._destinations.setdefault(key, destination)
        return destination

    def _start(
        self, delivery: Delivery, message: InboundMessage | None, destination: Destination
    ) -> tuple[Span, Context | None]:
        tracer = self._tracer
        assert tracer is not None
        attrs = destination.span_attrs.copy()
        if message is not None:
            message_id = message.message_id
            attrs[DELIVERY_COUNT] = message.delivery_count
            headers = message.headers
            size = message.body_size
            if size is None and message.raw is not None:  # raw: kept when decoding failed
                size = len(message.raw)
            if size is not None:
                attrs[MESSAGE_BODY_SIZE] = size
        else:
            message_id = delivery.message_id
            attrs[DELIVERY_COUNT] = delivery.delivery_count
            headers = delivery.headers
        if message_id is not None:
            attrs[MESSAGE_ID] = message_id
        links: list[Link] | None = None
        parent: Context | None = None
        if headers:
            parent, links = context_from(headers, attrs, self._parent)
        span = tracer.start_span(
            destination.span_name,
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attrs,
            links=links,
        )
        return span, parent

    def _finish(
        self,
        delivery: Delivery,
        destination: Destination,
        span: Span | None,
        exc: BaseException | None,
        start: float,
    ) -> None:
        try:
            outcome, error_type = settled_outcome(delivery, exc, self._classifier)
            if span is not None:
                try:
                    close_terminal(span, delivery, outcome, error_type, exc)
                finally:
                    span.end()
            instruments = self._instruments
            if instruments is not None:
                if error_type is None:
                    attrs = destination.outcome_attrs[outcome]
                else:
                    attrs = {**destination.outcome_attrs[outcome], ERROR_TYPE: error_type}
                instruments.duration.record(self._monotonic() - start, attrs)
                if outcome is Outcome.DUPLICATE:
                    instruments.duplicates.add(1, destination.metric_attrs)
                elif outcome is Outcome.DEAD_LETTERED:
                    instruments.dead_letters.add(
                        1,
                        {
                            **destination.metric_attrs,
                            DEAD_LETTER_REASON: delivery.reason or "unknown",
                        },
                    )
        except Exception:
            self._fault("finish the message span or metrics")

    # -- metric sources ------------------------------------------------------------------------

    def consumed_counts(self) -> list[tuple[dict[str, Any], int]]:
        """Messages handed to the pipeline so far, per destination and group.

        Returns:
            ``(attributes, cumulative count)`` pairs.
        """
        seen = {id(d): d for d in list(self._destinations.values())}
        return [(d.consumed_attrs, d.consumed) for d in seen.values()]

    def in_flight_attributes(self) -> tuple[dict[str, Any], int]:
        """Messages inside this middleware right now.

        Returns:
            ``(attributes, count)``.
        """
        return base_attributes(self._system, self.group), self._in_flight

    def breaker_states(self) -> list[tuple[str, str]]:
        """The last state of every breaker seen changing state.

        Returns:
            ``(name, state)`` pairs, state one of ``closed``, ``half_open``, ``open``.
        """
        return list(self._recorder.breakers.copy().items())

    @property
    def in_flight(self) -> int:
        """Messages being processed inside this middleware right now."""
        return self._in_flight

    def _fault(self, what: str) -> None:
        count = self._fault_counts.get(what, 0) + 1
        self._fault_counts[what] = count
        if count == 1 or count % 1000 == 0:
            logger.warning(
                "Telemetry failed to %s (%d time(s)); message processing goes on",
                what,
                count,
                exc_info=True,
            )

    def __repr__(self) -> str:
        return (
            f"Telemetry(system={self._system!r}, link_mode={self.link_mode!r}, "
            f"traces={self._tracer is not None}, metrics={self._instruments is not None})"
        )


def _global_meters() -> MeterProvider:
    return metrics.get_meter_provider()
