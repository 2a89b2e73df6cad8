"""One failure classifier shared by retry, circuit breaker and dead-letter routing."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import (
    AttemptTimeout,
    CircuitOpen,
    DeadLetter,
    DeliveryLimitExceeded,
    Drop,
    RetryAfter,
    TotalTimeout,
)

__all__ = ["Classifier", "Verdict", "default_classifier", "terminal_reason"]


class Verdict(enum.Enum):
    """What a failure means for the message."""

    RETRYABLE = "retryable"
    """Transient: try again (if attempts, time and budget allow); counts as a breaker failure."""
    TERMINAL = "terminal"
    """Permanent: no retry; the message goes to its terminal outcome (dead letter)."""
    IGNORED = "ignored"
    """Not a failure: the message is dropped (acked), the breaker counts neither way."""


ExceptionTypes = tuple[type[BaseException], ...]


@dataclass(frozen=True, slots=True)
class Classifier:
    """Decides whether an exception is retryable, terminal or ignored.

    Checked in order: the control exceptions (:class:`~resilience.errors.RetryAfter` and
    :class:`~resilience.errors.CircuitOpen` are retryable; :class:`~resilience.errors.DeadLetter`,
    :class:`~resilience.errors.TotalTimeout` and
    :class:`~resilience.errors.DeliveryLimitExceeded` terminal;
    :class:`~resilience.errors.Drop` ignored), then each predicate (the first that returns a
    verdict wins), then ``ignored``, ``terminal`` and ``retryable`` types; anything else is
    terminal.

    Args:
        retryable: Exception types worth retrying (default: every ``Exception``).
        terminal: Exception types never retried (checked before ``retryable``).
        ignored: Exception types that are not failures at all.
        predicates: Functions ``exc -> Verdict | None`` for rules types cannot express.
    """

    retryable: ExceptionTypes = (Exception,)
    terminal: ExceptionTypes = ()
    ignored: ExceptionTypes = ()
    predicates: tuple[Callable[[BaseException], Verdict | None], ...] = field(default=())

    def __post_init__(self) -> None:
        for name in ("retryable", "terminal", "ignored"):
            value = getattr(self, name)
            if isinstance(value, type):
                object.__setattr__(self, name, (value,))
                value = (value,)
            for item in value:
                if not (isinstance(item, type) and issubclass(item, BaseException)):
                    raise TypeError(f"Classifier {name} must hold exception types, got {item!r}")
        if callable(self.predicates):
            object.__setattr__(self, "predicates", (self.predicates,))

    def classify(self, exc: BaseException) -> Verdict:
        """Return the verdict for ``exc``."""
        if isinstance(exc, RetryAfter | CircuitOpen | AttemptTimeout):
            return Verdict.RETRYABLE
        if isinstance(exc, DeadLetter | TotalTimeout | DeliveryLimitExceeded):
            return Verdict.TERMINAL
        if isinstance(exc, Drop):
            return Verdict.IGNORED
        for predicate in self.predicates:
            verdict = predicate(exc)
            if verdict is not None:
                return verdict
        if self.ignored and isinstance(exc, self.ignored):
            return Verdict.IGNORED
        if self.terminal and isinstance(exc, self.terminal):
            return Verdict.TERMINAL
        if isinstance(exc, self.retryable):
            return Verdict.RETRYABLE
        return Verdict.TERMINAL


default_classifier = Classifier()
"""Every ``Exception`` is retryable, apart from the control exceptions."""


def terminal_reason(exc: BaseException, verdict: Verdict) -> str:
    """The dead-letter reason for an exception that ended a message with ``verdict``."""
    if isinstance(exc, DeadLetter):
        return "rejected"
    if isinstance(exc, DeliveryLimitExceeded):
        return "delivery_limit"
    if isinstance(exc, TotalTimeout):
        return "timeout"
    if verdict is Verdict.RETRYABLE:
        return "retries_exhausted"
    return "non_retryable"
