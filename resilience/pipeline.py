"""Middleware types and the pipeline that composes them around a handler.

A middleware is any callable ``async (delivery, call_next) -> None``. It may call ``call_next``
zero times (reject, short-circuit), once (observe, time-limit) or several times (retry), and it
can keep a context open around the whole call (a span, a log binding).

The pipeline is built once, at consumer start: layers are folded in reverse so the first one
listed is the outermost, and the pipeline is frozen (adding a layer afterwards raises).

Recommended order, outermost first, which the declarative :class:`~resilience.policy.Policy`
uses::

    telemetry -> dead_letter -> total timeout -> retry -> circuit breaker -> attempt timeout
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from typing import Literal, Unpack

    from ._fused import Fused
    from .breaker import BreakerOptions
    from .classify import Classifier
    from .clock import Clock
    from .dead_letter import DeadLetterSink
    from .delivery import Delivery
    from .idempotency import IdempotencyStore
    from .retry import Backoff, RetryBudget

__all__ = ["CallNext", "Compiled", "Handler", "Middleware", "Pipeline"]

Handler = Callable[[dict[str, Any]], Awaitable[None]]
"""The user's handler: ``async def handler(payload: dict) -> None``."""

CallNext = Callable[["Delivery"], Awaitable[None]]
"""The rest of the pipeline, as seen from one middleware."""


class Middleware(Protocol):
    """``async def __call__(self, delivery, call_next) -> None``.

    Optionally a middleware also offers ``link(call_next) -> CallNext``, returning the callable
    the pipeline uses in its place (for example ``functools.partial(self._run, call_next)``),
    which saves a keyword-argument call per message.
    """

    def __call__(self, delivery: Delivery, call_next: CallNext) -> Awaitable[None]:
        """Process ``delivery``, calling ``call_next(delivery)`` as often as it decides."""
        ...


def _link(layer: Middleware, call_next: CallNext) -> CallNext:
    # A layer may link itself (``layer.link(call_next)``), typically as a positional
    # functools.partial, the cheapest form. Otherwise functools.partial with the ``call_next``
    # keyword adds no Python frame; anything else gets a closure (a fresh one per layer, never a
    # loop variable).
    link = getattr(layer, "link", None)
    if callable(link):
        linked: CallNext = link(call_next)
        return linked
    try:
        params = inspect.signature(layer).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    if "call_next" in params:
        return functools.partial(layer, call_next=call_next)

    async def step(delivery: Delivery) -> None:
        await layer(delivery, call_next)

    return step


class Compiled(NamedTuple):
    """A built pipeline: :attr:`call` runs it; :attr:`fused` is set when every layer is a
    built-in one fused into a single coroutine (see :mod:`resilience._fused`)."""

    call: CallNext
    fused: Fused | None


class Pipeline:
    """An ordered list of middleware, first listed = outermost.

    The convenience methods read like the policy they build::

        pipeline = Pipeline().dead_letter(sink).retry(attempts=5).timeout(2.0)

    Args:
        *layers: Middleware to start with, outermost first.
    """

    __slots__ = ("_frozen", "_layers")

    def __init__(self, *layers: Middleware) -> None:
        self._layers: list[Middleware] = []
        self._frozen = False
        for layer in layers:
            self.use(layer)

    @property
    def layers(self) -> tuple[Middleware, ...]:
        """The middleware, outermost first."""
        return tuple(self._layers)

    @property
    def frozen(self) -> bool:
        """Whether :meth:`build` has run (no more layers can be added)."""
        return self._frozen

    def use(self, layer: Middleware) -> Pipeline:
        """Append ``layer`` (inside every layer added before it).

        Raises:
            RuntimeError: the pipeline was already built.
            TypeError: ``layer`` is not callable.
        """
        if self._frozen:
            raise RuntimeError("the pipeline is frozen: it was built when the consumer started")
        if not callable(layer):
            raise TypeError(f"middleware must be callable, got {layer!r}")
        self._layers.append(layer)
        return self

    def retry(
        self,
        *,
        attempts: int = 3,
        wait: Backoff | None = None,
        max_elapsed: float | timedelta | None = None,
        max_retry_after: float | timedelta = 60.0,
        classifier: Classifier | None = None,
        budget: RetryBudget | None = None,
        clock: Clock | None = None,
    ) -> Pipeline:
        """Append a :class:`~resilience.retry.Retry` layer (see its arguments)."""
        from .retry import Retry

        return self.use(
            Retry(
                attempts=attempts,
                wait=wait,
                max_elapsed=max_elapsed,
                max_retry_after=max_retry_after,
                classifier=classifier,
                budget=budget,
                clock=clock,
            )
        )

    def dead_letter(self, sink: DeadLetterSink, **options: Any) -> Pipeline:
        """Append a :class:`~resilience.dead_letter.DeadLetterRouter` writing to ``sink``.

        List it first (outside retry and timeouts); ``options`` are the router's keyword
        arguments (``classifier``, ``clock``, ``options``, ``validate``, ...).
        """
        from .dead_letter import DeadLetterRouter

        return self.use(DeadLetterRouter(sink, **options))

    def circuit_breaker(
        self,
        name: str = "default",
        *,
        mode: Literal["pause", "fail_fast"] = "pause",
        clock: Clock | None = None,
        classifier: Classifier | None = None,
        **options: Unpack[BreakerOptions],
    ) -> Pipeline:
        """Append a :class:`~resilience.breaker.CircuitBreaker` named ``name`` (put it inside
        retry); breakers with the same name and clock share state."""
        from .breaker import CircuitBreaker

        return self.use(
            CircuitBreaker(name, mode=mode, clock=clock, classifier=classifier, **options)
        )

    def timeout(self, seconds: float | timedelta, *, clock: Clock | None = None) -> Pipeline:
        """Append a per-attempt :class:`~resilience.timeout.Timeout` (put it inside retry)."""
        from .timeout import Timeout

        return self.use(Timeout(seconds, clock=clock))

    def total_timeout(self, seconds: float | timedelta, *, clock: Clock | None = None) -> Pipeline:
        """Append a whole-message :class:`~resilience.timeout.Timeout` (put it outside retry)."""
        from .timeout import Timeout

        return self.use(Timeout(seconds, total=True, clock=clock))

    def idempotent(self, store: IdempotencyStore, **options: Any) -> Pipeline:
        """Append an :class:`~resilience.idempotency.Idempotency` layer on ``store``.

        List it after dead-letter routing and before retry; ``options`` are the layer's keyword
        arguments (``header``, ``key``, ``lease``, ``ttl``, ``wait``, ...).
        """
        from .idempotency import Idempotency

        return self.use(Idempotency(store, **options))

    def build(self, handler: Handler, *, fuse: bool = True) -> CallNext:
        """Freeze the pipeline and compose it around ``handler``.

        Args:
            handler: The user's handler.
            fuse: Run the innermost built-in layers (dead-letter routing, retry, circuit
                breaker, per-attempt timeout, in that order) as one coroutine on the success
                path; the behaviour is the same either way (see :mod:`resilience._fused`),
                ``False`` links every layer as its own frame.

        Returns:
            ``async (delivery) -> None`` running every layer and finally
            ``handler(delivery.payload)``.
        """
        return self.compile(handler, fuse=fuse).call

    def compile(self, handler: Handler, *, fuse: bool = True) -> Compiled:
        """:meth:`build`, also returning the fused run when it covers every layer (which lets
        the consumer inline the success path in its own loop)."""
        if not callable(handler):
            raise TypeError(f"handler must be an async callable, got {handler!r}")
        self._frozen = True

        def terminal(delivery: Delivery) -> Awaitable[None]:
            # A plain function returning the handler's awaitable: no extra coroutine frame.
            return handler(delivery.payload)

        layers = self._layers
        start = len(layers)
        if fuse:
            from ._fused import fusable_suffix

            start = fusable_suffix(layers)
        call: CallNext = terminal
        chains = [call]
        for layer in reversed(layers[start:]):
            call = _link(layer, call)
            chains.append(call)
        fused: Fused | None = None
        if start < len(layers) or (fuse and not layers):
            from ._fused import Fused

            chains.reverse()
            fused = Fused(layers[start:], chains, handler)
            call = fused.call
        for layer in reversed(layers[:start]):
            call = _link(layer, call)
        return Compiled(call, fused if start == 0 else None)

    def __repr__(self) -> str:
        inner = ", ".join(type(layer).__name__ for layer in self._layers)
        return f"Pipeline({inner})"
