"""ResilientConsumer: AsyncLoopConsumer with a resilience pipeline around the handler."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from abe.backends.message_queue.base.extensions import SettlingBackend
from abe.backends.message_queue.consumer import AsyncLoopConsumer

from ._breaker_state import _CLOSED
from .classify import Classifier, Verdict, default_classifier, terminal_reason
from .clock import Clock, default_clock, monotonic_function
from .delivery import Delivery, new_delivery
from .errors import ConfigError, DeadLetterWriteError, Unsettled
from .events import EventBus, MessageSettled, Outcome
from .pipeline import Pipeline

if TYPE_CHECKING:
    from abe.backends.message_queue.base import MessageQueueBackend
    from abe.backends.message_queue.base.extensions import InboundMessage

    from ._fused import Fused
    from .pipeline import CallNext, Handler, Middleware
    from .policy import Policy

__all__ = ["Gate", "ResilientConsumer"]

logger = logging.getLogger(__name__)


@runtime_checkable
class Gate(Protocol):
    """A middleware that can ask the consumer to stop pulling messages for a while.

    The circuit breaker is one: while it is open the consumer holds off instead of feeding it
    messages that would only fail.
    """

    @property
    def paused(self) -> bool:
        """Whether the consumer should stop pulling now."""
        ...

    async def wait_resumed(self) -> None:
        """Return once pulling may go on."""
        ...


class ResilientConsumer(AsyncLoopConsumer):
    """An :class:`~abe.backends.message_queue.consumer.AsyncLoopConsumer` that runs every message
    through a resilience pipeline and settles it according to the outcome.

    It keeps the base rules: same ``backend`` and ``group`` arguments, ``run()`` / ``shutdown()``
    lifecycle, ``asyncio.CancelledError`` propagates, and an exception escaping the pipeline is
    logged and never stops the loop.

    Settlement: with a backend implementing
    :class:`~abe.backends.message_queue.base.SettlingBackend` a message is acknowledged only once
    its outcome is final (success, dead-lettered, dropped, or failed without a dead-letter
    destination); a cancelled message, or one whose dead-letter write failed, is released and
    delivered again. With a plain backend, messages are at-most-once: the backend considers a
    message delivered as soon as ``consume()`` yields it.

    Args:
        backend: The backend to consume from.
        group: Consumer group forwarded to the backend.
        policy: A :class:`~resilience.policy.Policy`, a ready
            :class:`~resilience.pipeline.Pipeline`, or a sequence of middleware; ``None`` uses
            ``Policy()`` (the defaults).
        concurrency: Messages processed at once (1 keeps stream order).
        drain_timeout: Seconds :meth:`shutdown` lets in-flight messages finish before cancelling.
        clock: Time source for every timer (the event loop's by default).
        events: Bus for event records (one is created when ``None``).
        classifier: Decides what an escaping exception means (defaults to the policy's).
    """

    def __init__(
        self,
        backend: MessageQueueBackend,
        group: str | None = None,
        *,
        policy: Policy | Pipeline | Sequence[Middleware] | None = None,
        concurrency: int = 1,
        drain_timeout: float = 30.0,
        clock: Clock | None = None,
        events: EventBus | None = None,
        classifier: Classifier | None = None,
    ) -> None:
        super().__init__(backend, group)
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"concurrency must be an integer >= 1, got {concurrency!r}")
        if not drain_timeout >= 0:
            raise ConfigError(f"drain_timeout must be >= 0 seconds, got {drain_timeout!r}")
        self.policy = policy
        self.concurrency = concurrency
        self.drain_timeout = float(drain_timeout)
        self.clock: Clock = clock or default_clock
        self.events = events if events is not None else EventBus()
        self._classifier = classifier
        self._pipeline: Pipeline | None = None
        self._stopping = False
        self._busy = False
        self._in_flight: set[asyncio.Task[None]] = set()

    # -- building ------------------------------------------------------------------------------

    def _resolve(self, handler: Handler) -> tuple[Pipeline, Handler, Classifier]:
        from .policy import Policy, policy_of

        handler_policy, inner = policy_of(handler)
        policy = self.policy
        if handler_policy is not None:
            if policy is not None:
                raise ConfigError(
                    "the handler is decorated with @resilient and the consumer was given a "
                    "policy too: use one of them"
                )
            policy, handler = handler_policy, inner
        if policy is None:
            policy = Policy()
        classifier = self._classifier
        if isinstance(policy, Policy):
            pipeline = policy.pipeline(
                clock=self.clock,
                backend=self.backend,
                group=self.group,
                handler=handler,
                events=self.events,
            )
            classifier = classifier or policy.classifier()
        elif isinstance(policy, Pipeline):
            pipeline = policy
        else:
            pipeline = Pipeline(*policy)
        return pipeline, handler, classifier or default_classifier

    # -- running -------------------------------------------------------------------------------

    async def _consume(self, handler: Handler) -> None:
        pipeline, handler, classifier = self._resolve(handler)
        self._pipeline = pipeline
        compiled = pipeline.compile(handler)
        call = compiled.call
        gates = tuple(layer for layer in pipeline.layers if isinstance(layer, Gate))
        self._stopping = False
        backend = self.backend
        settling = isinstance(backend, SettlingBackend)
        source: AsyncIterator[Any]
        if settling:
            source = backend.deliveries(group=self.group)  # type: ignore[attr-defined]
        else:
            source = backend.consume(group=self.group)
        try:
            fused = compiled.fused
            ack_nowait = getattr(backend, "ack_nowait", None) if settling else None
            if (
                self.concurrency == 1
                and fused is not None
                and ack_nowait is not None
                and (fused.breaker is None or fused.breaker._simple)
            ):
                await self._loop_fused(source, fused, call, classifier, ack_nowait)
            elif self.concurrency == 1:
                await self._loop_inline(source, call, classifier, gates, settling, ack_nowait)
            else:
                await self._loop_concurrent(source, call, classifier, gates, settling)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self._stopping or task is None or task.cancelling() > 1:
                await self._abort_in_flight()
                raise
            # Graceful shutdown interrupted the pull: stop pulling, let in-flight work finish.
            task.uncancel()
            await self._drain_in_flight()
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def _loop_inline(
        self,
        source: AsyncIterator[Any],
        call: CallNext,
        classifier: Classifier,
        gates: tuple[Gate, ...],
        settling: bool,
        ack_nowait: Callable[[InboundMessage], None] | None,
    ) -> None:
        # One message at a time, no task per message, no coroutine per settlement when the
        # backend offers ack_nowait.
        now = monotonic_function(self.clock)
        events = self.events
        task = asyncio.current_task()
        take = getattr(source, "next_nowait", None)
        pull = source.__anext__
        while True:
            message = take() if take is not None else None
            if message is None:
                try:
                    message = await pull()
                except StopAsyncIteration:
                    return
            if settling:
                delivery = new_delivery(message, now(), events, task)
            else:
                delivery = Delivery(message, None, now(), events)
                delivery.task = task
            self._busy = True
            try:
                await call(delivery)
            except BaseException as exc:
                self._busy = False
                await self._failed(delivery, exc, classifier, settling)
            else:
                self._busy = False
                if ack_nowait is not None:
                    try:
                        ack_nowait(message)
                    except Exception as ack_error:
                        self._ack_failed(delivery, ack_error)
                elif settling:
                    await self._ack(delivery)
                if events.listeners:
                    self._succeeded(delivery)
            if self._stopping:
                return
            for gate in gates:
                if gate.paused:
                    await gate.wait_resumed()

    async def _loop_fused(
        self,
        source: AsyncIterator[Any],
        fused: Fused,
        call: CallNext,
        classifier: Classifier,
        ack_nowait: Callable[[InboundMessage], None],
    ) -> None:
        # _loop_inline with the fused layers' success path written out in the loop itself: no
        # Delivery object, no coroutine frame besides the handler's, one clock read. Anything
        # off that path (an event listener, a decode error, the attempt limit, the breaker not
        # closed, a failure) takes the layers' own code with a Delivery built then; see
        # resilience._fused for why the behaviour is the same.
        now = monotonic_function(self.clock)
        events = self.events
        task = asyncio.current_task()
        assert task is not None
        handler = fused.handler
        router = fused.router
        attempts = fused.attempts
        budget = fused.budget
        breaker = fused.breaker
        breaker_now = fused.breaker_now
        slow_duration = breaker._slow_duration if breaker is not None else 0.0
        watchdog = fused.watchdog
        limit = fused.limit
        active: dict[asyncio.Task[Any], float] = {}
        fired: set[asyncio.Task[Any]] = set()
        shared_clock = False
        if watchdog is not None:
            loop = task.get_loop()
            if loop is not watchdog.loop:
                watchdog.bind(loop)
            watchdog.last_task = task
            active, fired = watchdog.active, watchdog.fired
            shared_clock = watchdog.clock is self.clock
        guard = fused.guard  # the only gate among the fused layers
        take = getattr(source, "next_nowait", None)
        pull = source.__anext__
        while True:
            message = take() if take is not None else None
            if message is None:
                try:
                    message = await pull()
                except StopAsyncIteration:
                    return
            started = now()
            self._busy = True
            if (
                events.listeners
                or (router is not None and message.decode_error is not None)
                or message.delivery_count > attempts
                or (breaker is not None and breaker._state is not _CLOSED)
            ):
                delivery = new_delivery(message, started, events, task)
                await self._settle_step(delivery, call(delivery), classifier, ack_nowait)
            else:
                epoch = 0
                start = 0.0
                if breaker is not None:
                    epoch = breaker._epoch
                    if slow_duration:
                        start = breaker_now()
                if budget is not None:
                    budget.deposit()
                if watchdog is not None:
                    deadline = (started if shared_clock else watchdog.now()) + limit
                    active[task] = deadline
                    if deadline < watchdog.armed_at:
                        watchdog.arm(deadline)
                try:
                    await handler(message.payload)
                except BaseException as exc:
                    error: BaseException | None = exc
                else:
                    error = None
                if error is None and not (watchdog is not None and fired and task in fired):
                    if watchdog is not None:
                        del active[task]
                    if breaker is not None and breaker._epoch == epoch:
                        breaker._consecutive = 0
                    self._busy = False
                    try:
                        ack_nowait(message)
                    except Exception as ack_error:
                        self._ack_failed(new_delivery(message, started, events, task), ack_error)
                    if events.listeners:  # subscribed while the handler ran
                        self._succeeded(new_delivery(message, started, events, task))
                else:
                    delivery = new_delivery(message, started, events, task)
                    if error is None:
                        del active[task]
                        step = fused.finish_fired(delivery, task, epoch, start)
                    else:
                        step = fused.failed(delivery, error, epoch, start, task)
                    error = None
                    await self._settle_step(delivery, step, classifier, ack_nowait)
            if self._stopping:
                return
            if guard is not None and breaker._state is not _CLOSED and guard.paused:  # type: ignore[union-attr]
                await guard.wait_resumed()

    async def _settle_step(
        self,
        delivery: Delivery,
        step: Awaitable[None],
        classifier: Classifier,
        ack_nowait: Callable[[InboundMessage], None],
    ) -> None:
        """Await ``step`` (the pipeline, or the rest of it, for ``delivery``) and settle the
        delivery by its outcome, as the inline loop does."""
        try:
            await step
        except BaseException as exc:
            self._busy = False
            await self._failed(delivery, exc, classifier, True)
            return
        self._busy = False
        try:
            ack_nowait(delivery.message)  # type: ignore[arg-type]
        except Exception as ack_error:
            self._ack_failed(delivery, ack_error)
        if self.events.listeners:
            self._succeeded(delivery)

    async def _loop_concurrent(
        self,
        source: AsyncIterator[Any],
        call: CallNext,
        classifier: Classifier,
        gates: tuple[Gate, ...],
        settling: bool,
    ) -> None:
        now = monotonic_function(self.clock)
        events = self.events
        slots = asyncio.Semaphore(self.concurrency)
        in_flight = self._in_flight
        iterator = source.__aiter__()

        def done(task: asyncio.Task[None]) -> None:
            in_flight.discard(task)
            slots.release()

        while not self._stopping:
            await slots.acquire()
            for gate in gates:
                if gate.paused:
                    await gate.wait_resumed()
            try:
                message = await iterator.__anext__()
            except StopAsyncIteration:
                slots.release()
                break
            if settling:
                delivery = new_delivery(message, now(), events, None)
            else:
                delivery = Delivery(message, None, now(), events)
            task = asyncio.create_task(self._process(delivery, call, classifier, settling))
            in_flight.add(task)
            task.add_done_callback(done)
        await self._drain_in_flight()

    async def _drain_in_flight(self) -> None:
        while self._in_flight:
            await asyncio.wait(set(self._in_flight))

    async def _abort_in_flight(self) -> None:
        tasks = set(self._in_flight)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def _process(
        self, delivery: Delivery, call: CallNext, classifier: Classifier, settling: bool
    ) -> None:
        """Run one delivery through the pipeline and settle it."""
        delivery.task = asyncio.current_task()
        try:
            await call(delivery)
        except BaseException as exc:
            await self._failed(delivery, exc, classifier, settling)
            return
        if settling:
            await self._ack(delivery)
        if self.events:
            self._succeeded(delivery)

    async def _failed(
        self, delivery: Delivery, exc: BaseException, classifier: Classifier, settling: bool
    ) -> None:
        """Settle a delivery whose pipeline raised; re-raises what must propagate."""
        if isinstance(exc, asyncio.CancelledError):
            delivery.outcome = Outcome.CANCELLED
            if settling:
                await self._release(delivery)
            self._settled(delivery, None)
            raise exc
        if not isinstance(exc, Exception):
            raise exc  # KeyboardInterrupt, SystemExit: the process is going down
        if isinstance(exc, Unsettled):
            delivery.outcome = Outcome.UNSETTLED
            failed_write = isinstance(exc, DeadLetterWriteError)
            logger.log(
                logging.ERROR if failed_write else logging.INFO,
                "%s; message %s left unacknowledged for redelivery: %s",
                "Dead-letter write failed" if failed_write else "Message not settled now",
                delivery.message_id,
                exc,
                exc_info=exc if failed_write else None,
                extra={"message_id": delivery.message_id, "key": delivery.key},
            )
            if settling:
                await self._release(delivery)
            self._settled(delivery, exc)
            return
        verdict = classifier.classify(exc)
        if verdict is Verdict.IGNORED:
            delivery.outcome = Outcome.DROPPED
            logger.info(
                "Message %s dropped: %r",
                delivery.message_id,
                exc,
                extra={"message_id": delivery.message_id, "key": delivery.key},
            )
        else:
            delivery.outcome = Outcome.FAILED
            if delivery.reason is None:
                delivery.reason = terminal_reason(exc, verdict)
            logger.error(
                "Error processing message %s (%s): %s",
                delivery.message_id,
                delivery.reason,
                exc,
                exc_info=exc,
                extra={"message_id": delivery.message_id, "key": delivery.key},
            )
        if settling:
            await self._ack(delivery)
        self._settled(delivery, exc)

    async def _ack(self, delivery: Delivery) -> None:
        try:
            await self.backend.ack(delivery.message)  # type: ignore[attr-defined]
        except Exception as exc:
            self._ack_failed(delivery, exc)

    def _ack_failed(self, delivery: Delivery, exc: Exception) -> None:
        logger.error(
            "Acknowledging message %s failed; it will be delivered again: %s",
            delivery.message_id,
            exc,
            exc_info=exc,
        )

    async def _release(self, delivery: Delivery) -> None:
        try:
            await self.backend.release(delivery.message)  # type: ignore[attr-defined]
        except Exception as exc:
            logger.warning(
                "Releasing message %s failed; the broker redelivers it after its timeout: %s",
                delivery.message_id,
                exc,
            )

    def _succeeded(self, delivery: Delivery) -> None:
        """Report a delivery whose pipeline returned (success, or settled by a middleware)."""
        if delivery.outcome is None:
            delivery.outcome = (
                Outcome.RETRIED if delivery.attempt > delivery.delivery_count else Outcome.SUCCESS
            )
        self._settled(delivery, None)

    def _settled(self, delivery: Delivery, exc: BaseException | None) -> None:
        if not self.events:
            return
        assert delivery.outcome is not None
        self.events.emit(
            MessageSettled(
                delivery.message_id,
                delivery.key,
                delivery.outcome,
                delivery.attempt - delivery.delivery_count + 1,
                self.clock.monotonic() - delivery.started_at,
                delivery.reason,
                None if exc is None else type(exc).__qualname__,
            )
        )

    # -- stopping ------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop pulling, let in-flight messages finish until ``drain_timeout``, then cancel them.

        Cancelled messages are released, never acknowledged or dead-lettered. Idempotent and safe
        before :meth:`run`.
        """
        task = self._task
        if not self._running or task is None:
            self._running = False
            self._task = None
            return
        self._stopping = True
        if not task.done() and not self._busy:
            task.cancel()  # interrupt the pull; _consume turns this into a drain
        if not task.done():
            await self._wait(task, self.drain_timeout)
        if not task.done():
            logger.warning(
                "Drain timeout (%.3gs) reached; cancelling %d in-flight message(s)",
                self.drain_timeout,
                max(len(self._in_flight), int(self._busy)),
            )
            for inner in list(self._in_flight):
                inner.cancel()
            if self._busy:
                task.cancel()
        await super().shutdown()

    async def _wait(self, task: asyncio.Task[None], seconds: float) -> None:
        loop = asyncio.get_running_loop()
        expired: asyncio.Future[None] = loop.create_future()
        handle = self.clock.call_later(
            seconds, lambda: None if expired.done() else expired.set_result(None)
        )
        try:
            await asyncio.wait({task, expired}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            handle.cancel()
            if not expired.done():
                expired.cancel()

    @property
    def in_flight(self) -> int:
        """Messages being processed right now."""
        return len(self._in_flight) + int(self._busy)

    @property
    def pipeline(self) -> Pipeline | None:
        """The pipeline built at start (``None`` before :meth:`run`)."""
        return self._pipeline
