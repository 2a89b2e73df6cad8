"""The shared, mutable state of one named circuit breaker: its state machine and window.

A :class:`Breaker` is the one mutable object of a breaker; every
:class:`~resilience.breaker.CircuitBreaker` middleware with the same name (in the same
registry, on the same clock) drives the same instance. It is asyncio-only: all updates happen
synchronously between two awaits of one event loop, so no lock is needed and none is ever held
across the protected call.

Each admitted call carries the *epoch* (a counter bumped on every state change) it was
admitted in, and its outcome is recorded only if the epoch is still current: a call admitted
while closed that ends after the breaker opened cannot count as a half-open probe.

One message is not an outage. The consecutive-failure count counts distinct messages (by key
and message id), and a delivery's failures after its first (its retries) are not recorded in
the window, so a message that fails every attempt cannot trip the breaker alone. While
half-open, a held message that already failed through the breaker (the one that tripped it
included) leaves the probe for up to :data:`PROBE_GRACE` seconds to a message that has not
(held by the breaker, or about to be pulled by a consumer worker), so probes test the
dependency rather than a bad message; the message that tripped it leaves the probe to any
other waiting message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..clock import Clock, TimerHandle
from ..types import Flow
from .config import (
    BreakerConfig,
    BreakerState,
    BreakerStateChanged,
    BreakerStats,
    seconds_of,
)
from .window import FAILURE, SLOW, TimeWindow

if TYPE_CHECKING:
    from ..delivery import Delivery
    from ..events import EventBus
    from .window import _CountRing, _TimeBuckets

__all__ = ["PROBE_GRACE", "Breaker"]

logger = logging.getLogger("resilience.breaker")

_CLOSED = BreakerState.CLOSED
_OPEN = BreakerState.OPEN
_HALF_OPEN = BreakerState.HALF_OPEN
_FORCED_OPEN = BreakerState.FORCED_OPEN
_FORCED_CLOSED = BreakerState.FORCED_CLOSED

Listener = Callable[[BreakerStateChanged], object]

PROBE_GRACE = 1.0
"""Seconds (at most: never more than the open wait) a message that failed through a breaker
leaves a half-open probe to a message that has not, before it takes the probe itself."""

DEFERRED = -2
"""What :meth:`Breaker._acquire` returns when the delivery should leave the probe to another."""

FAILED_EXTRA = "resilience.breaker.failed"
"""Key in :attr:`Delivery.extras <resilience.delivery.Delivery.extras>` of the breakers that
recorded a failure of the delivery (its later failures are not recorded in their windows, and
it leaves half-open probes to deliveries that have not failed)."""


def message_identity(delivery: Delivery) -> object:
    """What tells one message from another: its key and id, else the delivery itself."""
    message_id = delivery.message_id
    if message_id is None:
        return delivery
    return (delivery.key, message_id)


class Breaker:
    """One named breaker's state, shared by every middleware that uses the name.

    Get one from a :class:`~resilience.breaker.BreakerRegistry` (or
    :func:`~resilience.breaker.get_breaker`) rather than constructing it, so equal names share
    it.

    Args:
        name: The name (appears in events, errors and logs).
        config: When it trips and how it recovers.
        clock: Time source for windows, slow-call timing and the open-state timer.
    """

    def __init__(self, name: str, config: BreakerConfig, clock: Clock) -> None:
        self.name = name
        self.config = config
        self.clock = clock
        self._now = clock.monotonic
        self._state = _CLOSED
        self.flow = Flow()
        """Steady (certainly not paused) while closed or forced closed: what the consumer reads
        before each message instead of :attr:`paused`."""
        self._epoch = 0
        self._consecutive = 0
        self._threshold = config.failure_threshold or 0
        self._failure_rate = config.failure_rate or 0.0
        self._slow_rate = config.slow_call_rate
        self._slow_duration = seconds_of(config.slow_call_duration)
        self._wait_initial = seconds_of(config.open_wait)
        self._wait_max = seconds_of(config.open_wait_max)
        window = config.window
        self._min_calls = 0 if window is None else int(window.minimum_calls or 0)
        self._window: _CountRing | _TimeBuckets | None = None if window is None else window.build()
        self._time_window = isinstance(window, TimeWindow)
        self._timed = config.slow_call_duration is not None or self._time_window
        self._simple = window is None and not self._timed
        self._untimed_epoch = -1  # set by _fast_tokens, below and at every state change
        """The token of a call admitted without timing: the epoch while closed and slow calls
        are not timed, else -1 (the middleware's ``enter`` reads this one attribute)."""
        self._simple_epoch = -1  # likewise
        """The epoch while closed when a success only resets the consecutive count (no window,
        no timing), else -1 (the middleware's ``leave`` compares its token with it)."""
        self._fast_tokens()
        self._probes = config.half_open_probes
        self._taken = 0
        self._in_flight = 0
        self._probe_ok = 0
        self._probe_failed = 0
        self._probe_slow = 0
        self._trips = 0
        self._open_wait = self._wait_initial
        self._open_until: float | None = None
        self._timer: TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._listeners: tuple[Listener, ...] = ()
        self._members: weakref.WeakSet[Any] = weakref.WeakSet()
        self._not_permitted = 0
        self._streak: set[object] = set()
        self._half_open_at = 0.0
        self._tripper: object = None
        self._held = 0
        self._held_fresh = 0
        self._gate_waiters = 0

    # -- reading ---------------------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The current state."""
        return self._state

    @property
    def stats(self) -> BreakerStats:
        """A snapshot of the state and the window's statistics."""
        window = self._window
        calls, failures, slow = (0, 0, 0) if window is None else window.totals(self._now())
        return BreakerStats(
            name=self.name,
            state=self._state,
            calls=calls,
            failures=failures,
            slow_calls=slow,
            failure_rate=failures / calls if calls else 0.0,
            slow_call_rate=slow / calls if calls else 0.0,
            consecutive_failures=self._consecutive,
            open_until=self._open_until,
            open_wait=self._open_wait,
            trips=self._trips,
            probes_in_flight=self._in_flight,
            not_permitted=self._not_permitted,
        )

    @property
    def paused(self) -> bool:
        """Whether a new call would not be permitted right now."""
        state = self._state
        if state is _CLOSED or state is _FORCED_CLOSED:
            return False
        if state is _HALF_OPEN:
            return self._taken >= self._probes
        return True

    @property
    def forced_open(self) -> bool:
        """Whether :meth:`force_open` holds the breaker open (until :meth:`reset`)."""
        return self._state is _FORCED_OPEN

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(event)`` with every :class:`BreakerStateChanged` record.

        A listener that raises is logged and skipped; it never breaks message handling.

        Args:
            listener: Any callable taking the event record.

        Returns:
            A function that removes the listener again.
        """
        self._listeners = (*self._listeners, listener)

        def unsubscribe() -> None:
            self._listeners = tuple(x for x in self._listeners if x is not listener)

        return unsubscribe

    # -- manual control ------------------------------------------------------------------------

    def force_open(self, reason: str = "forced_open") -> None:
        """Stop every call until :meth:`reset` (or :meth:`force_closed`).

        Args:
            reason: Recorded in the :class:`BreakerStateChanged` event.
        """
        self._transition(_FORCED_OPEN, reason)

    def force_closed(self, reason: str = "forced_closed") -> None:
        """Let every call through, record nothing and never trip, until :meth:`reset`.

        Args:
            reason: Recorded in the :class:`BreakerStateChanged` event.
        """
        self._transition(_FORCED_CLOSED, reason)

    def reset(self, reason: str = "reset") -> None:
        """Close the breaker with an empty window and no open-wait growth.

        Args:
            reason: Recorded in the :class:`BreakerStateChanged` event.
        """
        self._transition(_CLOSED, reason)

    # -- waiting (the consumer gate) ---------------------------------------------------------

    async def wait_resumed(self) -> None:
        """Return once a new call would be permitted (closed, or a free half-open probe)."""
        while True:
            self._refresh()
            if not self.paused:
                return
            self._gate_waiters += 1
            try:
                await self._wait_change()
            finally:
                self._gate_waiters -= 1

    def _refresh(self) -> None:
        if self._state is _OPEN and self._open_until is not None:
            now = self._now()
            if now >= self._open_until:
                self._transition(_HALF_OPEN, "open_wait_elapsed", now=now)

    async def _wait_change(self, at_most: float | None = None) -> None:
        """Wait for a state change or a wake-up (or ``at_most`` seconds, when given)."""
        loop = asyncio.get_running_loop()
        if self._state is _OPEN and (self._timer is None or self._timer_loop is not loop):
            # The timer was armed on another event loop (or could not be armed): re-arm here.
            until = self._open_until
            self._arm(0.0 if until is None else max(0.0, until - self._now()))
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append(fut)
        timer = None
        if at_most is not None:
            timer = self.clock.call_later(
                max(0.0, at_most), lambda: None if fut.done() else fut.set_result(None)
            )
        try:
            await fut
        finally:
            if timer is not None:
                timer.cancel()
            if not fut.done():
                fut.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(fut)

    async def _wait_held(self, delivery: Delivery, deferred: bool) -> None:
        """Hold ``delivery`` until the state changes; one leaving the probe to another waits
        at most the rest of the probe grace."""
        at_most = None
        if deferred:
            at_most = self._half_open_at + self._probe_grace() - self._now()
        fresh = not self._has_failed(delivery)
        self._held += 1
        self._held_fresh += fresh
        try:
            await self._wait_change(at_most)
        finally:
            self._held -= 1
            self._held_fresh -= fresh

    def _probe_grace(self) -> float:
        return min(PROBE_GRACE, self._open_wait)

    def _wake(self) -> None:
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for fut in waiters:
                if not fut.done() and not fut.get_loop().is_closed():
                    fut.set_result(None)

    # -- admission and recording (used by the middleware) --------------------------------------

    def _acquire(self, delivery: Delivery | None = None) -> int:
        """The epoch the call is admitted in; -1 when it is not permitted, :data:`DEFERRED`
        when ``delivery`` tripped the breaker and should leave the probe to another message."""
        state = self._state
        if state is _CLOSED or state is _FORCED_CLOSED:
            return self._epoch
        if state is _OPEN:
            self._refresh()
            state = self._state
        if state is _HALF_OPEN and self._taken < self._probes:
            if delivery is not None and self._defers(delivery):
                return DEFERRED
            self._taken += 1
            self._in_flight += 1
            return self._epoch
        return -1

    def _release(self, epoch: int) -> None:
        """An admitted call ended without an outcome (ignored or cancelled)."""
        if epoch == self._epoch and self._state is _HALF_OPEN:
            self._taken -= 1
            self._in_flight -= 1
            self._wake()

    def _record(self, epoch: int, code: int, delivery: Delivery | None, now: float) -> None:
        """Record the outcome of a call admitted in ``epoch`` (dropped if the state moved on).

        ``now`` is the call's end time when the breaker is timed, else a meaningless 0.0.
        """
        if epoch != self._epoch:
            return
        state = self._state
        if state is _CLOSED:
            self._closed_outcome(code, delivery, now)
        elif state is _HALF_OPEN:
            self._probe_outcome(code, delivery, now)

    def _fast_tokens(self) -> None:
        """Keep :attr:`_untimed_epoch` and :attr:`_simple_epoch` true for the state and epoch."""
        closed = self._state is _CLOSED
        self._untimed_epoch = self._epoch if closed and not self._slow_duration else -1
        self._simple_epoch = self._epoch if closed and self._simple else -1

    def _closed_success(self, epoch: int, start: float, end: float, delivery: Delivery) -> None:
        """Record a success admitted while closed (the middleware's hot path).

        ``start`` and ``end`` are the call's times when the breaker is timed (else 0.0).
        """
        if epoch != self._epoch:
            return
        self._consecutive = 0
        window = self._window
        if not self._timed:
            if window is not None:
                window.record(0, 0.0)
            return
        code = SLOW if self._slow_duration and end - start >= self._slow_duration else 0
        if window is not None:
            window.record(code, end)
            if code or (self._time_window and window.failures):
                # A slow call, or old successes leaving a time window, can raise a rate.
                self._closed_outcome(code, delivery, end, recorded=True)

    def _closed_outcome(
        self, code: int, delivery: Delivery | None, now: float, *, recorded: bool = False
    ) -> None:
        reason = None
        window = self._window
        if code & FAILURE:
            if delivery is not None and not self._first_failure(delivery):
                window = None  # its retries: the window holds the delivery's first failure only
            if self._new_in_streak(delivery):
                self._consecutive += 1
                if self._threshold and self._consecutive >= self._threshold:
                    reason = "consecutive_failures"
        else:
            self._consecutive = 0
        if window is not None:
            if not recorded:
                window.record(code, now)
            if reason is None and (code or self._time_window):
                calls, failures, slow = window.totals(now)
                if calls >= self._min_calls:
                    if failures and failures / calls >= self._failure_rate:
                        reason = "failure_rate"
                    elif slow and self._slow_rate is not None and slow / calls >= self._slow_rate:
                        reason = "slow_call_rate"
        if reason is not None:
            self._transition(_OPEN, reason, delivery, now if self._timed else None)

    def _new_in_streak(self, delivery: Delivery | None) -> bool:
        """Whether a failure of ``delivery`` is the first of its message among the current
        consecutive failures (a message counts once toward ``failure_threshold``)."""
        if delivery is None or not self._threshold:
            return True
        streak = self._streak
        if not self._consecutive:
            streak.clear()  # a success (or a transition) ended the previous streak
        identity = message_identity(delivery)
        if identity in streak:
            return False
        streak.add(identity)
        return True

    def _defers(self, delivery: Delivery) -> bool:
        """Whether ``delivery`` should leave a free half-open probe to another message: it
        tripped the breaker and another message waits, or it failed through the breaker and a
        message that has not waits (only during the probe grace)."""
        others = self._held or self._gate_waiters
        if not others or self._now() >= self._half_open_at + self._probe_grace():
            return False
        if self._tripper is not None and message_identity(delivery) == self._tripper:
            return True
        return bool(self._held_fresh or self._gate_waiters) and self._has_failed(delivery)

    def _has_failed(self, delivery: Delivery) -> bool:
        """Whether this breaker recorded a failure of ``delivery``."""
        extras = delivery.extras
        if extras is None:
            return False
        marked: list[Breaker] | None = extras.get(FAILED_EXTRA)
        return marked is not None and any(b is self for b in marked)

    def _first_failure(self, delivery: Delivery) -> bool:
        """Mark ``delivery`` as failed in this breaker; whether it was the first time."""
        extras = delivery.extras
        if extras is None:
            delivery.extras = {FAILED_EXTRA: [self]}
            return True
        marked: list[Breaker] = extras.setdefault(FAILED_EXTRA, [])
        if any(b is self for b in marked):
            return False
        marked.append(self)
        return True

    def _probe_outcome(self, code: int, delivery: Delivery | None, now: float) -> None:
        self._in_flight -= 1
        if code & FAILURE:
            self._probe_failed += 1
            if delivery is not None:
                self._first_failure(delivery)
        else:
            self._probe_ok += 1
        if code & SLOW:
            self._probe_slow += 1
        probes = self._probes
        failed = self._probe_failed
        # Reopen as soon as the verdict is certain: later probes can only raise the share.
        if failed and (self.config.failure_rate is None or failed / probes >= self._failure_rate):
            self._transition(_OPEN, "probe_failed", delivery, now if self._timed else None)
        elif (
            self._probe_slow
            and self._slow_rate is not None
            and self._probe_slow / probes >= self._slow_rate
        ):
            self._transition(_OPEN, "probe_slow", delivery, now if self._timed else None)
        elif self._probe_ok + failed >= probes:
            self._transition(_CLOSED, "probes_succeeded", delivery, now if self._timed else None)

    # -- transitions -----------------------------------------------------------------------------

    def _transition(
        self,
        to: BreakerState,
        reason: str,
        delivery: Delivery | None = None,
        now: float | None = None,
    ) -> None:
        if now is None:
            now = self._now()
        previous = self._state
        self._state = to
        self.flow.steady = to is _CLOSED or to is _FORCED_CLOSED
        self._epoch += 1
        self._fast_tokens()
        self._taken = self._in_flight = 0
        self._probe_ok = self._probe_failed = self._probe_slow = 0
        self._cancel_timer()
        self._open_until = None
        self._streak.clear()
        if to is _HALF_OPEN:
            self._half_open_at = now
        elif to is _OPEN:
            self._tripper = None if delivery is None else message_identity(delivery)
        else:
            self._tripper = None
        if to is _OPEN:
            config = self.config
            if self._trips:
                grown = self._open_wait * config.open_wait_multiplier
                self._open_wait = min(grown, self._wait_max)
            else:
                self._open_wait = self._wait_initial
            self._trips += 1
            self._open_until = now + self._open_wait
            self._arm(self._open_wait)
        elif to is not _HALF_OPEN:
            self._trips = 0
            self._consecutive = 0
            window = self.config.window
            self._window = None if window is None else window.build()
        self._wake()
        event = BreakerStateChanged(
            message_id=None if delivery is None else delivery.message_id,
            key=None if delivery is None else delivery.key,
            name=self.name,
            from_state=previous,
            to_state=to,
            reason=reason,
            at=now,
            open_until=self._open_until,
        )
        log = logger.warning if to is _OPEN or to is _FORCED_OPEN else logger.info
        log("circuit breaker %r: %s -> %s (%s)", self.name, previous.value, to.value, reason)
        self._notify(event, delivery)

    def _notify(self, event: BreakerStateChanged, delivery: Delivery | None) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                logger.exception("breaker listener %r failed on %r", listener, event)
        seen: list[EventBus] = []
        for member in list(self._members):
            bus: EventBus | None = member.events
            if bus and not any(bus is s for s in seen):
                seen.append(bus)
                bus.emit(event)
        if delivery is not None:
            bus = delivery.events
            if bus and not any(bus is s for s in seen):
                bus.emit(event)

    def _arm(self, delay: float) -> None:
        self._cancel_timer()
        try:
            self._timer_loop = asyncio.get_running_loop()
        except RuntimeError:
            self._timer_loop = None
        try:
            self._timer = self.clock.call_later(
                delay, functools.partial(self._open_elapsed, self._epoch)
            )
        except RuntimeError:
            self._timer = None  # no running loop: the next call or wait_resumed() re-arms

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _open_elapsed(self, epoch: int) -> None:
        if epoch == self._epoch and self._state is _OPEN:
            self._timer = None
            self._transition(_HALF_OPEN, "open_wait_elapsed")

    def check(self) -> None:
        """Raise ``AssertionError`` if the internal counters are inconsistent (for tests)."""
        if self._window is not None:
            self._window.check()
        problems = []
        if not 0 <= self._in_flight <= self._taken <= self._probes:
            problems.append(f"probes: in_flight={self._in_flight} taken={self._taken}")
        if self._state is not _HALF_OPEN and (self._taken or self._in_flight):
            problems.append(f"probe permits held outside half-open: {self._taken}")
        if (self._state is _OPEN) != (self._open_until is not None):
            problems.append(f"open_until={self._open_until} in state {self._state.value}")
        if self._consecutive < 0 or (self._state is _FORCED_CLOSED and self._consecutive):
            problems.append(f"consecutive failures {self._consecutive}")
        if problems:
            raise AssertionError(f"breaker {self.name!r} inconsistent: {'; '.join(problems)}")

    def __repr__(self) -> str:
        return f"Breaker(name={self.name!r}, state={self._state.value})"
