"""Attribute names, and the mapping of resilience events to span events and metric attributes.

The messaging attributes follow the OpenTelemetry semantic conventions (written out here, since
the library depends only on ``opentelemetry-api``); what they lack lives under ``resilience.``.

Breaker and dead-letter events come from :mod:`resilience.breaker` and
:mod:`resilience.dead_letter`, which this module does not import: they are recognised by class
name and read defensively (``BreakerOpened``, ``BreakerStateChanged(state=...)``,
``DeadLettered(reason=..., destination=...)`` and similar shapes), so telemetry keeps working
whatever fields those records grow.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry import trace

from ..events import AttemptFailed, MessageSettled, RetryScheduled
from ..logging import current_delivery

if TYPE_CHECKING:
    from opentelemetry.metrics import Counter

__all__ = [
    "ATTEMPT",
    "BREAKER_NAME",
    "BREAKER_PREVIOUS_STATE",
    "BREAKER_STATE",
    "BREAKER_STATE_VALUES",
    "CONSUMER_GROUP",
    "DEAD_LETTER_DESTINATION",
    "DEAD_LETTER_REASON",
    "DELIVERY_COUNT",
    "DESTINATION",
    "ERROR_TYPE",
    "EVENT_ATTEMPT_FAILED",
    "EVENT_BREAKER",
    "EVENT_DEAD_LETTERED",
    "EVENT_NOT_PERMITTED",
    "EVENT_RETRY",
    "MESSAGE_BODY_SIZE",
    "MESSAGE_ID",
    "LINK_KIND",
    "NEXT_ATTEMPT",
    "OPERATION_NAME",
    "OPERATION_TYPE",
    "OUTCOME",
    "REASON",
    "REPLAY_COUNT",
    "RETRY_WAIT",
    "SYSTEM",
    "VERDICT",
    "BreakerTransition",
    "EventRecorder",
    "breaker_transition",
    "dead_letter_attributes",
    "normalize_state",
]

# OpenTelemetry messaging semantic conventions
SYSTEM = "messaging.system"
OPERATION_TYPE = "messaging.operation.type"
OPERATION_NAME = "messaging.operation.name"
DESTINATION = "messaging.destination.name"
CONSUMER_GROUP = "messaging.consumer.group.name"
MESSAGE_ID = "messaging.message.id"
MESSAGE_BODY_SIZE = "messaging.message.body.size"
ERROR_TYPE = "error.type"

# The project's own
ATTEMPT = "resilience.attempt"
DELIVERY_COUNT = "resilience.delivery_count"
OUTCOME = "resilience.outcome"
REASON = "resilience.reason"
VERDICT = "resilience.verdict"
RETRY_WAIT = "resilience.retry.wait"
NEXT_ATTEMPT = "resilience.retry.next_attempt"
BREAKER_NAME = "resilience.breaker.name"
BREAKER_STATE = "resilience.breaker.state"
BREAKER_PREVIOUS_STATE = "resilience.breaker.previous_state"
DEAD_LETTER_REASON = "resilience.dead_letter.reason"
DEAD_LETTER_DESTINATION = "resilience.dead_letter.destination"
DEAD_LETTER_RECORD_ID = "resilience.dead_letter.record_id"
DEAD_LETTER_STAGE = "resilience.dead_letter.stage"
DEAD_LETTER_REPLAY_COUNT = "resilience.dead_letter.replay_count"
BREAKER_REASON = "resilience.breaker.reason"
REPLAY_COUNT = "resilience.replay_count"
LINK_KIND = "resilience.link"
BREAKER_HELD = "resilience.breaker.held"

# Span event names
EVENT_ATTEMPT_FAILED = "resilience.attempt.failed"
EVENT_RETRY = "resilience.retry.scheduled"
EVENT_BREAKER = "resilience.breaker.state_change"
EVENT_DEAD_LETTERED = "resilience.dead_lettered"
EVENT_NOT_PERMITTED = "resilience.breaker.not_permitted"

BREAKER_STATE_VALUES = {
    "closed": 0,
    "half_open": 1,
    "open": 2,
    "forced_open": 2,
    "forced_closed": 0,
}
"""What the ``resilience.breaker.state`` gauge reports: 0 closed, 1 half-open, 2 open (a
breaker forced open or closed by hand reports as open or closed)."""

_STATE_WORDS = {
    "closed": "closed",
    "close": "closed",
    "open": "open",
    "opened": "open",
    "halfopen": "half_open",
    "halfopened": "half_open",
    "half_open": "half_open",
    "half_opened": "half_open",
    "forced_open": "forced_open",
    "forcedopen": "forced_open",
    "forced_closed": "forced_closed",
    "forcedclosed": "forced_closed",
}
_STATE_FIELDS = ("state", "new_state", "to_state", "current", "to")
_PREVIOUS_FIELDS = ("previous", "previous_state", "old_state", "from_state", "old")
_NAME_FIELDS = ("name", "breaker", "breaker_name", "circuit")


def normalize_state(value: object) -> str | None:
    """A breaker state (enum, or text such as ``"HALF_OPEN"``) as a lower-case name.

    Args:
        value: The state.

    Returns:
        ``closed``, ``half_open``, ``open``, ``forced_open``, ``forced_closed``, or ``None``.
    """
    return _state(value)


def _state(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, enum.Enum):
        value = value.value if isinstance(value.value, str) else value.name
    if not isinstance(value, str):
        return None
    word = value.strip().lower().replace("-", "_").replace(" ", "_")
    return _STATE_WORDS.get(word) or _STATE_WORDS.get(word.replace("_", ""))


def _first(event: object, fields: tuple[str, ...]) -> object:
    for field in fields:
        value = getattr(event, field, None)
        if value is not None:
            return value
    return None


@dataclass(frozen=True, slots=True)
class BreakerTransition:
    """A circuit breaker changed state."""

    name: str
    state: str
    previous: str | None
    reason: str | None = None


def breaker_transition(event: object) -> BreakerTransition | None:
    """Read a breaker state change from an event of :mod:`resilience.breaker`.

    Args:
        event: Any event record.

    Returns:
        The transition, or ``None`` when ``event`` is not a breaker state change (for example a
        rejected call).
    """
    cls = type(event).__name__
    for prefix in ("CircuitBreaker", "Breaker", "Circuit"):
        if cls.startswith(prefix):
            suffix = cls[len(prefix) :]
            break
    else:
        return None
    state = _state(_first(event, _STATE_FIELDS))
    if state is None:
        state = _state(suffix)
    if state is None:
        return None
    previous = _state(_first(event, _PREVIOUS_FIELDS))
    name = _first(event, _NAME_FIELDS)
    reason = getattr(event, "reason", None)
    return BreakerTransition(
        str(name) if name is not None else "default",
        state,
        previous,
        reason if isinstance(reason, str) else None,
    )


def dead_letter_attributes(event: object) -> dict[str, Any] | None:
    """Span-event attributes for a dead-letter event of :mod:`resilience.dead_letter`.

    Args:
        event: Any event record.

    Returns:
        The attributes, or ``None`` when ``event`` does not record a completed dead-lettering
        (a failed write, for example).
    """
    cls = type(event).__name__
    if "DeadLetter" not in cls or any(w in cls for w in ("Fail", "Error", "Replay", "Skip")):
        return None
    attrs: dict[str, Any] = {}
    for field, key in (
        ("reason", DEAD_LETTER_REASON),
        ("destination", DEAD_LETTER_DESTINATION),
        ("envelope_id", DEAD_LETTER_RECORD_ID),
        ("record_id", DEAD_LETTER_RECORD_ID),
        ("stage", DEAD_LETTER_STAGE),
        ("error_type", ERROR_TYPE),
        ("replay_count", DEAD_LETTER_REPLAY_COUNT),
    ):
        value = getattr(event, field, None)
        if isinstance(value, str | int | float | bool) and key not in attrs:
            attrs[key] = value
    return attrs


class Counters(Protocol):
    """The counters an :class:`EventRecorder` adds to (the telemetry's instruments)."""

    @property
    def retries(self) -> Counter:
        """Scheduled retries."""
        ...

    @property
    def breaker_transitions(self) -> Counter:
        """Circuit-breaker state changes."""
        ...


class EventRecorder:
    """Event-bus listener: span events on the current span, and the event-driven metrics.

    Subscribed by :class:`~resilience.telemetry.Telemetry` to the consumer's bus. Events are
    emitted synchronously in the task processing the message, so the current span is that
    message's ``process`` span (or a span a middleware opened inside it).

    Args:
        instruments: Where to count retries and breaker transitions (``None``: no metrics).
        attributes: Attributes every retry count carries (system, consumer group).
    """

    __slots__ = ("attributes", "breakers", "instruments")

    def __init__(self, instruments: Counters | None, attributes: dict[str, Any]) -> None:
        self.instruments = instruments
        self.attributes = attributes
        self.breakers: dict[str, str] = {}
        """Last state seen per breaker name (read by the breaker-state gauge)."""

    def __call__(self, event: object) -> None:
        """Record ``event``; events of no interest cost one type check.

        Args:
            event: An event record from the bus.
        """
        cls = type(event)
        if cls is MessageSettled:
            return
        if isinstance(event, AttemptFailed):
            span = trace.get_current_span()
            if span.is_recording():
                span.add_event(
                    EVENT_ATTEMPT_FAILED,
                    {
                        ATTEMPT: event.attempt,
                        ERROR_TYPE: event.error_type,
                        VERDICT: event.verdict,
                        "exception.message": event.error[:1000],
                    },
                )
        elif isinstance(event, RetryScheduled):
            self._retry(event)
        elif not isinstance(event, MessageSettled):
            self._other(event)

    def _retry(self, event: RetryScheduled) -> None:
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(
                EVENT_RETRY,
                {
                    ATTEMPT: event.attempt,
                    NEXT_ATTEMPT: event.attempt + 1,
                    RETRY_WAIT: event.wait,
                    ERROR_TYPE: event.error_type,
                },
            )
        if self.instruments is not None:
            attrs = {**self.attributes, ERROR_TYPE: event.error_type}
            if event.key:
                attrs[DESTINATION] = event.key
            if CONSUMER_GROUP not in attrs:
                # No group configured: report the delivery's, as the other metrics do.
                delivery = current_delivery()
                group = delivery.group if delivery is not None else None
                if group is not None:
                    attrs[CONSUMER_GROUP] = group
            self.instruments.retries.add(1, attrs)

    def _other(self, event: object) -> None:
        transition = breaker_transition(event)
        if transition is not None:
            self._transition(transition)
            return
        if type(event).__name__ == "CallNotPermitted":
            span = trace.get_current_span()
            if span.is_recording():
                attrs: dict[str, Any] = {BREAKER_NAME: str(getattr(event, "name", "default"))}
                state = _state(getattr(event, "state", None))
                if state is not None:
                    attrs[BREAKER_STATE] = state
                held = getattr(event, "held", None)
                if isinstance(held, bool):
                    attrs[BREAKER_HELD] = held
                span.add_event(EVENT_NOT_PERMITTED, attrs)
            return
        dead_letter = dead_letter_attributes(event)
        if dead_letter is not None:
            span = trace.get_current_span()
            if span.is_recording():
                span.add_event(EVENT_DEAD_LETTERED, dead_letter)

    def _transition(self, transition: BreakerTransition) -> None:
        name = transition.name
        last = self.breakers.get(name)
        previous = transition.previous
        if previous is not None and last is not None and last != previous:
            # A change nobody told us about: a timer moved the breaker while the consumer's
            # bus had no listener (only deliveries' buses reach us then). Count it anyway.
            self._count(name, previous)
        self.breakers[name] = transition.state
        self._count(name, transition.state)
        span = trace.get_current_span()
        if span.is_recording():
            attrs: dict[str, Any] = {BREAKER_NAME: name, BREAKER_STATE: transition.state}
            if previous is not None:
                attrs[BREAKER_PREVIOUS_STATE] = previous
            if transition.reason is not None:
                attrs[BREAKER_REASON] = transition.reason
            span.add_event(EVENT_BREAKER, attrs)

    def _count(self, name: str, state: str) -> None:
        if self.instruments is not None:
            self.instruments.breaker_transitions.add(1, {BREAKER_NAME: name, BREAKER_STATE: state})
