"""Circuit breaker middleware: sliding windows, slow-call detection, and a consumer that pauses.

A breaker stops calling a dependency that keeps failing and tries it again later with a few
probe calls. It trips on any of:

* failures of ``failure_threshold`` distinct messages in a row (one message failing again and
  again counts once, so a poison message alone never trips it);
* a failure rate over a sliding window (:class:`CountWindow`: the last *n* calls, or
  :class:`TimeWindow`: the last *n* seconds), once the window holds ``minimum_calls`` (a
  delivery's failed retries are not recorded again);
* a slow-call rate, where a call lasting at least ``slow_call_duration`` is slow.

It then stays open for ``open_wait`` seconds (growing by ``open_wait_multiplier`` on repeated
trips, up to ``open_wait_max``), goes half-open and admits ``half_open_probes`` probe calls;
their outcome closes or reopens it. Further calls during half-open are not permitted. In
pause mode the probes go to messages that have not failed through the breaker when such a
message waits (see :mod:`resilience.breaker.state`), so a bad message cannot keep it open.

What "not permitted" means depends on the middleware's ``mode``:

* ``"pause"`` (default): the delivery is *held* until a probe is admitted, and a delivery whose
  call failed because of the outage is held and replayed too, so nothing is dead-lettered
  however long the outage lasts (unless the message's total timeout ends the wait).
  :class:`CircuitBreaker` is a :class:`~resilience.types.Gate`, so
  :class:`~resilience.consumer.ResilientConsumer` also stops pulling new messages while the
  breaker is open.
* ``"fail_fast"``: the call raises :class:`~resilience.errors.CircuitOpen` at once (retryable
  for the shared classifier, so retry waits and the dead-letter layer handle it).

Failures are classified by the shared :class:`~resilience.classify.Classifier`: retryable
counts as a failure, terminal as a success (the dependency answered; the message was bad),
ignored and cancelled as neither. Breakers are named and shared through a
:class:`BreakerRegistry`: every middleware with the same name (on the same clock) drives one
breaker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Unpack

from ..classify import Classifier, Verdict, default_classifier
from ..clock import Clock
from ..errors import CircuitOpen, ConfigError
from ..hooks import SLOW_PATH, FixedAttributes, HookLayer
from ..types import Flow
from .config import (
    GATES_EXTRA,
    BreakerConfig,
    BreakerState,
    BreakerStateChanged,
    BreakerStats,
    CallNotPermitted,
)
from .registry import BreakerOptions, BreakerRegistry, get_breaker
from .state import DEFERRED, Breaker
from .window import FAILURE, SLOW

if TYPE_CHECKING:
    from ..delivery import Delivery
    from ..events import EventBus
    from ..types import CallNext

__all__ = ["MODES", "CircuitBreaker", "Mode"]

Mode = Literal["pause", "fail_fast"]
MODES: tuple[Mode, ...] = ("pause", "fail_fast")

_CLOSED = BreakerState.CLOSED
_NEVER_PAUSED = Flow()
_ALWAYS_ASK = Flow(steady=False)
_FORCED_CLOSED = BreakerState.FORCED_CLOSED
_IGNORED = Verdict.IGNORED
_RETRYABLE = Verdict.RETRYABLE


class CircuitBreaker(FixedAttributes, HookLayer):
    """Circuit-breaker middleware: ``Pipeline().use(CircuitBreaker("payments", ...))``.

    Put it inside retry (so each attempt is one breaker call) and outside the per-attempt
    timeout (so a timed-out attempt counts as a failure).

    Args:
        breaker: A name (looked up in ``registry``, created from ``config`` / ``options`` on
            first use) or a ready :class:`Breaker`.
        mode: ``"pause"`` holds deliveries while calls are not permitted (and makes the
            consumer stop pulling); ``"fail_fast"`` raises
            :class:`~resilience.errors.CircuitOpen` instead.
        classifier: Decides failure / success / neither (the default classifier if ``None``).
        clock: The breaker's clock when it is created here.
        registry: Where named breakers live (:data:`default_registry` by default).
        events: A bus that receives every state change of the breaker (the consumer's bus);
            events caused by a delivery also go to that delivery's bus.
        config: A ready :class:`BreakerConfig` (or give its fields as keywords).
        **options: :class:`BreakerConfig` fields.

    Raises:
        ConfigError: an invalid option, an unknown mode, or a conflicting config for the name.
    """

    __slots__ = ("__weakref__", "_pause", "breaker", "classifier", "events", "flow", "mode")

    fixed_attributes = frozenset({"breaker"})
    """``breaker`` is set once, when the layer is built: an inlined hook reads it then."""

    def __init__(
        self,
        breaker: Breaker | str = "default",
        *,
        mode: Mode = "pause",
        classifier: Classifier | None = None,
        clock: Clock | None = None,
        registry: BreakerRegistry | None = None,
        events: EventBus | None = None,
        config: BreakerConfig | None = None,
        **options: Unpack[BreakerOptions],
    ) -> None:
        if mode not in MODES:
            raise ConfigError(
                f"circuit breaker mode must be one of {', '.join(MODES)}; got {mode!r}"
            )
        if isinstance(breaker, Breaker):
            if config is not None or options or clock is not None or registry is not None:
                raise ConfigError(
                    "a ready Breaker carries its own config and clock: pass a name to configure"
                )
            self.breaker = breaker
        else:
            self.breaker = get_breaker(breaker, config, clock=clock, registry=registry, **options)
        self.mode: Mode = mode
        self._pause = mode == "pause"
        # The consumer's per-message check: the breaker's own flag in pause mode; a fail-fast
        # breaker never pauses the consumer; a subclass with its own ``paused`` is asked.
        self.flow: Flow = self.breaker.flow if self._pause else _NEVER_PAUSED
        if type(self).paused is not CircuitBreaker.paused:
            self.flow = _ALWAYS_ASK
        self.classifier = default_classifier if classifier is None else classifier
        self.events = events
        if events is not None:
            self.breaker._members.add(self)

    # -- the middleware ----------------------------------------------------------------------------

    def enter(self, delivery: Delivery) -> Any:
        """Admit the call while the breaker is closed (reading the clock only when timed).

        Args:
            delivery: The message.

        Returns:
            The admitted call's epoch, or ``(epoch, start)`` when slow calls are timed, or
            :data:`~resilience.hooks.SLOW_PATH` when
            the breaker is not closed (admission then waits or fails fast).
        """
        token = self.breaker._untimed_epoch  # closed, untimed: one attribute read
        if token < 0:
            return self._admission()
        return token

    def _admission(self) -> Any:
        """:meth:`enter` when the breaker is not closed or times slow calls."""
        breaker = self.breaker
        if breaker._state is not _CLOSED:
            return SLOW_PATH
        return (breaker._epoch, breaker._now())

    def leave(self, token: int | tuple[int, float], delivery: Delivery) -> None:
        """Record the successful call.

        Args:
            token: What :meth:`enter` returned.
            delivery: The message.
        """
        breaker = self.breaker
        if token == breaker._simple_epoch:  # closed, same epoch, nothing but the count to reset
            breaker._consecutive = 0
            return
        self._succeeded(token, delivery)

    def _succeeded(self, token: int | tuple[int, float], delivery: Delivery) -> None:
        """:meth:`leave` for a breaker with a window or timing (or whose epoch moved on)."""
        breaker = self.breaker
        if breaker._simple:  # the epoch moved on: the outcome is not recorded
            return
        epoch, start = _epoch_start(token)
        end = breaker._now() if breaker._timed else 0.0
        breaker._closed_success(epoch, start, end, delivery)

    async def fail(
        self,
        token: int | tuple[int, float],
        delivery: Delivery,
        exc: BaseException,
        call_next: CallNext,
    ) -> None:
        """Record the failed call; in pause mode, hold and replay an outage failure.

        Args:
            token: What :meth:`enter` returned.
            delivery: The message.
            exc: What the call raised.
            call_next: The rest of the pipeline, replayed once a call is permitted.

        Raises:
            BaseException: ``exc`` unless it is held and the replay succeeds.
        """
        if not isinstance(exc, Exception):
            raise exc
        epoch, start = _epoch_start(token)
        if not self._failed(exc, epoch, start, delivery, self.breaker._now):
            raise exc
        await self._guarded(delivery, call_next, self.breaker._now)

    async def slow(self, delivery: Delivery, call_next: CallNext) -> None:
        """Wait for (pause mode) or refuse (fail-fast mode) a call the breaker does not
        permit now, and record what permitted calls do.

        Args:
            delivery: The message.
            call_next: The rest of the pipeline.

        Raises:
            CircuitOpen: in ``fail_fast`` mode, when the call is not permitted.
        """
        await self._guarded(delivery, call_next, self.breaker._now)

    async def _guarded(
        self, delivery: Delivery, call_next: CallNext, now: Callable[[], float]
    ) -> None:
        breaker = self.breaker
        waiting = False
        while True:
            epoch = breaker._acquire(delivery)
            if epoch < 0:
                if not waiting:
                    waiting = True
                    self._not_permitted(delivery)
                if not self._pause:
                    raise CircuitOpen(breaker.name, self._retry_in())
                await breaker._wait_held(delivery, epoch == DEFERRED)
                continue
            waiting = False
            start = now() if breaker._slow_duration else 0.0
            try:
                await call_next(delivery)
            except Exception as exc:
                if self._failed(exc, epoch, start, delivery, now):
                    continue  # an outage failure in pause mode: hold, then replay
                raise
            except BaseException:
                breaker._release(epoch)
                raise
            code = 0
            end = 0.0
            if breaker._timed:
                end = now()
                if breaker._slow_duration and end - start >= breaker._slow_duration:
                    code = SLOW
            breaker._record(epoch, code, delivery, end)
            return

    def _failed(
        self,
        exc: Exception,
        epoch: int,
        start: float,
        delivery: Delivery,
        now: Callable[[], float],
    ) -> bool:
        """Record a failed call; whether the delivery should be held and replayed."""
        breaker = self.breaker
        verdict = self.classifier.classify(exc)
        if verdict is _IGNORED:
            breaker._release(epoch)
            return False
        code = FAILURE if verdict is _RETRYABLE else 0
        end = 0.0
        if breaker._timed:
            end = now()
            if breaker._slow_duration and end - start >= breaker._slow_duration:
                code |= SLOW
        breaker._record(epoch, code, delivery, end)
        if not (self._pause and code & FAILURE):
            return False
        self._mark(delivery)
        state = breaker._state
        return state is not _CLOSED and state is not _FORCED_CLOSED

    def _mark(self, delivery: Delivery) -> None:
        """List this pausing breaker on the delivery, for the dead-letter router."""
        extras = delivery.extras
        if extras is None:
            delivery.extras = {GATES_EXTRA: [self]}
            return
        gates: list[CircuitBreaker] = extras.setdefault(GATES_EXTRA, [])
        if not any(gate is self for gate in gates):
            gates.append(self)

    def _not_permitted(self, delivery: Delivery) -> None:
        breaker = self.breaker
        breaker._not_permitted += 1
        if self._pause:
            self._mark(delivery)
        if delivery.events:
            delivery.events.emit(
                CallNotPermitted(
                    message_id=delivery.message_id,
                    key=delivery.key,
                    name=breaker.name,
                    state=breaker._state,
                    held=self._pause,
                )
            )

    def _retry_in(self) -> float | None:
        until = self.breaker._open_until
        return None if until is None else max(0.0, until - self.breaker._now())

    # -- the consumer gate -------------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        """In pause mode: whether the breaker would not permit a new call right now."""
        # Read after every message by each consumer worker: the closed state answers at once.
        if not self._pause:
            return False
        breaker = self.breaker
        return breaker._state is not _CLOSED and breaker.paused

    async def wait_resumed(self) -> None:
        """Return once the breaker would permit a new call (at once in fail-fast mode)."""
        if self._pause:
            await self.breaker.wait_resumed()

    def holds(self, delivery: Delivery) -> bool:
        """In pause mode: whether a message that failed through this breaker must be held
        rather than dead-lettered; ``True`` while the breaker is forced open.

        A breaker that opened by itself does not say so: its failures may include bad
        messages, which must reach the dead-letter destination once the breaker closes (or
        their total timeout ends).

        Args:
            delivery: A delivery that went through this breaker and failed.

        Returns:
            Whether the dead-letter layer should hold it until the breaker admits calls.
        """
        return self._pause and self.breaker.forced_open

    # -- reading and control (shared by every middleware using the breaker) ------------------------

    @property
    def name(self) -> str:
        """The breaker's name."""
        return self.breaker.name

    @property
    def config(self) -> BreakerConfig:
        """The breaker's configuration."""
        return self.breaker.config

    @property
    def state(self) -> BreakerState:
        """The breaker's current state."""
        return self.breaker.state

    @property
    def stats(self) -> BreakerStats:
        """A snapshot: state, window counts and rates, consecutive failures, open-until."""
        return self.breaker.stats

    def subscribe(self, listener: Callable[[BreakerStateChanged], object]) -> Callable[[], None]:
        """Call ``listener`` with every state change of the (shared) breaker.

        Args:
            listener: Any callable taking a :class:`BreakerStateChanged`.

        Returns:
            A function that removes the listener again.
        """
        return self.breaker.subscribe(listener)

    def force_open(self) -> None:
        """Open the breaker until :meth:`reset`."""
        self.breaker.force_open()

    def force_closed(self) -> None:
        """Let everything through, recording nothing, until :meth:`reset`."""
        self.breaker.force_closed()

    def reset(self) -> None:
        """Close the breaker with an empty window."""
        self.breaker.reset()

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker({self.breaker.name!r}, mode={self.mode!r}, "
            f"state={self.breaker.state.value})"
        )


def _epoch_start(token: int | tuple[int, float]) -> tuple[int, float]:
    """The ``(epoch, start)`` of a call from :meth:`CircuitBreaker.enter`'s token."""
    return token if isinstance(token, tuple) else (token, 0.0)
