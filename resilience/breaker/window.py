"""Sliding windows of call outcomes for the circuit breaker.

Two frozen descriptions (:class:`CountWindow`, :class:`TimeWindow`) and the mutable structures
they build. Each recorded outcome is a small bit set: :data:`FAILURE` and :data:`SLOW` (0 is a
fast success). Both structures keep running totals, so reading the failure rate never scans
the window.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from ..errors import ConfigError

__all__ = ["FAILURE", "SLOW", "CountWindow", "TimeWindow", "Window"]

FAILURE = 1
"""Outcome bit: the call failed (a retryable verdict from the classifier)."""
SLOW = 2
"""Outcome bit: the call took at least the slow-call duration."""


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class CountWindow:
    """The last ``size`` calls.

    Args:
        size: How many of the most recent calls the rates are computed over.
        minimum_calls: Calls the window must hold before a rate can trip the breaker
            (default: ``min(size, 10)``); at most ``size``.

    Raises:
        ConfigError: a value is out of range.
    """

    size: int = 100
    minimum_calls: int | None = None

    def __post_init__(self) -> None:
        size = _positive_int(self.size, "CountWindow.size")
        minimum = self.minimum_calls
        if minimum is None:
            minimum = min(size, 10)
        minimum = _positive_int(minimum, "CountWindow.minimum_calls")
        if minimum > size:
            raise ConfigError(
                f"CountWindow.minimum_calls ({minimum}) must be <= size ({size}): the window "
                "can never hold more calls than its size"
            )
        object.__setattr__(self, "minimum_calls", minimum)

    def build(self) -> _CountRing:
        """A fresh, empty window."""
        return _CountRing(self.size)


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """The calls of the last ``size`` seconds.

    The window slides in steps of ``size / buckets``: a call stays in it for at least
    ``size - size / buckets`` and at most ``size`` seconds after it ended.

    Args:
        size: Seconds of history (float or ``timedelta``), > 0.
        minimum_calls: Calls the window must hold before a rate can trip the breaker.
        buckets: How many slices the window is kept in (the sliding granularity).

    Raises:
        ConfigError: a value is out of range.
    """

    size: float | timedelta = 60.0
    minimum_calls: int = 10
    buckets: int = 10

    def __post_init__(self) -> None:
        size = self.size
        if isinstance(size, timedelta):
            size = size.total_seconds()
        if isinstance(size, bool) or not isinstance(size, int | float) or not size > 0:
            raise ConfigError(f"TimeWindow.size must be > 0 seconds, got {self.size!r}")
        if size == float("inf"):
            raise ConfigError("TimeWindow.size must be finite")
        object.__setattr__(self, "size", float(size))
        _positive_int(self.minimum_calls, "TimeWindow.minimum_calls")
        _positive_int(self.buckets, "TimeWindow.buckets")

    def build(self) -> _TimeBuckets:
        """A fresh, empty window."""
        size = self.size
        return _TimeBuckets(
            size.total_seconds() if isinstance(size, timedelta) else size, self.buckets
        )


Window = CountWindow | TimeWindow
"""A sliding-window description."""


class _CountRing:
    """A preallocated ring of the last ``size`` outcome codes with running totals."""

    __slots__ = ("calls", "codes", "failures", "pos", "size", "slow")

    def __init__(self, size: int) -> None:
        self.size = size
        self.codes = [0] * size
        self.pos = 0
        self.calls = 0
        self.failures = 0
        self.slow = 0

    def record(self, code: int, now: float) -> None:
        """Add one outcome, evicting the oldest once full (``now`` is unused)."""
        pos = self.pos
        codes = self.codes
        old = codes[pos]
        codes[pos] = code
        pos += 1
        self.pos = 0 if pos == self.size else pos
        if self.calls < self.size:
            self.calls += 1
        elif old:
            if old & FAILURE:
                self.failures -= 1
            if old & SLOW:
                self.slow -= 1
        if code:
            if code & FAILURE:
                self.failures += 1
            if code & SLOW:
                self.slow += 1

    def totals(self, now: float) -> tuple[int, int, int]:
        """``(calls, failures, slow calls)`` in the window."""
        return self.calls, self.failures, self.slow

    def check(self) -> None:
        """Recount from the ring and raise ``AssertionError`` on drift (for tests)."""
        held = self.codes if self.calls == self.size else self.codes[: self.calls]
        if self.calls < self.size and self.pos != self.calls:
            raise AssertionError(f"ring position {self.pos} != calls {self.calls}")
        failures = sum(1 for c in held if c & FAILURE)
        slow = sum(1 for c in held if c & SLOW)
        if (failures, slow) != (self.failures, self.slow):
            raise AssertionError(
                f"window totals drifted: kept {(self.failures, self.slow)}, "
                f"recounted {(failures, slow)}"
            )


class _TimeBuckets:
    """``buckets`` slices of ``size / buckets`` seconds each, with running totals."""

    __slots__ = (
        "bucket_calls",
        "bucket_failures",
        "bucket_slow",
        "calls",
        "failures",
        "head",
        "head_end",
        "n",
        "slow",
        "width",
    )

    def __init__(self, size: float, buckets: int) -> None:
        self.n = buckets
        self.width = size / buckets
        self.bucket_calls = [0] * buckets
        self.bucket_failures = [0] * buckets
        self.bucket_slow = [0] * buckets
        self.head = 0
        self.head_end = float("-inf")  # the end of the head bucket; -inf before the first call
        self.calls = 0
        self.failures = 0
        self.slow = 0

    def _roll(self, now: float) -> None:
        end = self.head_end
        if now < end:
            return
        if end == float("-inf"):
            self.head_end = now + self.width
            return
        steps = int((now - end) // self.width) + 1
        self.head_end = end + steps * self.width
        if steps >= self.n:
            self._clear()
            return
        head = self.head
        for _ in range(steps):
            head = head + 1 if head + 1 < self.n else 0
            self.calls -= self.bucket_calls[head]
            self.failures -= self.bucket_failures[head]
            self.slow -= self.bucket_slow[head]
            self.bucket_calls[head] = self.bucket_failures[head] = self.bucket_slow[head] = 0
        self.head = head

    def _clear(self) -> None:
        n = self.n
        self.bucket_calls = [0] * n
        self.bucket_failures = [0] * n
        self.bucket_slow = [0] * n
        self.calls = self.failures = self.slow = 0

    def record(self, code: int, now: float) -> None:
        """Add one outcome that ended at ``now``."""
        if now >= self.head_end:
            self._roll(now)
        head = self.head
        self.bucket_calls[head] += 1
        self.calls += 1
        if code:
            if code & FAILURE:
                self.bucket_failures[head] += 1
                self.failures += 1
            if code & SLOW:
                self.bucket_slow[head] += 1
                self.slow += 1

    def totals(self, now: float) -> tuple[int, int, int]:
        """``(calls, failures, slow calls)`` in the window as of ``now``."""
        self._roll(now)
        return self.calls, self.failures, self.slow

    def check(self) -> None:
        """Recount from the buckets and raise ``AssertionError`` on drift (for tests)."""
        recount = (sum(self.bucket_calls), sum(self.bucket_failures), sum(self.bucket_slow))
        if recount != (self.calls, self.failures, self.slow):
            raise AssertionError(
                f"window totals drifted: kept {(self.calls, self.failures, self.slow)}, "
                f"recounted {recount}"
            )
