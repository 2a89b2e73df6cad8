"""Exceptions that steer a message's outcome, and the package's error types."""

from __future__ import annotations

from datetime import timedelta

__all__ = [
    "AttemptTimeout",
    "CircuitOpen",
    "ConfigError",
    "DeadLetter",
    "DeadLetterWriteError",
    "DeliveryLimitExceeded",
    "Drop",
    "ResilienceError",
    "RetryAfter",
    "TotalTimeout",
    "Unsettled",
]


def _seconds(value: float | timedelta, name: str) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds != seconds or seconds < 0:  # NaN or negative
        raise ValueError(f"{name} must be a non-negative number of seconds, got {value!r}")
    return seconds


class ResilienceError(Exception):
    """Base class of the package's own exceptions."""


class ConfigError(ResilienceError, ValueError):
    """A policy or option is invalid; the message names the key, the value and what is allowed."""


class RetryAfter(ResilienceError):
    """Raised by a handler to ask for a retry after ``delay`` (for example a Retry-After hint).

    The retry middleware honours the delay up to its ``max_retry_after`` and the message's
    deadline; it still counts as an attempt.

    Args:
        delay: Seconds (or a ``timedelta``) to wait before the next attempt.
        reason: Free text kept for logs and dead-letter records.
    """

    def __init__(self, delay: float | timedelta, reason: str = "") -> None:
        self.delay = _seconds(delay, "RetryAfter delay")
        self.reason = reason
        super().__init__(f"retry after {self.delay:g}s" + (f": {reason}" if reason else ""))


class DeadLetter(ResilienceError):
    """Raised by a handler to dead-letter the message now, without retries.

    Args:
        reason: Why; kept in the dead-letter record.
    """

    def __init__(self, reason: str = "rejected by handler") -> None:
        self.reason = reason
        super().__init__(reason)


class Drop(ResilienceError):
    """Raised by a handler to drop the message: acknowledged, not retried, not dead-lettered."""

    def __init__(self, reason: str = "dropped by handler") -> None:
        self.reason = reason
        super().__init__(reason)


class AttemptTimeout(TimeoutError):
    """One attempt ran longer than the per-attempt timeout and was cancelled (retryable)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        super().__init__(f"attempt exceeded its {seconds:g}s timeout")


class TotalTimeout(TimeoutError):
    """The message as a whole (all attempts and waits) exceeded its deadline (terminal)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        super().__init__(f"message exceeded its {seconds:g}s total timeout")


class CircuitOpen(ResilienceError):
    """A circuit breaker rejected the call without running it.

    Args:
        name: The breaker's name.
        retry_in: Seconds until the breaker admits a probe, when known.
    """

    def __init__(self, name: str, retry_in: float | None = None) -> None:
        self.name = name
        self.retry_in = retry_in
        hint = f"; next probe in {retry_in:.3g}s" if retry_in is not None else ""
        super().__init__(f"circuit {name!r} is open{hint}")


class Unsettled(ResilienceError):
    """The delivery must go back to the broker unacknowledged, to be delivered again later.

    Raised by middleware that cannot settle a message now (a dead-letter write failed, another
    consumer is processing the same message); no layer retries, dead-letters or drops it.
    """


class DeadLetterWriteError(Unsettled):
    """Writing a dead-letter record failed; the delivery is not acknowledged and comes back."""


class DeliveryLimitExceeded(ResilienceError):
    """The broker has delivered the message more times than the attempt limit allows."""

    def __init__(self, delivery_count: int, limit: int) -> None:
        self.delivery_count = delivery_count
        self.limit = limit
        super().__init__(f"delivered {delivery_count} times; the attempt limit is {limit}")
