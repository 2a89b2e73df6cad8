"""Retry with backoff, built on tenacity.

Backoff strategies live in :mod:`resilience.backoff` and the shared retry budget in
:mod:`resilience.budget`; both are re-exported here.

The success path never enters tenacity: the first attempt is a plain ``await`` inside
``try``. After a failure the middleware drives the attempts itself, in one loop: for each failed
attempt one method classifies the failure once, asks the tenacity wait strategy for the next
wait (with a per-message :class:`tenacity.RetryCallState`, so no retry state is ever shared
between messages) and decides between waiting (on the injectable clock, or handed to the broker
in the broker tier) and stopping. tenacity computes the waits; its ``AsyncRetrying`` loop, which
re-inspects every callback on every attempt, is not used.
"""

from __future__ import annotations

import logging
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
_stdlib_log = logging.getLogger("resilience.retry")
"""The stdlib logger behind ``log``: asked whether INFO is on before an event is built."""


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
    _wait: wait_base | None = field(init=False, default=None, repr=False, compare=False)
    """The tenacity wait, built once (``None``: the strategy remembers earlier waits, so each
    message gets a fresh one)."""

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
        if not isinstance(self.wait, DecorrelatedJitter):
            object.__setattr__(self, "_wait", tenacity_wait(self.wait))  # type: ignore[arg-type]
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
            # The consumer's reading of the clock for this message (used if it is the budget's).
            budget.deposit(delivery.now, delivery.clock)
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
        state = _RetryState(self, delivery)
        sleep = self.clock.sleep  # type: ignore[union-attr]
        in_process = self.in_process
        while True:
            upcoming = self._next_wait(state, exc)
            if upcoming is None:
                raise exc
            if (
                state.log is not None
                and delivery.attempt >= in_process  # type: ignore[operator]
                and await self._hand_over(state, upcoming)
            ):
                return  # the broker holds the next attempt
            await sleep(upcoming)
            rs = state.rs
            rs.idle_for += upcoming
            rs.prepare_for_next_attempt()
            delivery.attempt += 1
            try:
                await call_next(delivery)
            except Exception as error:
                exc = error
            else:
                return
            # The next decision and the next attempt run outside the ``except`` block, so the
            # handler's later errors do not chain onto this one.

    def _next_wait(self, state: _RetryState, exc: Exception) -> float | None:
        """After attempt ``delivery.attempt`` raised ``exc``: the wait before the next attempt,
        or ``None`` to stop (``delivery.reason`` says why, for a terminal outcome).

        Records the failure (one classification), emits :class:`AttemptFailed`, and, when the
        message is retried, logs ``retry_scheduled`` and emits :class:`RetryScheduled`.
        """
        d = state.delivery
        verdict = self.classifier.classify(exc)  # type: ignore[union-attr]
        now = self.clock.monotonic()  # type: ignore[union-attr]
        d.note_failure(exc, now)
        attempts_log = state.log
        if attempts_log is not None:
            state.last = exc
            tier = "in_process" if d.attempt <= self.in_process else "broker"  # type: ignore[operator]
            attempts_log.add(d.attempt, tier, type(exc).__qualname__)
        events = d.events
        if events:
            events.emit(
                AttemptFailed(
                    d.message_id, d.key, d.attempt, type(exc).__qualname__, str(exc), verdict.value
                )
            )
        if verdict is not Verdict.RETRYABLE:
            if verdict is Verdict.TERMINAL:
                d.reason = terminal_reason(exc, verdict)
            return None
        # The wait: a RetryAfter hint (capped), else the strategy; clamped to the deadline.
        if isinstance(exc, RetryAfter):
            upcoming = min(exc.delay, float(self.max_retry_after))  # type: ignore[arg-type]
        else:
            rs = state.rs
            rs.set_exception((type(exc), exc, exc.__traceback__))
            offset = state.offset
            if offset:
                # The backoff goes on from the attempts made before this delivery.
                rs.attempt_number += offset
                try:
                    upcoming = state.wait(rs)
                finally:
                    rs.attempt_number -= offset
            else:
                upcoming = state.wait(rs)
        if testing_mode.zero_waits:
            upcoming = 0.0
        else:
            deadline = d.deadline
            if deadline is not None:
                upcoming = min(upcoming, max(0.0, deadline - now))
            upcoming = max(0.0, upcoming)
        state.rs.upcoming_sleep = upcoming
        # Stop: attempts, elapsed time, deadline, budget (spent only by a retry that happens).
        if d.attempt >= self.attempts:
            d.reason = "retries_exhausted"
            return None
        if now - d.started_at + state.carried + upcoming > self.max_elapsed:  # type: ignore[operator]
            d.reason = "retries_exhausted"
            return None
        if d.deadline is not None and now + upcoming >= d.deadline:
            d.reason = "timeout"
            return None
        budget = self.budget
        if budget is not None and not budget.try_spend():
            d.reason = "budget_exhausted"
            return None
        error_type = type(exc).__qualname__
        if _stdlib_log.isEnabledFor(logging.INFO):
            log.info(
                "retry_scheduled",
                message_id=d.message_id,
                key=d.key,
                attempt=d.attempt,
                wait=upcoming,
                error_type=error_type,
            )  # no str(exc): exception messages may quote payload fields the policy redacts
        if events:
            events.emit(RetryScheduled(d.message_id, d.key, d.attempt, upcoming, error_type))
        return upcoming

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
        elapsed = state.carried + (self.clock.monotonic() - d.started_at) + wait  # type: ignore[union-attr]
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


class _RetryState:
    """Everything one message's retries need; never shared between messages."""

    __slots__ = ("carried", "delivery", "last", "log", "offset", "rs", "wait")

    def __init__(self, policy: Retry, delivery: Delivery) -> None:
        self.delivery = delivery
        # tenacity's per-call state, for the wait strategy (attempt number, outcome, idle time).
        self.rs = tenacity.RetryCallState(_RETRY_OBJECT, None, (), {})
        wait = policy._wait
        if wait is None:
            assert policy.wait is not None
            wait = tenacity_wait(policy.wait)  # a strategy with memory: one per message
        self.wait: wait_base = wait
        # A message back from the broker tier goes on counting where it left off.
        headers = delivery.headers
        self.carried = carried_elapsed(headers) if headers else 0.0
        self.offset = carried_attempts(headers) if headers else 0
        if self.offset >= delivery.attempt:
            delivery.attempt = self.offset + 1
        self.last: Exception | None = None
        self.log: AttemptLog | None = AttemptLog() if policy._delaying is not None else None


_RETRY_OBJECT = tenacity.AsyncRetrying()
"""The ``retry_object`` of the per-message tenacity state handed to wait strategies (never run:
the middleware drives the attempts itself)."""
