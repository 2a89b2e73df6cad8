"""The one injectable clock behind every timer in the package.

Retry waits, breaker windows and open-state timers, timeouts and deadlines all read time and
sleep through a :class:`Clock`. Production code uses :class:`LoopClock` (the event loop's
monotonic time, so fast-forwarding loop-time tools such as ``looptime`` also work); tests use
:class:`FakeClock`, which advances instantly and records every sleep.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

__all__ = [
    "Clock",
    "FakeClock",
    "LoopClock",
    "TimerHandle",
    "default_clock",
    "monotonic_function",
]


@runtime_checkable
class TimerHandle(Protocol):
    """What :meth:`Clock.call_later` returns."""

    def cancel(self) -> None:
        """Stop the callback from running (a no-op once it ran)."""
        ...


@runtime_checkable
class Clock(Protocol):
    """Monotonic time, sleeping, and one-shot timers."""

    def monotonic(self) -> float:
        """Seconds on a monotonic scale (only differences are meaningful)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Suspend the calling task for ``seconds``."""
        ...

    def call_later(self, seconds: float, callback: Callable[[], object]) -> TimerHandle:
        """Run ``callback`` after ``seconds``; returns a handle that can cancel it."""
        ...


class LoopClock:
    """The running event loop's clock (the default)."""

    __slots__ = ()

    def monotonic(self) -> float:
        """Loop time, or ``time.monotonic()``'s scale when no loop runs."""
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:
            return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """``asyncio.sleep``."""
        await asyncio.sleep(seconds)

    def call_later(self, seconds: float, callback: Callable[[], object]) -> TimerHandle:
        """``loop.call_later``."""
        return asyncio.get_running_loop().call_later(seconds, callback)

    def __repr__(self) -> str:
        return "LoopClock()"


default_clock: Clock = LoopClock()
"""The clock used when none is given."""


def monotonic_function(clock: Clock) -> Callable[[], float]:
    """The cheapest callable reading ``clock``'s time; call it inside the running loop.

    For :class:`LoopClock` on a standard asyncio loop (whose ``time()`` is
    ``time.monotonic()``) that is ``time.monotonic`` itself, saving a method call and a loop
    lookup per message; any other clock or loop (``looptime``, uvloop) keeps its own.
    """
    if isinstance(clock, LoopClock):
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return clock.monotonic
        if type(loop).time is asyncio.BaseEventLoop.time:
            return time.monotonic
        return loop.time
    return clock.monotonic


class _FakeTimer:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """A virtual clock for tests: sleeping advances time at once and is recorded.

    ``await clock.sleep(2)`` moves :meth:`monotonic` forward by 2 seconds, appends 2 to
    :attr:`sleeps`, fires every timer that became due (timeouts, breaker timers) and yields to
    the event loop. :meth:`advance` moves time without a sleep being recorded.

    Each sleep advances the one shared time by itself, so the fake clock suits one message at a
    time (retry schedules, breaker windows). For many concurrent messages on virtual time, run
    on :class:`LoopClock` under a loop-time fast-forwarding tool such as ``looptime``.

    Args:
        start: The initial reading of :meth:`monotonic`.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self.sleeps: list[float] = []
        self._timers: list[tuple[float, int, _FakeTimer]] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        """The virtual time."""
        return self._now

    async def sleep(self, seconds: float) -> None:
        """Record ``seconds`` and advance by it, firing due timers on the way.

        Time moves timer by timer: after each timer fires the sleeper yields once, so a timer
        that cancels the sleeping task (a timeout) stops the sleep at the timer's time.
        """
        seconds = max(0.0, float(seconds))
        self.sleeps.append(seconds)
        wake = self._now + seconds
        while self._timers and self._timers[0][0] <= wake:
            self.advance(self._timers[0][0] - self._now)
            await asyncio.sleep(0)
        self._now = max(self._now, wake)
        await asyncio.sleep(0)

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` and run the timers that became due, in order."""
        if seconds < 0:
            raise ValueError(f"cannot move a clock backwards (advance({seconds!r}))")
        target = self._now + seconds
        while self._timers and self._timers[0][0] <= target:
            when, _, timer = heapq.heappop(self._timers)
            self._now = max(self._now, when)
            if not timer.cancelled:
                timer.cancelled = True
                timer.callback()
        self._now = target

    def call_later(self, seconds: float, callback: Callable[[], object]) -> TimerHandle:
        """Schedule ``callback`` at virtual time ``now + seconds``."""
        timer = _FakeTimer(self._now + max(0.0, seconds), callback)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    @property
    def pending_timers(self) -> int:
        """Timers scheduled and not yet fired or cancelled."""
        return sum(1 for _, _, t in self._timers if not t.cancelled)

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now!r}, sleeps={len(self.sleeps)})"
