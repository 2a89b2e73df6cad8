"""Whether a backend reaches its broker: an optional extension for health checks.

A backend that reconnects by itself (the Redis backend does) keeps a :class:`ConnectionStatus`
up to date and exposes it as ``connection``; operators' tools read it for readiness probes,
a ``connected`` gauge and startup timeouts. :meth:`ConnectionStatus.failed` also says when an
outage is worth a warning: on each attempt while it is young, then at growing intervals, at
most once a minute, so a long outage stays visible without flooding the log.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

__all__ = ["ConnectionStatus", "ReportsConnection"]

WARN_INTERVAL_MAX = 60.0
"""Seconds between two outage warnings, at most."""


class ConnectionStatus:
    """The state of a backend's connection to its broker, updated by the backend.

    Args:
        now: Monotonic time source (``time.monotonic``; tests pass a fake).

    Attributes:
        connected: ``None`` until the first attempt ends, then whether the last one reached
            the broker.
        attempts: Failed attempts in the current outage (0 while connected).
        down_since: Monotonic time of the current outage's first failed attempt.
        last_error: ``"Type: message"`` of the last failure.
        outages: Outages seen so far (a failure after a success, or the first failure).
        warn: Whether :meth:`failed` may ask for warnings; a supervisor that reports a wait
            itself (a command waiting for the broker at startup) turns it off meanwhile.
    """

    __slots__ = (
        "_last_warned",
        "_now",
        "attempts",
        "connected",
        "down_since",
        "last_error",
        "outages",
        "warn",
    )

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        self.connected: bool | None = None
        self.attempts = 0
        self.down_since: float | None = None
        self.last_error: str | None = None
        self.outages = 0
        self.warn = True
        self._last_warned = 0.0

    @property
    def down_for(self) -> float:
        """Seconds since the current outage began (0.0 while connected)."""
        return 0.0 if self.down_since is None else self._now() - self.down_since

    def failed(self, error: BaseException) -> bool:
        """Record a failed attempt to reach the broker.

        Args:
            error: What the attempt raised.

        Returns:
            Whether this attempt should be logged as a warning (only while :attr:`warn`): the
            outage's first attempt, then each one after which half the outage's age (at most
            a minute) has passed since the last warning, so warnings come with each attempt
            while the outage is young and at most once a minute later.
        """
        now = self._now()
        self.last_error = f"{type(error).__name__}: {error}"
        if self.down_since is None:
            self.down_since = now
            self.outages += 1
        self.connected = False
        self.attempts += 1
        if not self.warn:
            return False
        interval = min(WARN_INTERVAL_MAX, (now - self.down_since) / 2)
        if self.attempts == 1 or now - self._last_warned >= interval:
            self._last_warned = now
            return True
        return False

    def succeeded(self) -> None:
        """Record that the broker answered (ends an outage)."""
        self.connected = True
        self.attempts = 0
        self.down_since = None

    def __repr__(self) -> str:
        return (
            f"ConnectionStatus(connected={self.connected}, attempts={self.attempts}, "
            f"down_for={self.down_for:.1f}s, last_error={self.last_error!r})"
        )


@runtime_checkable
class ReportsConnection(Protocol):
    """A backend that says whether it reaches its broker."""

    @property
    def connection(self) -> ConnectionStatus:
        """The live connection status."""
        ...
