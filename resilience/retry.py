"""Retry with backoff, built on tenacity, plus a retry budget shared by all messages.

The success path never enters tenacity: the first attempt is a plain ``await`` inside
``try``. Only after a failure does the middleware build a per-message
:class:`tenacity.AsyncRetrying` (so no retry state is ever shared between messages) whose first
"attempt" replays that failure; tenacity then drives the waits, the stop conditions and the
sleeping, through the injectable clock.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

import tenacity
from tenacity.wait import wait_base

from ._log import get_logger
from .classify import Classifier, Verdict, default_classifier, terminal_reason
from .clock import Clock, default_clock
from .errors import ConfigError, DeliveryLimitExceeded, RetryAfter
from .events import AttemptFailed, RetryScheduled

if TYPE_CHECKING:
    from .delivery import Delivery
    from .pipeline import CallNext

__all__ = [
    "Backoff",
    "DecorrelatedJitter",
    "Exponential",
    "Fixed",
    "FullJitter",
    "Retry",
    "RetryBudget",
]

log = get_logger("resilience.retry")


class _TestingMode:
    """The process-wide switch behind :func:`resilience.testing.set_testing`."""

    __slots__ = ("zero_waits",)

    def __init__(self) -> None:
        self.zero_waits = False


testing_mode = _TestingMode()


def seconds(value: float | timedelta | None, name: str, *, allow_none: bool = False) -> float:
    """Normalise ``float | timedelta`` to float seconds, rejecting negatives and NaN."""
    if value is None:
        if allow_none:
            return float("inf")
        raise ConfigError(f"{name} must be a number of seconds, got None")
    if isinstance(value, bool) or not isinstance(value, int | float | timedelta):
        raise ConfigError(f"{name} must be seconds (number or timedelta), got {value!r}")
    result = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if result != result or result < 0:
        raise ConfigError(f"{name} must be >= 0 seconds, got {value!r}")
    return result


# -- backoff strategies -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fixed:
    """The same wait before every retry."""

    delay: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "delay", seconds(self.delay, "Fixed.delay"))

    def to_tenacity(self) -> wait_base:
        """The equivalent tenacity wait."""
        return tenacity.wait_fixed(self.delay)


@dataclass(frozen=True, slots=True)
class Exponential:
    """``initial * multiplier ** (n - 1)`` before retry ``n``, capped at ``maximum``."""

    initial: float = 0.1
    maximum: float = 30.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        _check_exponential(self, "Exponential")

    def to_tenacity(self) -> wait_base:
        """The equivalent tenacity wait."""
        return tenacity.wait_exponential(
            multiplier=self.initial, exp_base=self.multiplier, max=self.maximum
        )


@dataclass(frozen=True, slots=True)
class FullJitter:
    """A uniformly random wait between 0 and the capped exponential value (AWS "full jitter")."""

    initial: float = 0.1
    maximum: float = 30.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        _check_exponential(self, "FullJitter")

    def to_tenacity(self) -> wait_base:
        """The equivalent tenacity wait."""
        return tenacity.wait_random_exponential(
            multiplier=self.initial, exp_base=self.multiplier, max=self.maximum
        )


class _WaitDecorrelated(wait_base):
    """Per-message tenacity wait: ``min(maximum, uniform(initial, previous * 3))``."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None) -> None:
        self.initial = initial
        self.maximum = maximum
        self.rng = rng if rng is not None else random._inst
        self.previous = initial

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        upper = max(self.initial, self.previous * 3)
        self.previous = min(self.maximum, self.rng.uniform(self.initial, upper))
        return self.previous


@dataclass(frozen=True, slots=True)
class DecorrelatedJitter:
    """Decorrelated jitter: each wait is random between ``initial`` and 3x the previous one.

    Args:
        initial: The smallest wait and the first upper bound's base.
        maximum: Cap on every wait.
        rng: Random source (seed one for reproducible runs); the ``random`` module by default.
    """

    initial: float = 0.1
    maximum: float = 30.0
    rng: random.Random | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "initial", seconds(self.initial, "DecorrelatedJitter.initial"))
        object.__setattr__(self, "maximum", seconds(self.maximum, "DecorrelatedJitter.maximum"))
        if self.maximum < self.initial:
            raise ConfigError("DecorrelatedJitter.maximum must be >= initial")

    def to_tenacity(self) -> wait_base:
        """A fresh tenacity wait (it remembers the previous wait, so one per message)."""
        return _WaitDecorrelated(self.initial, self.maximum, self.rng)


def _check_exponential(obj: Exponential | FullJitter, name: str) -> None:
    object.__setattr__(obj, "initial", seconds(obj.initial, f"{name}.initial"))
    object.__setattr__(obj, "maximum", seconds(obj.maximum, f"{name}.maximum"))
    if obj.maximum < obj.initial:
        raise ConfigError(f"{name}.maximum must be >= initial ({obj.initial}), got {obj.maximum}")
    if not obj.multiplier >= 1:
        raise ConfigError(f"{name}.multiplier must be >= 1, got {obj.multiplier!r}")


Backoff = Fixed | Exponential | FullJitter | DecorrelatedJitter | wait_base
"""A backoff strategy: one of this module's, or any tenacity wait (they compose with ``+``)."""


def _tenacity_wait(backoff: Backoff) -> wait_base:
    if isinstance(backoff, wait_base):
        return backoff
    return backoff.to_tenacity()


# -- retry budget -------------------------------------------------------------------------------


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
        self._withdrawals = 0

    def _roll(self) -> list[int]:
        now = self._clock.monotonic()
        if self._start is None:
            self._start = now
        elapsed = int((now - self._start) // self._width)
        if elapsed > 0:
            for _ in range(min(elapsed, self._SLOTS)):
                self._current = (self._current + 1) % self._SLOTS
                bucket = self._buckets[self._current]
                self._deposits -= bucket[0]
                self._withdrawals -= bucket[1]
                bucket[0] = bucket[1] = 0
            self._start += elapsed * self._width
        return self._buckets[self._current]

    def deposit(self) -> None:
        """Count one first attempt."""
        self._roll()[0] += 1
        self._deposits += 1

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


# -- the middleware -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Retry:
    """Retry middleware: backoff between attempts, bounded by attempts, time and budget.

    Args:
        attempts: Attempts in all, the first one included; deliveries by the broker count too,
            so a message that crashed processes is not retried forever.
        wait: Backoff strategy (default: :class:`Exponential` 0.1 s doubling up to 30 s).
        max_elapsed: Give up once this much time has passed since the message started.
        max_retry_after: Cap on a handler's :class:`~resilience.errors.RetryAfter` hint.
        classifier: Which failures are retryable (shared with breaker and dead-letter).
        budget: Optional :class:`RetryBudget` shared by every message.
        clock: Time source for waits and elapsed time.

    Raises:
        ConfigError: a value is out of range.
    """

    attempts: int = 3
    wait: Backoff | None = None
    max_elapsed: float | timedelta | None = None
    max_retry_after: float | timedelta = 60.0
    classifier: Classifier | None = None
    budget: RetryBudget | None = None
    clock: Clock | None = None

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise ConfigError(f"retry attempts must be an integer >= 1, got {self.attempts!r}")
        if self.attempts < 1:
            raise ConfigError(f"retry attempts must be >= 1, got {self.attempts}")
        if self.wait is None:
            object.__setattr__(self, "wait", Exponential())
        elif not isinstance(
            self.wait, Fixed | Exponential | FullJitter | DecorrelatedJitter | wait_base
        ):
            raise ConfigError(f"retry wait must be a backoff strategy, got {self.wait!r}")
        object.__setattr__(
            self,
            "max_elapsed",
            seconds(self.max_elapsed, "retry max_elapsed", allow_none=True),
        )
        object.__setattr__(
            self, "max_retry_after", seconds(self.max_retry_after, "retry max_retry_after")
        )
        if self.classifier is None:
            object.__setattr__(self, "classifier", default_classifier)
        if self.clock is None:
            object.__setattr__(self, "clock", default_clock)

    async def __call__(self, delivery: Delivery, call_next: CallNext) -> None:
        """Run ``call_next``; on a retryable failure, retry it with backoff."""
        await self._run(call_next, delivery)

    def link(self, call_next: CallNext) -> CallNext:
        """The pipeline's cheap form of this layer in front of ``call_next``."""
        return functools.partial(self._run, call_next)

    async def _run(self, call_next: CallNext, delivery: Delivery) -> None:
        if delivery.attempt > self.attempts:
            delivery.reason = "delivery_limit"
            raise DeliveryLimitExceeded(delivery.delivery_count, self.attempts)
        budget = self.budget
        if budget is not None:
            budget.deposit()
        try:
            await call_next(delivery)
            return
        except Exception as exc:
            first = exc
        await self._retry(delivery, call_next, first)

    async def _retry(self, delivery: Delivery, call_next: CallNext, first: Exception) -> None:
        state = _RetryState(self, delivery)
        retrying = tenacity.AsyncRetrying(
            sleep=state.sleep,
            stop=state.stop,
            wait=state.wait,
            retry=state.retry,
            before_sleep=state.before_sleep,
            reraise=True,
        )
        pending: Exception | None = first
        async for attempt in retrying:
            with attempt:
                if pending is not None:
                    exc, pending = pending, None
                    raise exc
                delivery.attempt += 1
                await call_next(delivery)


class _RetryState:
    """Everything one message's retries need; never shared between messages."""

    __slots__ = ("base_wait", "clock", "delivery", "policy", "sleep")

    def __init__(self, policy: Retry, delivery: Delivery) -> None:
        self.policy = policy
        self.delivery = delivery
        clock = policy.clock
        assert clock is not None
        self.clock: Clock = clock
        self.sleep = clock.sleep
        assert policy.wait is not None
        self.base_wait = _tenacity_wait(policy.wait)

    def retry(self, rs: tenacity.RetryCallState) -> bool:
        assert rs.outcome is not None
        exc = rs.outcome.exception()
        if not isinstance(exc, Exception):
            return False  # CancelledError, KeyboardInterrupt, SystemExit: never retried
        d = self.delivery
        classifier = self.policy.classifier
        assert classifier is not None
        verdict = classifier.classify(exc)
        d.note_failure(exc, self.clock.monotonic())
        if d.events:
            d.events.emit(
                AttemptFailed(
                    d.message_id, d.key, d.attempt, type(exc).__qualname__, str(exc), verdict.value
                )
            )
        if verdict is Verdict.RETRYABLE:
            return True
        if verdict is Verdict.TERMINAL:
            d.reason = terminal_reason(exc, verdict)
        return False

    def wait(self, rs: tenacity.RetryCallState) -> float:
        assert rs.outcome is not None
        exc = rs.outcome.exception()
        policy = self.policy
        if isinstance(exc, RetryAfter):
            wait = min(exc.delay, float(policy.max_retry_after))  # type: ignore[arg-type]
        else:
            wait = self.base_wait(rs)
        if testing_mode.zero_waits:
            return 0.0
        remaining = self.delivery.remaining(self.clock.monotonic())
        if remaining is not None:
            wait = min(wait, max(0.0, remaining))
        return max(0.0, wait)

    def stop(self, rs: tenacity.RetryCallState) -> bool:
        d = self.delivery
        policy = self.policy
        now = self.clock.monotonic()
        upcoming = rs.upcoming_sleep
        if d.attempt >= policy.attempts:
            d.reason = "retries_exhausted"
            return True
        if now - d.started_at + upcoming > policy.max_elapsed:  # type: ignore[operator]
            d.reason = "retries_exhausted"
            return True
        if d.deadline is not None and now + upcoming >= d.deadline:
            d.reason = "timeout"
            return True
        if policy.budget is not None and not policy.budget.try_spend():
            d.reason = "budget_exhausted"
            return True
        return False

    def before_sleep(self, rs: tenacity.RetryCallState) -> None:
        d = self.delivery
        assert rs.outcome is not None
        exc = rs.outcome.exception()
        error_type = type(exc).__qualname__
        log.info(
            "retry_scheduled",
            message_id=d.message_id,
            key=d.key,
            attempt=d.attempt,
            wait=rs.upcoming_sleep,
            error_type=error_type,
            error=str(exc),
        )
        if d.events:
            d.events.emit(
                RetryScheduled(d.message_id, d.key, d.attempt, rs.upcoming_sleep, error_type)
            )
