"""Frozen event records and the hook bus that carries them.

Observability (telemetry, logs, the demo's summary, users' own hooks) subscribes to an
:class:`EventBus`. Emitting costs one truth test when nobody listens. A listener that raises is
logged and never breaks message processing.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AttemptFailed",
    "Event",
    "EventBus",
    "MessageSettled",
    "Outcome",
    "RetryScheduled",
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


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every event: which message it concerns."""

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


@dataclass(frozen=True, slots=True)
class MessageSettled(Event):
    """Processing of one delivery ended."""

    outcome: Outcome
    attempts: int
    duration: float
    reason: str | None = None
    error_type: str | None = None


Listener = Callable[[Any], object]


class EventBus:
    """Synchronous fan-out of event records to listeners."""

    __slots__ = ("listeners",)

    def __init__(self, *listeners: Listener) -> None:
        self.listeners: tuple[Listener, ...] = tuple(listeners)
        """The subscribed listeners (read-only; truthy when anyone listens)."""

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Add ``listener``; returns a function that removes it again."""
        self.listeners = (*self.listeners, listener)

        def unsubscribe() -> None:
            self.listeners = tuple(x for x in self.listeners if x is not listener)

        return unsubscribe

    def __bool__(self) -> bool:
        return bool(self.listeners)

    def emit(self, event: object) -> None:
        """Deliver ``event`` to every listener; a failing listener is logged and skipped."""
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:
                logger.exception("event listener %r failed on %r", listener, event)
