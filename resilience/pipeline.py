"""The pipeline: an ordered list of middleware composed around a handler.

A middleware is any callable ``async (delivery, call_next) -> None``. It may call ``call_next``
zero times (reject, short-circuit), once (observe, time-limit) or several times (retry), and it
can keep a context open around the whole call (a span, a log binding).

The pipeline is built once, at consumer start: layers are folded in reverse so the first one
listed is the outermost, and the pipeline is frozen (adding a layer afterwards raises). Layers
that offer the success-path hooks of :mod:`resilience.hooks` (every built-in one does) run
together in one coroutine frame; any other middleware links as a frame of its own, wherever it
is in the chain. The behaviour is the same either way.

Recommended order, outermost first, which the declarative :class:`~resilience.policy.Policy`
uses::

    telemetry -> dead_letter -> total timeout -> retry -> circuit breaker -> attempt timeout
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from .breaker import CircuitBreaker
from .dead_letter import DeadLetterRouter
from .hooks import compile_hooks, has_hooks, terminal
from .idempotency import Idempotency
from .retry import Retry
from .timeout import Timeout
from .types import CallNext, Handler, Middleware

if TYPE_CHECKING:
    from typing import Literal, Unpack

    from .breaker import BreakerOptions
    from .classify import Classifier
    from .clock import Clock
    from .dead_letter import DeadLetterSink
    from .delivery import Delivery
    from .idempotency import IdempotencyStore
    from .retry import Backoff, RetryBudget

__all__ = ["CallNext", "Handler", "Middleware", "Pipeline"]


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
        in_process: int | None = None,
        backend: Any = None,
        scrub: Callable[[str, Delivery], str] | None = None,
    ) -> Pipeline:
        """Append a :class:`~resilience.retry.Retry` layer (see its arguments; ``in_process``
        with a ``backend`` that can delay redelivery hands later retries to the broker)."""
        return self.use(
            Retry(
                attempts=attempts,
                wait=wait,
                max_elapsed=max_elapsed,
                max_retry_after=max_retry_after,
                classifier=classifier,
                budget=budget,
                clock=clock,
                in_process=in_process,
                backend=backend,
                scrub=scrub,
            )
        )

    def dead_letter(self, sink: DeadLetterSink, **options: Any) -> Pipeline:
        """Append a :class:`~resilience.dead_letter.DeadLetterRouter` writing to ``sink``.

        List it first (outside retry and timeouts); ``options`` are the router's keyword
        arguments (``classifier``, ``clock``, ``options``, ``validate``, ...).
        """
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
        return self.use(
            CircuitBreaker(name, mode=mode, clock=clock, classifier=classifier, **options)
        )

    def timeout(self, seconds: float | timedelta, *, clock: Clock | None = None) -> Pipeline:
        """Append a per-attempt :class:`~resilience.timeout.Timeout` (put it inside retry)."""
        return self.use(Timeout(seconds, clock=clock))

    def total_timeout(self, seconds: float | timedelta, *, clock: Clock | None = None) -> Pipeline:
        """Append a whole-message :class:`~resilience.timeout.Timeout` (put it outside retry)."""
        return self.use(Timeout(seconds, total=True, clock=clock))

    def idempotent(self, store: IdempotencyStore, **options: Any) -> Pipeline:
        """Append an :class:`~resilience.idempotency.Idempotency` layer on ``store``.

        List it after dead-letter routing and before retry; ``options`` are the layer's keyword
        arguments (``header``, ``key``, ``lease``, ``ttl``, ``wait``, ...).
        """
        return self.use(Idempotency(store, **options))

    def build(self, handler: Handler, *, fuse: bool = True, inline: bool = True) -> CallNext:
        """Freeze the pipeline and compose it around ``handler``.

        Args:
            handler: The user's handler.
            fuse: Run each stretch of neighbouring layers that offer the success-path hooks
                (:mod:`resilience.hooks`) in one coroutine frame; the behaviour is the same
                either way, ``False`` links every layer as its own frame.
            inline: In those runs, paste the body of each simple ``enter`` / ``leave`` hook
                into the run instead of calling it (read from the hook's source, see
                :mod:`resilience.hooks`); the behaviour is the same either way, ``False``
                calls every hook.

        Returns:
            ``async (delivery) -> None`` running every layer and finally
            ``handler(delivery.payload)``.

        Raises:
            TypeError: ``handler`` is not callable.
        """
        if not callable(handler):
            raise TypeError(f"handler must be an async callable, got {handler!r}")
        self._frozen = True

        layers = self._layers
        call: CallNext = terminal(handler)  # a plain function: no extra coroutine frame
        innermost = True
        end = len(layers)
        while end > 0:
            start = end
            if fuse:
                while start > 0 and has_hooks(layers[start - 1]):
                    start -= 1
            if start < end:
                run: list[Any] = layers[start:end]
                call = compile_hooks(
                    run,
                    call,
                    handler if innermost else None,
                    fresh=fuse and start == 0,
                    inline=inline,
                )
                end = start
            else:
                end -= 1
                call = _link(layers[end], call)
            innermost = False
        return call

    def compile(self, handler: Handler, *, inline: bool = True) -> CallNext:
        """:meth:`build` with the hooks compiled (the default).

        Args:
            handler: The user's handler.
            inline: Paste simple hook bodies into the compiled runs (see :meth:`build`).

        Returns:
            ``async (delivery) -> None``.
        """
        return self.build(handler, inline=inline)

    def __repr__(self) -> str:
        inner = ", ".join(type(layer).__name__ for layer in self._layers)
        return f"Pipeline({inner})"
