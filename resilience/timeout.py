"""Per-attempt and whole-message timeouts that really cancel the handler.

``async with asyncio.timeout()`` schedules and cancels a loop timer per call (about 4.5 us here,
several times what the whole consumer costs per message). Instead each :class:`Timeout` keeps one
watchdog: a message registers its deadline in a dict (two dict operations on the success path)
and a single timer, armed at the earliest deadline, cancels the tasks whose deadline passed. The
cancellation is then turned into :class:`~resilience.errors.AttemptTimeout` (retryable) or
:class:`~resilience.errors.TotalTimeout` (terminal) exactly as ``asyncio.timeout`` does, with
``Task.uncancel()``, so a shutdown that cancels at the same moment still wins.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

from .clock import Clock, TimerHandle, default_clock
from .errors import AttemptTimeout, ConfigError, TotalTimeout
from .retry import seconds

if TYPE_CHECKING:
    from .delivery import Delivery
    from .pipeline import CallNext

__all__ = ["Timeout"]


class _Entry:
    __slots__ = ("deadline", "fired", "task")

    def __init__(self, deadline: float, task: asyncio.Task[object]) -> None:
        self.deadline = deadline
        self.task = task
        self.fired = False


class _Watchdog:
    """Cancels overdue tasks; one timer armed at the earliest deadline among active entries."""

    __slots__ = ("active", "armed_at", "clock", "loop", "timer")

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.active: dict[int, _Entry] = {}
        self.timer: TimerHandle | None = None
        self.armed_at = float("inf")
        self.loop: asyncio.AbstractEventLoop | None = None

    def add(self, entry: _Entry, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self.loop:
            # A new event loop (tests run one per test): timers of the old one never fire.
            self.loop = loop
            self.timer = None
            self.armed_at = float("inf")
        self.active[id(entry)] = entry
        if entry.deadline < self.armed_at:
            self._arm(entry.deadline)

    def remove(self, entry: _Entry) -> None:
        self.active.pop(id(entry), None)

    def _arm(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.armed_at = when
        self.timer = self.clock.call_later(max(0.0, when - self.clock.monotonic()), self._fire)

    def _fire(self) -> None:
        self.timer = None
        self.armed_at = float("inf")
        now = self.clock.monotonic()
        earliest = float("inf")
        for entry in self.active.values():
            if entry.fired:
                continue
            if entry.deadline <= now:
                entry.fired = True
                entry.task.cancel()
            elif entry.deadline < earliest:
                earliest = entry.deadline
        if earliest != float("inf"):
            self._arm(earliest)


@dataclass(frozen=True, slots=True)
class Timeout:
    """Cancel the rest of the pipeline when it runs longer than ``seconds``.

    Args:
        seconds: The limit (float seconds or ``timedelta``), > 0.
        total: ``False`` (default): a per-attempt limit, raising
            :class:`~resilience.errors.AttemptTimeout`, placed inside retry. ``True``: a
            whole-message limit that also sets the delivery's deadline (retry waits are clamped
            to it), raising :class:`~resilience.errors.TotalTimeout`, placed outside retry.
        clock: Time source.

    A per-attempt limit never extends past the message's deadline.
    """

    seconds: float | timedelta
    total: bool = False
    clock: Clock | None = None
    _watchdog: _Watchdog = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        limit = seconds(self.seconds, "timeout")
        if limit <= 0:
            raise ConfigError(f"timeout must be > 0 seconds, got {self.seconds!r}")
        object.__setattr__(self, "seconds", limit)
        if self.clock is None:
            object.__setattr__(self, "clock", default_clock)
        assert self.clock is not None
        object.__setattr__(self, "_watchdog", _Watchdog(self.clock))

    async def __call__(self, delivery: Delivery, call_next: CallNext) -> None:
        """Run ``call_next`` under the limit."""
        clock = self.clock
        assert clock is not None
        limit: float = self.seconds  # type: ignore[assignment]
        now = clock.monotonic()
        deadline = now + limit
        if self.total:
            if delivery.deadline is None or deadline < delivery.deadline:
                delivery.deadline = deadline
        elif delivery.deadline is not None and delivery.deadline < deadline:
            deadline = delivery.deadline
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Timeout middleware must run inside an asyncio task")
        entry = _Entry(deadline, task)
        watchdog = self._watchdog
        watchdog.add(entry, task.get_loop())
        try:
            await call_next(delivery)
        except asyncio.CancelledError:
            if entry.fired and task.uncancel() == 0:
                raise self._error(delivery) from None
            raise
        finally:
            watchdog.remove(entry)
        if entry.fired:
            # Finished in the same loop turn the watchdog fired: absorb its pending cancel.
            try:
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                if task.uncancel() > 0:
                    raise

    def _error(self, delivery: Delivery) -> TimeoutError:
        limit: float = self.seconds  # type: ignore[assignment]
        if self.total:
            delivery.reason = "timeout"
            return TotalTimeout(limit)
        return AttemptTimeout(limit)
