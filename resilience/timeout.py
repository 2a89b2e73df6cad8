"""Per-attempt and whole-message timeouts that really cancel the handler.

``async with asyncio.timeout()`` schedules and cancels a loop timer per call, which costs more
than the whole consumer does per message (figures in ``benchmarks/README.md``). Instead each
:class:`Timeout` keeps one watchdog: every task that runs messages through it has one entry,
a message writes its deadline into the entry on the way in and clears it on the way out (two
attribute writes on the success path, no dict operation), and a single timer, armed at the
earliest deadline, cancels the tasks whose deadline passed. The cancellation is then turned into
:class:`~resilience.errors.AttemptTimeout` (retryable) or
:class:`~resilience.errors.TotalTimeout` (terminal) exactly as ``asyncio.timeout`` does, with
``Task.uncancel()``, so a shutdown that cancels at the same moment still wins.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Generator
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


_NEVER = float("inf")


class _Entry:
    """One task's registration with one watchdog, kept for the task's life: a message writes
    its deadline into it on the way in and :data:`_NEVER` on the way out (two attribute writes,
    no dict operation).

    When the watchdog cancels the task it sets :attr:`fired` to the entry itself (``None``
    otherwise): a call that finished anyway awaits it, which withdraws that cancel request.
    """

    __slots__ = ("deadline", "fired", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.deadline = _NEVER
        self.fired: _Entry | None = None

    def __await__(self) -> Generator[Any, None, None]:
        """Absorb the watchdog's cancel request: the call finished although the watchdog
        cancelled it (the handler caught the cancellation, or it was still pending), so the
        request is withdrawn and the task's cancel count is as before (a shutdown's cancel
        still propagates)."""
        self.fired = None
        task = self.task
        try:
            yield from asyncio.sleep(0).__await__()
        except asyncio.CancelledError:
            if task.uncancel() > 0:
                raise
            return
        task.uncancel()


_SWEEP_MIN = 64
"""Entries a watchdog holds before a new one first sweeps out those of finished tasks."""

_NO_ENTRY = _Entry(object())  # type: ignore[arg-type]
"""The watchdog's last entry before any task registered (matches no task, nor ``None``)."""


class _Watchdog:
    """Cancels overdue tasks; one timer armed at the earliest deadline among active tasks.

    Each task that registered keeps one :class:`_Entry` (its deadline is :data:`_NEVER` between
    messages) until it ends. Entries of finished tasks are dropped when the timer fires, and
    when new entries have doubled their number since the last sweep (so a task per call, as a
    ``@resilient`` handler called from request handlers gets, keeps no more entries than about
    twice the tasks alive). An entry is found through :attr:`last` (the task of the previous
    message, as a sequential consumer's worker always is) or, else, by the task in
    :attr:`entries`.
    """

    __slots__ = ("armed_at", "clock", "entries", "last", "loop", "now", "sweep_at", "timer")

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.entries: dict[asyncio.Task[Any], _Entry] = {}
        self.last = _NO_ENTRY
        self.timer: TimerHandle | None = None
        self.armed_at = _NEVER
        self.loop: asyncio.AbstractEventLoop | None = None
        self.now: Callable[[], float] = clock.monotonic
        self.sweep_at = _SWEEP_MIN
        """Entries at which the next new one sweeps out those of finished tasks first."""

    @property
    def active(self) -> dict[asyncio.Task[Any], float]:
        """The tasks with a deadline registered now, and their deadlines."""
        return {t: e.deadline for t, e in self.entries.items() if e.deadline != _NEVER}

    def entry(self, task: asyncio.Task[Any] | None) -> _Entry:
        """The entry of ``task`` (made on its first message), remembered as :attr:`last`.

        Raises:
            RuntimeError: ``task`` is ``None`` (not running inside an asyncio task).
        """
        if task is None:
            raise RuntimeError("Timeout middleware must run inside an asyncio task")
        entry = self.entries.get(task)
        if entry is None:
            # A task never changes loops: its loop is checked once, when its entry is made.
            loop = task.get_loop()
            if loop is not self.loop:
                self.bind(loop)
            if len(self.entries) >= self.sweep_at:
                self.forget_finished()
                self.sweep_at = max(_SWEEP_MIN, 2 * len(self.entries))
            entry = self.entries[task] = _Entry(task)
        self.last = entry
        return entry

    def forget_finished(self) -> None:
        """Drop the entries of tasks that ended with no deadline registered."""
        entries = self.entries
        for task, entry in list(entries.items()):
            if entry.deadline == _NEVER and task.done():
                del entries[task]
                if self.last is entry:
                    self.last = _NO_ENTRY

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start over on a new event loop (tests run one per test): old timers never fire, and
        the old loop's entries are forgotten (their :attr:`_Entry.fired` cleared)."""
        self.loop = loop
        self.timer = None
        self.armed_at = _NEVER
        for old in self.entries.values():
            old.fired = None
        self.entries = {}
        self.sweep_at = _SWEEP_MIN
        self.last = _NO_ENTRY
        self.now = monotonic_function(self.clock)

    def arm(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.armed_at = when
        self.timer = self.clock.call_later(max(0.0, when - self.now()), self._fire)

    def _fire(self) -> None:
        self.timer = None
        self.armed_at = _NEVER
        now = self.now()
        earliest = _NEVER
        self.forget_finished()
        for task, entry in self.entries.items():
            deadline = entry.deadline
            if deadline == _NEVER or entry.fired is not None:
                continue
            if deadline <= now:
                entry.fired = entry
                task.cancel()
            elif deadline < earliest:
                earliest = deadline
        if earliest != _NEVER:
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

    def enter(self, delivery: Delivery) -> _Entry:
        """Write the deadline of the task running ``delivery`` into its watchdog entry.

        Args:
            delivery: The message (a total limit also sets its deadline).

        Returns:
            The task's entry, which the watchdog cancels when the deadline passes.

        Raises:
            RuntimeError: not running inside an asyncio task.
        """
        # The task's entry: the previous message's, as a consumer worker's always is, or else
        # found (and made) by the watchdog, which raises when there is no task (None).
        task = delivery.task or asyncio.current_task()
        entry = self._watchdog.last
        if entry.task is not task:
            entry = self._watchdog.entry(task)
        # The reading the consumer took for this message, when it is fresh and of this clock
        # (a delivery has a clock only with a fresh reading of it: one test).
        now = delivery.now
        if delivery.clock is not self.clock:
            now = self._watchdog.now()
        deadline: float = now + self.seconds  # type: ignore[operator,assignment]
        limit = delivery.deadline
        if self.total:
            if limit is None or deadline < limit:
                delivery.deadline = deadline
        elif limit is not None and limit < deadline:
            deadline = limit
        entry.deadline = deadline
        if deadline < self._watchdog.armed_at:
            self._watchdog.arm(deadline)
        return entry

    def leave(self, token: _Entry, delivery: Delivery) -> Awaitable[None] | None:
        """Withdraw the deadline; if the watchdog fired anyway, absorb its cancel request.

        Args:
            token: The entry :meth:`enter` wrote.
            delivery: The message.

        Returns:
            ``None``, or (in the loop turn the watchdog fired) the entry, to await: that
            withdraws the watchdog's cancel request.
        """
        token.deadline = _NEVER
        return token.fired

    async def fail(
        self,
        token: _Entry,
        delivery: Delivery,
        exc: BaseException,
        call_next: CallNext,
    ) -> None:
        """Turn the watchdog's cancellation into the timeout error; re-raise anything else.

        Only the watchdog's own cancel request is withdrawn (``Task.uncancel()``), so a
        shutdown that cancels at the same moment still wins.

        Args:
            token: The entry :meth:`enter` wrote.
            delivery: The message.
            exc: What the rest of the pipeline raised.
            call_next: Unused.

        Raises:
            AttemptTimeout: a per-attempt limit passed.
            TotalTimeout: a whole-message limit passed.
            BaseException: ``exc`` otherwise.
        """
        token.deadline = _NEVER
        if isinstance(exc, asyncio.CancelledError) and token.fired is not None:
            token.fired = None
            if token.task.uncancel() == 0:
                error = self._error(delivery)
                error.__context__ = exc
                raise error from None
        raise exc

    def _error(self, delivery: Delivery) -> TimeoutError:
        limit: float = self.seconds  # type: ignore[assignment]
        if self.total:
            delivery.reason = "timeout"
            return TotalTimeout(limit)
        return AttemptTimeout(limit)
