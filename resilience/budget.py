"""A retry budget shared by every message: retries capped at a fraction of recent traffic."""

from __future__ import annotations

from datetime import timedelta

from ._units import seconds
from .clock import Clock, default_clock
from .errors import ConfigError

__all__ = ["RetryBudget"]


class RetryBudget:
    """Caps retries at a fraction of recent traffic, shared by every message that uses it.

    Over a sliding ``window`` the budget allows ``ratio * first_attempts + min_per_second *
    window`` retries. When it is spent, a retryable failure goes straight to its terminal outcome
    (reason ``budget_exhausted``) instead of adding load to a dependency that is already failing.

    Args:
        ratio: Extra load allowed, as a fraction of first attempts (0.2 = 20%).
        min_per_second: Retries always allowed per second, so low traffic can still retry.
        window: Seconds of history considered.
        clock: Time source (the default loop clock when ``None``).
    """

    __slots__ = (
        "_buckets",
        "_clock",
        "_current",
        "_deposits",
        "_edge",
        "_opened",
        "_start",
        "_width",
        "_withdrawals",
        "min_per_second",
        "ratio",
        "window",
    )

    _SLOTS = 10

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_second: float = 10.0,
        window: float | timedelta = 10.0,
        clock: Clock | None = None,
    ) -> None:
        if not ratio >= 0:
            raise ConfigError(f"RetryBudget.ratio must be >= 0, got {ratio!r}")
        if not min_per_second >= 0:
            raise ConfigError(f"RetryBudget.min_per_second must be >= 0, got {min_per_second!r}")
        self.ratio = float(ratio)
        self.min_per_second = float(min_per_second)
        self.window = seconds(window, "RetryBudget.window")
        if self.window <= 0:
            raise ConfigError("RetryBudget.window must be > 0 seconds")
        self._clock = clock or default_clock
        self._width = self.window / self._SLOTS
        self._buckets = [[0, 0] for _ in range(self._SLOTS)]
        self._current = 0
        self._start: float | None = None
        self._deposits = 0
        """First attempts in the window, the current bucket's included."""
        self._withdrawals = 0
        self._opened = 0
        """:attr:`_deposits` when the current bucket opened: the current bucket's own first
        attempts are the difference, written into the bucket when it closes (so a deposit is
        one counter increment)."""
        self._edge = float("-inf")
        """When the current bucket ends (``-inf`` before the first reading)."""

    def _roll(self) -> list[int]:
        return self._roll_to(self._clock.monotonic())

    def _roll_to(self, now: float) -> list[int]:
        """Move the window to ``now`` (a reading of the budget's clock); the current bucket."""
        if self._start is None:
            self._start = now
        elapsed = int((now - self._start) // self._width)
        if elapsed > 0:
            self._buckets[self._current][0] = self._deposits - self._opened
            for _ in range(min(elapsed, self._SLOTS)):
                self._current = (self._current + 1) % self._SLOTS
                bucket = self._buckets[self._current]
                self._deposits -= bucket[0]
                self._withdrawals -= bucket[1]
                bucket[0] = bucket[1] = 0
            self._start += elapsed * self._width
            self._opened = self._deposits
        self._edge = self._start + self._width
        return self._buckets[self._current]

    def deposit(self, now: float | None = None, clock: Clock | None = None) -> None:
        """Count one first attempt.

        Args:
            now: A reading of the clock the caller already has (the budget reads its own
                clock when ``None``).
            clock: The clock ``now`` was read from (``None``: the budget's); a reading of
                another clock is not used.
        """
        if now is None or (clock is not self._clock and clock is not None):
            now = self._clock.monotonic()
        if now >= self._edge:  # the current bucket ended (or no reading yet): move on
            self._roll_to(now)
        self._deposits += 1

    @property
    def clock(self) -> Clock:
        """The budget's time source."""
        return self._clock

    def try_spend(self) -> bool:
        """Take one retry from the budget; ``False`` when it is spent."""
        bucket = self._roll()
        allowed = self.ratio * self._deposits + self.min_per_second * self.window
        if self._withdrawals + 1 > allowed:
            return False
        bucket[1] += 1
        self._withdrawals += 1
        return True

    @property
    def available(self) -> float:
        """Retries that could be spent right now."""
        self._roll()
        allowed = self.ratio * self._deposits + self.min_per_second * self.window
        return max(0.0, allowed - self._withdrawals)

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self.ratio}, min_per_second={self.min_per_second}, "
            f"window={self.window})"
        )
