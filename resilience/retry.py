"""Retry with backoff, built on tenacity.

Backoff strategies live in :mod:`resilience.backoff` and the shared retry budget in
:mod:`resilience.budget`; both are re-exported here.

The success path never enters tenacity: the first attempt is a plain ``await`` inside
``try``. Only after a failure does the middleware build a per-message
:class:`tenacity.AsyncRetrying` (so no retry state is ever shared between messages) whose first
"attempt" replays that failure; tenacity then drives the waits, the stop conditions and the
sleeping, through the injectable clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import tenacity
from tenacity.wait import wait_base

from abe.backends.message_queue.base.extensions import DelayingBackend

from ._handover import AttemptLog, carried_attempts, carried_elapsed, handover_headers
from ._log import get_logger
from ._units import seconds
from .backoff import (
    Backoff,
    DecorrelatedJitter,
    Exponential,
    Fixed,
    FullJitter,
    tenacity_wait,
)
from .budget import RetryBudget
from .classify import Classifier, Verdict, default_classifier, terminal_reason
from .clock import Clock, default_clock
from .errors import ConfigError, DeliveryLimitExceeded, RetryAfter
from .events import AttemptFailed, Outcome, RetryScheduled
from .hooks import SLOW_PATH, HookLayer

if TYPE_CHECKING:
    from .delivery import Delivery
    from .types import CallNext

__all__ = [
    "Backoff",
    "DecorrelatedJitter",
    "Exponential",
    "Fixed",
    "FullJitter",
    "Retry",
    "RetryBudget",
    "seconds",
]

log = get_logger("resilience.retry")


class _TestingMode:
    """The process-wide switch behind :func:`resilience.testing.set_testing`."""

    __slots__ = ("zero_waits",)

    def __init__(self) -> None:
        self.zero_waits = False


testing_mode = _TestingMode()


@dataclass(frozen=True, slots=True)
class Retry(HookLayer):
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
        in_process: Attempts made in process before a retryable failure is handed to the
            broker to come back after the next backoff delay (the broker tier); ``None`` (the
            default) keeps every attempt in process. Needs a ``backend`` implementing
            :class:`~abe.backends.message_queue.base.DelayingBackend`; without one, waits stay
            in process and one warning is logged when the layer is built.
        backend: The backend the consumer reads from, for the broker tier.
        scrub: Masks redacted values in an error text (``scrub(text, delivery)``) before it is
            carried in the ``x-retry-error`` header; ``None`` carries the error type only.

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
    in_process: int | None = None
    backend: Any = None
    scrub: Callable[[str, Delivery], str] | None = None
    _delaying: DelayingBackend | None = field(default=None, init=False, repr=False, compare=False)

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
        self._check_tiers()

    def _check_tiers(self) -> None:
        in_process = self.in_process
        if in_process is None:
            return
        if isinstance(in_process, bool) or not isinstance(in_process, int):
            raise ConfigError(
                f"retry in_process must be an integer from 1 to attempts ({self.attempts}), "
                f"got {in_process!r}"
            )
        if not 1 <= in_process <= self.attempts:
            raise ConfigError(
                f"retry in_process must be from 1 to attempts ({self.attempts}), got {in_process}"
            )
        if in_process == self.attempts:
            return  # no attempt is left for the broker tier
        if isinstance(self.backend, DelayingBackend):
            object.__setattr__(self, "_delaying", self.backend)
        else:
            log.warning(
                "retry_broker_tier_unavailable",
                backend=type(self.backend).__name__,
                in_process=in_process,
                detail="the backend cannot redeliver after a delay: every retry waits in process",
            )

    def enter(self, delivery: Delivery) -> Any:
        """Count the attempt with the budget; :data:`~resilience.hooks.SLOW_PATH` past the limit.

        Args:
            delivery: The message.

        Returns:
            ``None``, or :data:`~resilience.hooks.SLOW_PATH`.
        """
        if delivery.attempt > self.attempts:
            return SLOW_PATH
        budget = self.budget
        if budget is not None:
            budget.deposit()
        return None

    async def slow(self, delivery: Delivery, call_next: CallNext) -> None:
        """The broker delivered the message more often than the attempt limit.

        Args:
            delivery: The message.
            call_next: The rest of the pipeline (not called).

        Raises:
            DeliveryLimitExceeded: always.
        """
        delivery.reason = "delivery_limit"
        raise DeliveryLimitExceeded(delivery.delivery_count, self.attempts)

    async def fail(
        self, token: object, delivery: Delivery, exc: BaseException, call_next: CallNext
    ) -> None:
        """Retry ``call_next`` with backoff after ``exc``, as the policy allows.

        Args:
            token: Unused.
            delivery: The message.
            exc: What the first attempt raised.
            call_next: The rest of the pipeline.

        Raises:
            BaseException: the last attempt's exception when retrying stops; ``exc`` itself
                when it is not an ``Exception`` (cancellation is never retried).
        """
        if not isinstance(exc, Exception):
            raise exc
        await self._retry(delivery, call_next, exc)

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
        try:
            async for attempt in retrying:
                with attempt:
                    if pending is not None:
                        exc, pending = pending, None
                        raise exc
                    delivery.attempt += 1
                    await call_next(delivery)
        except _HandedOver:
            return

    async def _hand_over(self, state: _RetryState, wait: float) -> bool:
        """Give the message to the broker to come back after ``wait`` seconds (the broker tier).

        Returns:
            Whether the backend took it; if not, the caller waits in process instead.
        """
        d = state.delivery
        message = d.message
        delaying = self._delaying
        if message is None or delaying is None or state.last is None:
            return False
        elapsed = state.carried + (state.clock.monotonic() - d.started_at) + wait
        assert state.log is not None
        scrub = self.scrub
        previous = message.headers
        message.headers = handover_headers(
            previous,
            attempt=d.attempt,
            elapsed=elapsed,
            error=state.last,
            log=state.log,
            scrub=None if scrub is None else (lambda text: scrub(text, d)),
        )
        try:
            await delaying.release_later(message, wait)
        except Exception as exc:
            message.headers = previous
            log.warning(
                "retry_handover_failed",
                message_id=d.message_id,
                key=d.key,
                attempt=d.attempt,
                error_type=type(exc).__qualname__,
                detail="waiting in process instead",
            )
            return False
        d.outcome = Outcome.DEFERRED
        log.info("retry_handed_over", message_id=d.message_id, key=d.key, attempt=d.attempt)
        return True


class _HandedOver(Exception):
    """Ends a message's retry loop once the broker holds its next attempt."""


class _RetryState:
    """Everything one message's retries need; never shared between messages."""

    __slots__ = (
        "base_wait",
        "carried",
        "clock",
        "delivery",
        "last",
        "log",
        "offset",
        "policy",
        "sleep",
    )

    def __init__(self, policy: Retry, delivery: Delivery) -> None:
        self.policy = policy
        self.delivery = delivery
        clock = policy.clock
        assert clock is not None
        self.clock: Clock = clock
        self.sleep: Callable[[float], Any] = clock.sleep
        assert policy.wait is not None
        self.base_wait = tenacity_wait(policy.wait)
        # A message back from the broker tier goes on counting where it left off.
        headers = delivery.headers
        self.carried = carried_elapsed(headers) if headers else 0.0
        self.offset = carried_attempts(headers) if headers else 0
        if self.offset >= delivery.attempt:
            delivery.attempt = self.offset + 1
        self.last: Exception | None = None
        self.log: AttemptLog | None = None
        if policy._delaying is not None:
            self.log = AttemptLog()
            self.sleep = self.sleep_or_hand_over

    async def sleep_or_hand_over(self, seconds: float) -> None:
        """Wait ``seconds`` in process, or hand the message to the broker once the in-process
        attempts are used up."""
        policy = self.policy
        assert policy.in_process is not None
        if self.delivery.attempt >= policy.in_process and await policy._hand_over(self, seconds):
            raise _HandedOver
        await self.clock.sleep(seconds)

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
        if self.log is not None:
            self.last = exc
            in_process = self.policy.in_process
            assert in_process is not None
            tier = "in_process" if d.attempt <= in_process else "broker"
            self.log.add(d.attempt, tier, type(exc).__qualname__)
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
        elif self.offset:
            # The backoff goes on from the attempts made before this delivery.
            rs.attempt_number += self.offset
            try:
                wait = self.base_wait(rs)
            finally:
                rs.attempt_number -= self.offset
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
        if now - d.started_at + self.carried + upcoming > policy.max_elapsed:  # type: ignore[operator]
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
        )  # no str(exc): exception messages may quote payload fields the policy redacts
        if d.events:
            d.events.emit(
                RetryScheduled(d.message_id, d.key, d.attempt, rs.upcoming_sleep, error_type)
            )
