"""The per-delivery object that middleware sees."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from abe.backends.message_queue.base.extensions import InboundMessage

from .events import EventBus, Outcome

if TYPE_CHECKING:
    from .clock import Clock

__all__ = ["Delivery", "FailureRecord", "new_delivery"]

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
    receives only :attr:`payload`. Broker metadata (:attr:`key`, :attr:`message_id`,
    :attr:`group`, :attr:`delivery_count`, :attr:`headers`) is read from :attr:`message`, the
    backend's :class:`~abe.backends.message_queue.base.InboundMessage`, so wrapping a delivery
    costs a handful of attribute writes on the hot path.

    Args:
        payload: The message body handed to the handler.
        message: The backend's delivery (``None`` for bare payloads from ``consume()``).
        started_at: Monotonic time processing started.
        events: The bus of the consumer (or decorator) processing the message.
        key: Source key, when there is no ``message`` to read it from.
        message_id: Message id, likewise.
        group: Consumer group, likewise.
        delivery_count: Broker delivery count, likewise.
        headers: Transport headers, likewise.

    Attributes:
        attempt: The current attempt number, starting at ``delivery_count`` so that the attempt
            limit also counts deliveries to processes that crashed.
        deadline: Monotonic time by which the message must be done (``None``: no deadline).
        outcome: Set by middleware that settles the message another way than success.
        reason: Why the message ended terminally (``retries_exhausted``, ``non_retryable``, ...).
        failures: Exception type name -> :class:`FailureRecord`, for dead-letter records.
        extras: Free slot for middleware of users' own (``None`` until used).
        task: The asyncio task processing the delivery, when the consumer knows it (saves
            timeouts an ``asyncio.current_task()`` call); ``None`` otherwise.
        now: A reading of :attr:`clock` taken just before the pipeline started on this
            delivery (the consumer's :attr:`started_at`), or ``None``. Only the ``enter`` hooks
            of the pipeline's outermost run of hooked layers may use it instead of reading the
            clock again (one clock read per message, shared); every other run clears it and
            :attr:`clock` first, so a layer entered after anything could have waited reads its
            clock itself.
        clock: The :class:`~resilience.clock.Clock` :attr:`now` was read from (``None``: no
            fresh reading); a layer uses :attr:`now` only when this is its own clock, so one
            test (``delivery.clock is self.clock``) tells. Set it only together with a reading
            in :attr:`now`, and clear it whenever the reading may be stale.
    """

    __slots__ = (
        "attempt",
        "clock",
        "deadline",
        "events",
        "extras",
        "failures",
        "message",
        "now",
        "outcome",
        "payload",
        "reason",
        "started_at",
        "task",
    )

    def __init__(
        self,
        payload: dict[str, Any],
        message: InboundMessage | None = None,
        started_at: float = 0.0,
        events: EventBus = _NO_EVENTS,
        *,
        key: str | None = None,
        message_id: str | None = None,
        group: str | None = None,
        delivery_count: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.payload = payload
        if message is None and (
            key is not None
            or message_id is not None
            or group is not None
            or delivery_count is not None
            or headers
        ):
            message = InboundMessage(
                payload,
                key or "",
                message_id,
                delivery_count if delivery_count is not None else 1,
                dict(headers) if headers else {},
                group=group,
            )
        self.message = message
        self.attempt = (
            1 if message is None or message.delivery_count < 1 else message.delivery_count
        )
        self.started_at = started_at
        self.events = events
        self.deadline: float | None = None
        self.outcome: Outcome | None = None
        self.reason: str | None = None
        self.failures: dict[str, FailureRecord] | None = None
        self.extras: dict[str, Any] | None = None
        self.task: asyncio.Task[Any] | None = None
        self.now: float | None = None
        self.clock: Clock | None = None

    @classmethod
    def from_message(
        cls, message: InboundMessage, *, started_at: float, events: EventBus = _NO_EVENTS
    ) -> Delivery:
        """Wrap a backend delivery."""
        return cls(message.payload, message, started_at, events)

    def _meta(self) -> InboundMessage:
        if self.message is None:
            self.message = InboundMessage(self.payload, "")
        return self.message

    @property
    def key(self) -> str | None:
        """Source key, stream or queue (``None`` when unknown)."""
        return self.message.key or None if self.message is not None else None

    @key.setter
    def key(self, value: str | None) -> None:
        self._meta().key = value or ""

    @property
    def message_id(self) -> str | None:
        """The broker's message id, when known."""
        return self.message.message_id if self.message is not None else None

    @message_id.setter
    def message_id(self, value: str | None) -> None:
        self._meta().message_id = value

    @property
    def group(self) -> str | None:
        """Consumer group."""
        return self.message.group if self.message is not None else None

    @group.setter
    def group(self, value: str | None) -> None:
        self._meta().group = value

    @property
    def delivery_count(self) -> int:
        """How often the broker has delivered the message (1 = first time)."""
        return self.message.delivery_count if self.message is not None else 1

    @delivery_count.setter
    def delivery_count(self, value: int) -> None:
        self._meta().delivery_count = value

    @property
    def headers(self) -> Mapping[str, str]:
        """Transport headers (``traceparent`` and friends); empty when none."""
        return self.message.headers if self.message is not None else {}

    @headers.setter
    def headers(self, value: Mapping[str, str]) -> None:
        self._meta().headers = value

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


_new = object.__new__


class _Maker:
    """Holds :func:`new_delivery` as a method, so that the consumer's worker loop can paste its
    body in (:func:`resilience._inline.inline_hook` reads a method of an object's class, as it
    does a layer's hook): the function below stays the one place a delivery is made fast."""

    __slots__ = ()

    def make(
        self,
        message: InboundMessage,
        started_at: float,
        events: EventBus,
        task: asyncio.Task[Any] | None,
        clock: Clock | None = None,
    ) -> Delivery:
        """``Delivery(message.payload, message, started_at, events)`` with ``task`` set, built
        without the constructor's argument handling (the consumer's hot path). With ``clock``,
        ``started_at`` is that clock's reading and is shared with the layers as
        :attr:`Delivery.now`.

        Args:
            message: The backend's delivery.
            started_at: Monotonic time processing started (a reading of ``clock``, if given).
            events: The bus of the consumer processing the message.
            task: The asyncio task processing it.
            clock: The clock ``started_at`` was read from (``None``: no shared reading).

        Returns:
            The delivery.
        """
        d: Delivery = _new(Delivery)
        d.payload = message.payload
        d.message = message
        count = message.delivery_count
        d.attempt = count if count > 0 else 1
        d.started_at = started_at
        d.events = events
        d.task = task
        d.now = started_at if clock is not None else None
        d.clock = clock
        d.deadline = None
        d.outcome = None
        d.reason = None
        d.failures = None
        d.extras = None
        return d


MAKER = _Maker()
"""The object whose ``make`` method is :func:`new_delivery` (the consumer pastes its body)."""

new_delivery = MAKER.make
"""``new_delivery(message, started_at, events, task, clock=None)``: :meth:`_Maker.make`, the
one implementation (the consumer's worker loop pastes its body in instead of calling it)."""
