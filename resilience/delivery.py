"""The per-delivery object that middleware sees."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .events import EventBus, Outcome

if TYPE_CHECKING:
    from abe.backends.message_queue.base.extensions import InboundMessage

__all__ = ["Delivery", "FailureRecord"]

_NO_EVENTS = EventBus()


class FailureRecord:
    """Count and first/last time of one exception type on one message."""

    __slots__ = ("count", "first", "last", "message")

    def __init__(self, now: float, message: str) -> None:
        self.count = 1
        self.first = now
        self.last = now
        self.message = message

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"count": self.count, "first": self.first, "last": self.last}


class Delivery:
    """One delivery of one message travelling through the pipeline.

    Middleware reads and updates it; it is never shared between messages. The user's handler
    receives only :attr:`payload`.

    Attributes:
        payload: The message body handed to the handler.
        key: Source key, stream or queue.
        message_id: The broker's message id, when known.
        group: Consumer group.
        delivery_count: How often the broker has delivered the message (1 = first time).
        headers: Transport headers (``traceparent`` and friends).
        attempt: The current attempt number, starting at ``delivery_count`` so that the attempt
            limit also counts deliveries to processes that crashed.
        deadline: Monotonic time by which the message must be done (``None``: no deadline).
        started_at: Monotonic time processing started.
        outcome: Set by middleware that settles the message another way than success.
        reason: Why the message ended terminally (``retries_exhausted``, ``non_retryable``, ...).
        failures: Exception type name -> :class:`FailureRecord`, for dead-letter records.
        events: The bus of the consumer (or decorator) processing the message.
        message: The backend's delivery object when the backend supports settlement.
        extras: Free slot for middleware of users' own (created on first use).
    """

    __slots__ = (
        "attempt",
        "deadline",
        "delivery_count",
        "events",
        "extras",
        "failures",
        "group",
        "headers",
        "key",
        "message",
        "message_id",
        "outcome",
        "payload",
        "reason",
        "started_at",
    )

    def __init__(
        self,
        payload: dict[str, Any],
        *,
        key: str | None = None,
        message_id: str | None = None,
        group: str | None = None,
        delivery_count: int = 1,
        headers: Mapping[str, str] | None = None,
        started_at: float = 0.0,
        events: EventBus = _NO_EVENTS,
        message: InboundMessage | None = None,
    ) -> None:
        self.payload = payload
        self.key = key
        self.message_id = message_id
        self.group = group
        self.delivery_count = delivery_count
        self.headers: Mapping[str, str] = headers if headers is not None else {}
        self.attempt = delivery_count if delivery_count > 0 else 1
        self.deadline: float | None = None
        self.started_at = started_at
        self.outcome: Outcome | None = None
        self.reason: str | None = None
        self.failures: dict[str, FailureRecord] | None = None
        self.events = events
        self.message = message
        self.extras: dict[str, Any] | None = None

    @classmethod
    def from_message(
        cls, message: InboundMessage, *, started_at: float, events: EventBus = _NO_EVENTS
    ) -> Delivery:
        """Wrap a backend delivery."""
        return cls(
            message.payload,
            key=message.key,
            message_id=message.message_id,
            group=message.group,
            delivery_count=message.delivery_count,
            headers=message.headers,
            started_at=started_at,
            events=events,
            message=message,
        )

    @property
    def attempts_made(self) -> int:
        """Attempts made so far across deliveries (the current one included)."""
        return self.attempt

    def note_failure(self, exc: BaseException, now: float) -> None:
        """Add ``exc`` to the compact failure history."""
        name = type(exc).__qualname__
        if self.failures is None:
            self.failures = {}
        record = self.failures.get(name)
        if record is None:
            self.failures[name] = FailureRecord(now, str(exc))
        else:
            record.count += 1
            record.last = now
            record.message = str(exc)

    def remaining(self, now: float) -> float | None:
        """Seconds left before the deadline (``None`` without a deadline)."""
        return None if self.deadline is None else self.deadline - now

    def __repr__(self) -> str:
        return (
            f"Delivery(key={self.key!r}, message_id={self.message_id!r}, "
            f"attempt={self.attempt}, outcome={self.outcome})"
        )
