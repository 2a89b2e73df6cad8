"""The success path of the built-in layers as one coroutine.

Each middleware is a coroutine frame of its own: a handler behind dead-letter routing, retry, a
circuit breaker and an attempt timeout runs through four frames, and on the success path every
one of them only checks a flag on the way in and clears one on the way out. When the innermost
layers of a pipeline are built-in ones in the recommended order (any of, outermost first:
:class:`~resilience.dead_letter.DeadLetterRouter`, :class:`~resilience.retry.Retry`,
:class:`~resilience.breaker.CircuitBreaker`, a per-attempt
:class:`~resilience.timeout.Timeout`), :func:`fuse` turns that run into one coroutine that does
those checks inline and awaits the handler directly.

Nothing about the behaviour changes:

* When any layer would leave its own fast path (a decode error, a validator, the attempt limit
  reached, the breaker not closed), the fused coroutine runs the layers' own linked chain from the
  top, before anything has happened.
* When the handler raises, the failure goes to each layer's own continuation, innermost first,
  exactly as if it had escaped the layer's ``call_next``: the timeout turns its cancellation into
  :class:`~resilience.errors.AttemptTimeout`, the breaker records it (and holds and replays it in
  pause mode), retry retries it, the router dead-letters it. Every continuation is the layer's own
  method, called with the layers' own linked chain below it.

Only the exact built-in classes are fused, never subclasses (which may override the hot path).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .breaker import CircuitBreaker
from .breaker.state import _CLOSED
from .clock import monotonic_function
from .dead_letter.middleware import DeadLetterRouter
from .errors import DeadLetterWriteError
from .retry import Retry
from .timeout import Timeout

if TYPE_CHECKING:
    from .delivery import Delivery
    from .pipeline import CallNext, Handler, Middleware

__all__ = ["Fused", "fusable_suffix"]

_SLOTS: tuple[type, ...] = (DeadLetterRouter, Retry, CircuitBreaker, Timeout)


def _slot(layer: object) -> int:
    """Position of ``layer`` in the fusable order, or -1 when it cannot be fused."""
    kind = type(layer)
    if kind is DeadLetterRouter:
        return 0 if layer._validate is None else -1  # type: ignore[attr-defined]
    if kind is Retry:
        return 1
    if kind is CircuitBreaker:
        return 2
    if kind is Timeout:
        return -1 if layer.total else 3  # type: ignore[attr-defined]
    return -1


def fusable_suffix(layers: list[Middleware]) -> int:
    """Index of the first layer of the longest fusable run at the inner end of ``layers``
    (``len(layers)`` when none can be fused)."""
    start = len(layers)
    last = len(_SLOTS)
    while start > 0:
        slot = _slot(layers[start - 1])
        if slot < 0 or slot >= last:
            break
        last = slot
        start -= 1
    return start


class Fused:
    """A fused run of built-in layers: its parts, its continuations and its entry point.

    :attr:`call` is the ``CallNext`` for the run. The other attributes are what a caller that
    inlines the success path itself (the consumer's one-at-a-time loop) needs; ``None`` where the
    run has no such layer.

    Args:
        layers: The fused layers, outermost first (a run accepted by :func:`fusable_suffix`).
        chains: ``chains[i]`` is the layers' own linked chain from ``layers[i]`` inwards, and
            ``chains[len(layers)]`` calls the handler: the slow path and the continuations.
        handler: The user's handler.
    """

    def __init__(self, layers: list[Middleware], chains: list[CallNext], handler: Handler) -> None:
        found: dict[type, Any] = {type(layer): layer for layer in layers}
        below = {type(layer): chains[i + 1] for i, layer in enumerate(layers)}
        self.handler = handler
        self.top: CallNext = chains[0]
        """The layers' own chain for the whole run (the slow path)."""
        self.router: DeadLetterRouter | None = found.get(DeadLetterRouter)
        self.retry: Retry | None = found.get(Retry)
        self.guard: CircuitBreaker | None = found.get(CircuitBreaker)
        self.timeout: Timeout | None = found.get(Timeout)
        self.attempts: int = self.retry.attempts if self.retry is not None else sys.maxsize
        """The attempt limit (no limit without retry)."""
        self.budget = self.retry.budget if self.retry is not None else None
        self.breaker = self.guard.breaker if self.guard is not None else None
        self.breaker_now: Callable[[], float] = (
            monotonic_function(self.breaker.clock) if self.breaker is not None else _never
        )
        self.watchdog = self.timeout._watchdog if self.timeout is not None else None
        self.limit: float = self.timeout.seconds if self.timeout is not None else 0.0
        self._below_router = below.get(DeadLetterRouter)
        self._below_retry = below.get(Retry)
        self._below_breaker = below.get(CircuitBreaker)
        self.call: CallNext = self._compose()

    async def failed(
        self,
        delivery: Delivery,
        exc: BaseException,
        epoch: int,
        start: float,
        task: asyncio.Task[Any] | None,
    ) -> None:
        """Continue after the handler raised ``exc`` on the fast path: each layer's own
        handling of an exception escaping its ``call_next``, innermost first.

        Args:
            delivery: The delivery (built now, if the caller had not needed one before).
            exc: What the handler raised.
            epoch: The breaker epoch read on the way in (0 without a breaker).
            start: The breaker's start time read on the way in (0.0 when untimed).
            task: The task registered with the timeout watchdog (``None`` without a timeout).
        """
        error: BaseException | None = exc
        timeout = self.timeout
        if timeout is not None:
            watchdog = timeout._watchdog
            watchdog.active.pop(task, None)  # type: ignore[arg-type]
            if isinstance(exc, asyncio.CancelledError) and task in watchdog.fired:
                watchdog.fired.discard(task)
                if task.uncancel() == 0:
                    error = timeout._error(delivery)
                    error.__suppress_context__ = True
        guard = self.guard
        if guard is not None and isinstance(error, Exception):
            assert self._below_breaker is not None
            try:
                if not guard._failed(error, epoch, start, delivery, self.breaker_now):
                    raise error
                await guard._guarded(delivery, self._below_breaker, self.breaker_now)
                error = None
            except BaseException as again:
                error = again
            if error is None:
                return
        retry = self.retry
        if retry is not None and isinstance(error, Exception):
            assert self._below_retry is not None
            try:
                await retry._retry(delivery, self._below_retry, error)
                return
            except BaseException as again:
                error = again
        router = self.router
        if (
            router is not None
            and isinstance(error, Exception)
            and not isinstance(error, DeadLetterWriteError)
        ):
            assert self._below_router is not None
            await router._failed_call(delivery, self._below_router, error)
            return
        assert error is not None
        raise error

    async def finish_fired(
        self, delivery: Delivery, task: asyncio.Task[Any], epoch: int, start: float
    ) -> None:
        """The rare end of a fast-path success in the loop turn the watchdog fired: absorb its
        cancel, then record the success with the breaker."""
        assert self.timeout is not None
        await self.timeout._absorb(task)
        breaker = self.breaker
        if breaker is not None:
            end = self.breaker_now() if breaker._timed else 0.0
            breaker._closed_success(epoch, start, end, delivery)

    def _compose(self) -> CallNext:
        # A closure: its free variables are the cheapest reads CPython has.
        top = self.top
        handler = self.handler
        router = self.router
        attempts = self.attempts
        budget = self.budget
        breaker = self.breaker
        breaker_now = self.breaker_now
        watchdog = self.watchdog
        limit = self.limit
        active = watchdog.active if watchdog is not None else {}
        fired = watchdog.fired if watchdog is not None else set()
        failed = self.failed
        finish_fired = self.finish_fired

        async def fused(delivery: Delivery) -> None:
            # Every layer's way in, checked before anything happens: off the fast path, the
            # layers' own chain runs from the top.
            if router is not None:
                message = delivery.message
                if message is not None and message.decode_error is not None:
                    return await top(delivery)
            if delivery.attempt > attempts:
                return await top(delivery)
            epoch = 0
            start = 0.0
            if breaker is not None:
                if breaker._state is not _CLOSED:
                    return await top(delivery)
                epoch = breaker._epoch
                if breaker._slow_duration:
                    start = breaker_now()
            if budget is not None:
                budget.deposit()
            task = None
            if watchdog is not None:
                task = delivery.task or asyncio.current_task()
                if task is not watchdog.last_task:
                    if task is None:
                        raise RuntimeError("Timeout middleware must run inside an asyncio task")
                    loop = task.get_loop()
                    if loop is not watchdog.loop:
                        watchdog.bind(loop)
                    watchdog.last_task = task
                deadline = watchdog.now() + limit
                if delivery.deadline is not None and delivery.deadline < deadline:
                    deadline = delivery.deadline
                active[task] = deadline
                if deadline < watchdog.armed_at:
                    watchdog.arm(deadline)
            try:
                await handler(delivery.payload)
            except BaseException as exc:
                error = exc
            else:
                if watchdog is not None:
                    active.pop(task, None)
                    if fired and task in fired:
                        return await finish_fired(delivery, task, epoch, start)  # type: ignore[arg-type]
                if breaker is not None:
                    if breaker._simple:
                        if breaker._epoch == epoch:
                            breaker._consecutive = 0
                    else:
                        end = breaker_now() if breaker._timed else 0.0
                        breaker._closed_success(epoch, start, end, delivery)
                return None
            # Outside the except block, as in the layers themselves: retries run with no
            # exception being handled, so the handler's own errors do not chain onto this one.
            await failed(delivery, error, epoch, start, task)
            return None

        return fused


def _never() -> float:
    raise AssertionError("no breaker clock in this fused chain")
