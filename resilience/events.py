"""Frozen event records and the hook bus that carries them.

Observability (telemetry, logs, the demo's summary, users' own hooks) subscribes to an
:class:`EventBus`. Emitting costs one truth test when nobody listens. A listener that raises is
logged and never breaks message processing.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

__all__ = [
    "AttemptFailed",
    "Event",
    "EventBus",
    "MessageSettled",
    "Outcome",
    "RetryScheduled",
    "SettledFields",
    "new_record",
]

logger = logging.getLogger(__name__)


class Outcome(enum.Enum):
    """How processing of one delivery ended."""

    SUCCESS = "success"
    """The handler succeeded on its first attempt; acknowledged."""
    RETRIED = "retried"
    """The handler succeeded after one or more retries; acknowledged."""
    DEAD_LETTERED = "dead_lettered"
    """Terminal failure, written to the dead-letter destination; acknowledged."""
    DROPPED = "dropped"
    """Ignored failure or the handler asked to drop it; acknowledged."""
    FAILED = "failed"
    """Terminal failure with no dead-letter destination: logged and acknowledged."""
    CANCELLED = "cancelled"
    """Processing was cancelled (shutdown); not acknowledged, delivered again later."""
    UNSETTLED = "unsettled"
    """The dead-letter write failed, or another consumer is processing the same message; not
    acknowledged, delivered again later."""
    DEFERRED = "deferred"
    """A retry was handed to the broker, which settled this delivery and delivers the message
    again after the backoff delay (the broker tier of retries)."""
    DUPLICATE = "duplicate"
    """The message was processed before (an idempotency record says so); acknowledged without
    running the handler."""


@dataclass(frozen=True)
class Event:
    """Base of every event: which message it concerns.

    The base keeps no storage of its own (``__slots__ = ()``): each record class stores every
    field, its own and these two (as slots, or as the items of a tuple for
    :class:`MessageSettled`). It is never built directly; ``isinstance(record, Event)`` holds for
    every record.
    """

    __slots__ = ()

    message_id: str | None
    key: str | None


@dataclass(frozen=True, slots=True)
class AttemptFailed(Event):
    """One attempt raised."""

    attempt: int
    error_type: str
    error: str
    verdict: str


@dataclass(frozen=True, slots=True)
class RetryScheduled(Event):
    """A retry was scheduled after ``wait`` seconds."""

    attempt: int
    """The attempt that failed; the next one is ``attempt + 1``."""
    wait: float
    error_type: str


SettledFields = tuple[str | None, str | None, Outcome, int, float, str | None, str | None]
"""The fields of a :class:`MessageSettled`, in order."""


@dataclass(frozen=True, init=False, eq=False)
class MessageSettled(Event, tuple[Any, ...]):
    """Processing of one delivery ended.

    A frozen dataclass like every record (its fields, ``repr``, equality, hash and
    immutability are a frozen dataclass's), stored as a tuple of its fields in order: one is
    built per settled message whenever a listener is subscribed, and a tuple is filled by one
    C call (:data:`new_record`) where slots are written one descriptor call at a time
    (about four times the cost). It also behaves as that tuple (``tuple(record)``, ``len``,
    indexing, unpacking), but it equals only records of its own class and has no order, as a
    dataclass.
    """

    __slots__ = ()

    outcome: Outcome
    attempts: int
    duration: float
    reason: str | None = None
    error_type: str | None = None

    def __new__(
        cls,
        message_id: str | None,
        key: str | None,
        outcome: Outcome,
        attempts: int,
        duration: float,
        reason: str | None = None,
        error_type: str | None = None,
    ) -> MessageSettled:
        """The record with these fields (see the class attributes).

        Args:
            message_id: The broker's message id, when known.
            key: Source key.
            outcome: How processing ended.
            attempts: Attempts made in this delivery.
            duration: Seconds from start to settlement.
            reason: Why the message ended terminally.
            error_type: The escaping exception's type name.

        Returns:
            The record.
        """
        return _new_tuple(cls, (message_id, key, outcome, attempts, duration, reason, error_type))

    if not TYPE_CHECKING:  # the checkers read the signature of __new__
        # Filled by __new__: not the base's dataclass __init__ (``object``'s, which takes the
        # constructor's arguments and does nothing here, as a tuple's does).
        __init__ = object.__init__

    def __getnewargs__(self) -> SettledFields:
        # What copy and pickle hand back to __new__: the fields (a tuple's would be one tuple).
        return tuple(self)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return _tuple_eq(self, other)
        return NotImplemented if not isinstance(other, tuple) else False

    def __ne__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return _tuple_ne(self, other)
        return NotImplemented if not isinstance(other, tuple) else True

    # The frozen dataclass's hash: that of the tuple of its fields.
    __hash__ = tuple.__hash__

    def _unordered(self, other: object) -> bool:
        return NotImplemented  # type: ignore[no-any-return]

    __lt__ = __le__ = __gt__ = __ge__ = _unordered
    del _unordered


_new_tuple = tuple.__new__
_tuple_eq = tuple.__eq__
_tuple_ne = tuple.__ne__

try:
    from collections import _tuplegetter  # type: ignore[attr-defined]
except ImportError:  # not CPython: an item getter as a property, the same read
    from operator import itemgetter

    def _tuplegetter(index: int, doc: str | None) -> property:
        return property(itemgetter(index), doc=doc)


for _index, _field in enumerate(fields(MessageSettled)):
    # The class attributes the dataclass left (field defaults) become item reads.
    setattr(MessageSettled, _field.name, _tuplegetter(_index, f"Field {_field.name!r}."))
del _index, _field

new_record: Callable[[type[MessageSettled], SettledFields], MessageSettled] = _new_tuple
"""``new_record(MessageSettled, fields)`` is ``MessageSettled(*fields)`` (every field, in
order) in one C call, without the constructor's Python frame: the consumer's settlement path.
"""


Listener = Callable[[Any], object]


class EventBus:
    """Synchronous fan-out of event records to listeners.

    :attr:`emit` is a function made for the current listeners whenever they change
    (:meth:`subscribe`, the function it returns), so delivering a record is one call of it: with
    one listener, that listener's call in a ``try``; with none, a call that does nothing.
    """

    __slots__ = ("emit", "listeners")

    def __init__(self, *listeners: Listener) -> None:
        self.listeners: tuple[Listener, ...] = tuple(listeners)
        """The subscribed listeners (read-only: change them with :meth:`subscribe` and the
        function it returns; truthy when anyone listens)."""
        self.emit: Callable[[object], None] = _emitter(self.listeners)
        """``emit(event)``: deliver ``event`` to every listener in subscription order; a failing
        listener is logged and skipped (the others still hear). Read it from the bus at each
        use: it is replaced when the listeners change."""

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Add ``listener``; returns a function that removes it again."""
        self._set((*self.listeners, listener))

        def unsubscribe() -> None:
            self._set(tuple(x for x in self.listeners if x is not listener))

        return unsubscribe

    def _set(self, listeners: tuple[Listener, ...]) -> None:
        self.emit = _emitter(listeners)
        self.listeners = listeners

    def __bool__(self) -> bool:
        return bool(self.listeners)

    def __reduce__(self) -> tuple[type[EventBus], tuple[Listener, ...]]:
        # A copy (or an unpickled bus) has the same listeners and its own emit function.
        return (type(self), self.listeners)


def _emitter(listeners: tuple[Listener, ...]) -> Callable[[object], None]:
    """The :attr:`EventBus.emit` function for ``listeners``: the bus's one rule, every listener
    hears the event and a failing one is logged and skipped (:func:`_listener_failed`).

    One listener, the usual case, is called directly: a loop costs an iterator per event, about
    as much as the call of ``emit`` itself.
    """
    if not listeners:
        return _nobody
    if len(listeners) == 1:
        (listener,) = listeners

        def emit_one(event: object) -> None:
            try:
                listener(event)
            except Exception:
                _listener_failed(listener, event)

        return emit_one

    def emit_all(event: object) -> None:
        for listener in listeners:
            try:
                listener(event)
            except Exception:
                _listener_failed(listener, event)

    return emit_all


def _nobody(event: object) -> None:
    """The emit function of a bus nobody listens to."""


def _listener_failed(listener: Listener, event: object) -> None:
    logger.exception("event listener %r failed on %r", listener, event)
