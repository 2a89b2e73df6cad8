"""Per-attempt and whole-message timeouts that really cancel the handler.

``async with asyncio.timeout()`` schedules and cancels a loop timer per call, which costs more
than the whole consumer does per message (figures in ``benchmarks/README.md``). Instead each
:class:`Timeout` keeps one watchdog: a message registers its deadline in a dict (two dict
operations on the success path) and a single timer, armed at the earliest deadline, cancels the
tasks whose deadline passed. The cancellation is then turned into
:class:`~resilience.errors.AttemptTimeout` (retryable) or
:class:`~resilience.errors.TotalTimeout` (terminal) exactly as ``asyncio.timeout`` does, with
``Task.uncancel()``, so a shutdown that cancels at the same moment still wins.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ._units import seconds
from .clock import Clock, TimerHandle, default_clock, monotonic_function
from .errors import AttemptTimeout, ConfigError, TotalTimeout
from .hooks import HookLayer

if TYPE_CHECKING:
    from .delivery import Delivery
    from .types import CallNext

__all__ = ["Timeout"]


class _Watchdog:
    """Cancels overdue tasks; one timer armed at the earliest deadline among active tasks."""

    __slots__ = ("active", "armed_at", "clock", "fired", "last_task", "loop", "now", "timer")

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.active: dict[asyncio.Task[Any], float] = {}
        self.fired: set[asyncio.Task[Any]] = set()
        self.timer: TimerHandle | None = None
        self.armed_at = float("inf")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.now: Callable[[], float] = clock.monotonic
        self.last_task: asyncio.Task[Any] | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start over on a new event loop (tests run one per test): old timers never fire."""
        self.loop = loop
        self.timer = None
        self.armed_at = float("inf")
        self.active.clear()
        self.fired.clear()
        self.now = monotonic_function(self.clock)

    def arm(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.armed_at = when
        self.timer = self.clock.call_later(max(0.0, when - self.now()), self._fire)

    def _fire(self) -> None:
        self.timer = None
        self.armed_at = float("inf")
        now = self.now()
        earliest = float("inf")
        for task, deadline in self.active.items():
            if task in self.fired:
                continue
            if deadline <= now:
                self.fired.add(task)
                task.cancel()
            elif deadline < earliest:
                earliest = deadline
        if earliest != float("inf"):
            self.arm(earliest)


@dataclass(frozen=True, slots=True)
class Timeout(HookLayer):
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

    def enter(self, delivery: Delivery) -> asyncio.Task[Any]:
        """Register the deadline of the task running ``delivery`` with the watchdog.

        Args:
            delivery: The message (a total limit also sets its deadline).

        Returns:
            The task the watchdog cancels when the deadline passes.

        Raises:
            RuntimeError: not running inside an asyncio task.
        """
        task = delivery.task or asyncio.current_task()
        if task is None:
            raise RuntimeError("Timeout middleware must run inside an asyncio task")
        watchdog = self._watchdog
        if task is not watchdog.last_task:
            # A task never changes loops: check the loop once per task, not per message.
            loop = task.get_loop()
            if loop is not watchdog.loop:
                watchdog.bind(loop)
            watchdog.last_task = task
        # The reading the consumer took for this message, when it is fresh and of this clock.
        now = delivery.now
        if now is None or delivery.clock is not self.clock:
            now = watchdog.now()
        deadline = now + self.seconds  # type: ignore[operator]
        if self.total:
            if delivery.deadline is None or deadline < delivery.deadline:
                delivery.deadline = deadline
        elif delivery.deadline is not None and delivery.deadline < deadline:
            deadline = delivery.deadline
        watchdog.active[task] = deadline
        if deadline < watchdog.armed_at:
            watchdog.arm(deadline)
        return task

    def leave(self, token: asyncio.Task[Any], delivery: Delivery) -> Awaitable[None] | None:
        """Withdraw the deadline; if the watchdog fired anyway, absorb its cancel request.

        Args:
            token: The task :meth:`enter` registered.
            delivery: The message.

        Returns:
            ``None``, or (in the loop turn the watchdog fired) the absorption to await.
        """
        watchdog = self._watchdog
        try:
            del watchdog.active[token]  # no method call on the success path
        except KeyError:  # rebound to a new loop meanwhile: nothing of this loop can fire
            return None
        if watchdog.fired and token in watchdog.fired:
            return self._absorb(token)
        return None

    async def fail(
        self,
        token: asyncio.Task[Any],
        delivery: Delivery,
        exc: BaseException,
        call_next: CallNext,
    ) -> None:
        """Turn the watchdog's cancellation into the timeout error; re-raise anything else.

        Only the watchdog's own cancel request is withdrawn (``Task.uncancel()``), so a
        shutdown that cancels at the same moment still wins.

        Args:
            token: The task :meth:`enter` registered.
            delivery: The message.
            exc: What the rest of the pipeline raised.
            call_next: Unused.

        Raises:
            AttemptTimeout: a per-attempt limit passed.
            TotalTimeout: a whole-message limit passed.
            BaseException: ``exc`` otherwise.
        """
        watchdog = self._watchdog
        watchdog.active.pop(token, None)
        if isinstance(exc, asyncio.CancelledError) and token in watchdog.fired:
            watchdog.fired.discard(token)
            if token.uncancel() == 0:
                error = self._error(delivery)
                error.__context__ = exc
                raise error from None
        raise exc

    async def _absorb(self, task: asyncio.Task[Any]) -> None:
        """The call finished although the watchdog cancelled it (the handler caught the
        cancellation, or it was still pending): withdraw the watchdog's cancel request, so
        the task's cancel count is as before (a shutdown's cancel still propagates)."""
        self._watchdog.fired.discard(task)
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            if task.uncancel() > 0:
                raise
            return
        task.uncancel()

    def _error(self, delivery: Delivery) -> TimeoutError:
        limit: float = self.seconds  # type: ignore[assignment]
        if self.total:
            delivery.reason = "timeout"
            return TotalTimeout(limit)
        return AttemptTimeout(limit)
