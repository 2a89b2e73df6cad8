"""ResilientConsumer: AsyncLoopConsumer with a resilience pipeline around the handler.

Concurrency ``N`` is ``N`` long-lived worker coroutines taking messages from one delivery
iterator (``next_nowait()`` first, an awaited pull otherwise); each runs one message at a time
through the pipeline and settles it with one settle function (:meth:`_Settler.settle`: a
success acknowledged at once when the backend offers ``ack_nowait``, every other outcome
handed to :meth:`ResilientConsumer._settle`, which releases, classifies and logs; both report
through one function).

The workers run one loop, :data:`_WORKER_LOOP`, compiled when the consumer starts with the
steps of the pipeline's outermost compiled run pasted in (:func:`resilience.hooks.host`): on
the success path a message awaits no coroutine but the handler's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from abe.backends.message_queue.base.extensions import InboundMessage, SettlingBackend
from abe.backends.message_queue.consumer import AsyncLoopConsumer

from ._handover import ATTEMPT_HEADER
from ._inline import FixedAttributes, inline_hook
from .classify import Classifier, Verdict, default_classifier, terminal_reason
from .clock import Clock, default_clock, monotonic_function
from .delivery import MAKER, Delivery
from .errors import ConfigError, DeadLetterWriteError, Unsettled
from .events import EventBus, MessageSettled, Outcome, new_record
from .hooks import host
from .pipeline import Pipeline
from .policy import Policy, policy_of
from .types import CallNext, Flow, Gate, Handler, Middleware

if TYPE_CHECKING:
    from abe.backends.message_queue.base import MessageQueueBackend

__all__ = ["Gate", "ResilientConsumer"]

logger = logging.getLogger(__name__)

# Read once: an ``Enum`` class attribute goes through ``EnumType``'s attribute hook on every
# access, which costs more than the rest of a settlement check.
_DEFERRED = Outcome.DEFERRED
_RETRIED = Outcome.RETRIED
_SUCCESS = Outcome.SUCCESS
_ASK = Flow(steady=False)
"""The flag of a gate that keeps none: ask it every time."""
_NO_MESSAGE = InboundMessage({}, "")
"""What a delivery without a backend message reports (its properties' defaults)."""


_WORKER_LOOP = """\
async def work(self, worker, pull, settle, settling):
    # One worker: take a message, run it through the pipeline, settle it; until the source
    # ends or the consumer stops.
    now = self._now
    clock = self.clock
    events = self.events
    task = worker.task
    take = pull.take
    # ``while True`` and a test, not ``while not self._stopping``: CPython 3.11 specializes a
    # function's instructions once its loop jumped back a few times, and only the
    # unconditional jump counts (a ``while`` test is repeated at the loop's end instead).
    # This loop runs until the consumer stops, with the run's steps in it.
    while True:
        if self._stopping:
            return
        try:
            GATES  # for each gate: wait while it is paused (see ResilientConsumer._worker_loop)
            message = take()
            if message is None:
                message = await pull.wait()
        except StopAsyncIteration:
            return
        except asyncio.CancelledError:
            if self.stopping and task is not None and task.cancelling() <= 1:
                task.uncancel()  # shutdown interrupted the wait: stop taking messages
                return
            raise
        if settling:
            started = now()
            DELIVERY  # delivery = new_delivery(message, started, events, task, clock), pasted
        else:
            delivery = Delivery(message, None, now(), events)
            delivery.task = task
        worker.delivery = delivery
        try:
            await run(delivery)
        except BaseException as escaped:
            settled = settle(delivery, escaped)
        else:
            SETTLE  # settled = settle(delivery, None), pasted
        if settled is not None:
            try:
                await settled
            finally:
                worker.delivery = None
        else:
            worker.delivery = None
"""
"""The workers' loop: ``work(consumer, worker, pull, settle, settling)`` takes a message,
runs it through the pipeline and settles it with the consumer's one settle function
(:meth:`_Settler.settle`), until the source ends or the consumer stops.

It is a template: :func:`resilience.hooks.host` compiles it once per :meth:`~ResilientConsumer.run`
with the line ``await run(delivery)`` replaced by the steps of the pipeline's outermost
compiled run (or the handler's call, for an empty pipeline), so the loop's frame runs the
layers' ``enter`` and ``leave`` hooks itself and awaits only the handler on the success path.
Its own names must not be the run's (``hooks``, ``below``, ``t0``, ``exc``, ``error``,
``pending``, ...; ``host`` checks).
"""


class _Settler(FixedAttributes):
    """The consumer's one settle function for a run, :meth:`settle`, with what it needs.

    The worker loop calls :meth:`settle` for a message whose pipeline raised and pastes its
    body in (as a layer's hook is pasted, :mod:`resilience._inline`) for a success: the method
    stays the one place a message is settled. Its attributes are fixed once made, so the pasted
    body reads them when the loop is built and keeps only the branch that applies.
    """

    __slots__ = ("ack_nowait", "classifier", "consumer", "events", "now", "settling")
    fixed_attributes = frozenset(__slots__)

    def __init__(self, consumer: ResilientConsumer, classifier: Classifier, settling: bool) -> None:
        self.consumer = consumer
        self.classifier = classifier
        self.settling = settling
        self.events = consumer.events
        self.now = consumer._now
        self.ack_nowait: Callable[[Any], None] | None = (
            getattr(consumer.backend, "ack_nowait", None) if settling else None
        )

    def settle(self, delivery: Delivery, exc: BaseException | None) -> Awaitable[None] | None:
        """Settle ``delivery`` by its pipeline's outcome (``exc``: what escaped, ``None``: it
        returned): a success is acknowledged and reported right here when the backend offers
        ``ack_nowait``; every other outcome is :meth:`ResilientConsumer._settle`'s (returned,
        to await).

        Args:
            delivery: The message.
            exc: What escaped the pipeline, or ``None``.

        Returns:
            ``None`` when settled, or the awaitable that settles it.
        """
        if exc is None and self.ack_nowait is not None:
            # The common case, without a coroutine. A retry handed to the broker (deferred)
            # was settled by the backend already.
            if delivery.outcome is not _DEFERRED:
                try:
                    self.ack_nowait(delivery.message)
                except Exception as ack_error:
                    self.consumer._ack_failed(delivery, ack_error)
            if self.events.listeners:
                self.report(delivery, None)
            return None
        return self.consumer._settle(delivery, exc, self.classifier, self.settling, self.report)

    def report(self, delivery: Delivery, exc: BaseException | None) -> None:
        """Emit ``delivery``'s :class:`MessageSettled` record (``exc``: what escaped, for its
        error type); the caller calls it only when anyone listens. A delivery without an
        outcome returned from the pipeline: a success, or retried.

        The one report function of the settle paths (:meth:`settle`, whose pasted body pastes
        this one's in turn, and :meth:`ResilientConsumer._settle`): it builds the record as a
        tuple of its fields (:data:`~resilience.events.new_record`, one C call) and ends the
        duration with one clock read.
        """
        message = delivery.message
        if message is None:  # a bare payload: the delivery's defaults
            message = _NO_MESSAGE
        # The broker's fields straight from the message: one read each, no property calls.
        attempts = delivery.attempt - message.delivery_count + 1
        outcome = delivery.outcome
        if outcome is None:
            outcome = delivery.outcome = (
                _RETRIED
                if attempts > 1 or ATTEMPT_HEADER in message.headers  # or the broker tier's
                else _SUCCESS
            )
        # The bus's emit function of the moment (it changes with the listeners), read as an
        # attribute: a method call of it would take the unspecialized lookup.
        emit = self.events.emit
        emit(
            new_record(
                MessageSettled,
                (
                    message.message_id,
                    message.key or None,
                    outcome,
                    attempts,
                    self.now() - delivery.started_at,
                    delivery.reason,
                    None if exc is None else type(exc).__qualname__,
                ),
            )
        )


class _Worker:
    """One worker's state: its task and the delivery it is processing (``None``: idle)."""

    __slots__ = ("delivery", "task")

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.delivery: Delivery | None = None


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
    delivered again; a message whose retry was handed to the broker (outcome ``deferred``) was
    settled by the backend in that step and is not settled again. With a plain backend,
    messages are at-most-once: the backend considers a message delivered as soon as
    ``consume()`` yields it.

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
        self._workers: list[_Worker] = []
        self._now: Callable[[], float] = self.clock.monotonic
        self.drain_timed_out = False
        """Whether the last :meth:`shutdown` had to cancel messages still in flight."""

    # -- building ------------------------------------------------------------------------------

    def _resolve(self, handler: Handler) -> tuple[Pipeline, Handler, Classifier]:
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
        call = pipeline.compile(handler)
        gates = tuple(layer for layer in pipeline.layers if isinstance(layer, Gate))
        backend = self.backend
        settling = isinstance(backend, SettlingBackend)
        source: AsyncIterator[Any]
        if settling:
            source = backend.deliveries(group=self.group)  # type: ignore[attr-defined]
        else:
            source = backend.consume(group=self.group)
        self._now = monotonic_function(self.clock)
        settler = _Settler(self, classifier, settling)
        pull = _Puller(source, self.concurrency > 1, gates)
        workers = [_Worker() for _ in range(self.concurrency)]
        self._workers = workers
        work = self._worker_loop(pipeline, call, gates, settler)
        tasks = []
        for worker in workers:
            task = asyncio.create_task(work(self, worker, pull, settler.settle, settling))
            worker.task = task
            tasks.append(task)
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in done if not t.cancelled() and t.exception() is not None]
            if failed:  # the source broke (a worker's pull raised): stop the others, report it
                await _cancel_all(tasks)
                raise failed[0].exception()  # type: ignore[misc]
        except asyncio.CancelledError:
            # Not a graceful shutdown (that stops the workers, never this task): every message in
            # flight is cancelled and released before the cancellation goes on.
            await _cancel_all(tasks)
            raise
        finally:
            self._workers = []
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    def _worker_loop(
        self, pipeline: Pipeline, call: CallNext, gates: tuple[Gate, ...], settler: _Settler
    ) -> Callable[..., Coroutine[Any, Any, None]]:
        """The workers' loop (:data:`_WORKER_LOOP`) with the pipeline ``call`` in it: its
        outermost compiled run's steps pasted in place of ``await run(delivery)``, so a message
        awaits no coroutine but the handler's on its success path (see
        :func:`resilience.hooks.host`).

        Its line ``GATES`` becomes one check per gate, before each message: wait while the
        gate is paused, asking it only when the flag it keeps (its ``flow``, see
        :class:`~resilience.types.Flow`) is not steady: one attribute read per message.
        """
        namespace: dict[str, Any] = {
            "asyncio": asyncio,
            "Delivery": Delivery,
        }
        checks: list[str] = []
        for i, gate in enumerate(gates):
            namespace[f"gate_{i}"] = gate
            namespace[f"flow_{i}"] = getattr(gate, "flow", _ASK)
            checks += [
                f"if not flow_{i}.steady and gate_{i}.paused:",
                f"    await gate_{i}.wait_resumed()",
            ]
        # The delivery is made by new_delivery's own body (MAKER.make), pasted in like a hook's.
        args = ("message", "started", "events", "task", "clock")
        made = inline_hook(MAKER, "make", args, "delivery", "_m_")
        if made is None:
            namespace["make"] = MAKER.make
            making = [f"delivery = make({', '.join(args)})"]
        else:
            namespace.update(made.namespace)
            making = list(made.lines)
        # A success is settled by the settle function's own body, pasted in likewise (its
        # fixed attributes read now: with ack_nowait, the success path is the body's first
        # branch alone).
        settled = inline_hook(settler, "settle", ("delivery", "None"), "settled", "_s_")
        if settled is None:
            settling = ["settled = settle(delivery, None)"]
        else:
            namespace.update(settled.namespace)
            settling = list(settled.lines)
        marks = {"GATES": checks, "DELIVERY": making, "SETTLE": settling}
        names = ", ".join(type(layer).__name__ for layer in pipeline.layers)
        filename = f"<resilience.consumer worker: {names}>"
        scope = host(_WORKER_LOOP, call, namespace, filename, marks)
        work: Callable[..., Coroutine[Any, Any, None]] = scope["work"]
        return work

    async def _settle(
        self,
        delivery: Delivery,
        exc: BaseException | None,
        classifier: Classifier,
        settling: bool,
        report: Callable[[Delivery, BaseException | None], None],
    ) -> None:
        """Settle a delivery by the pipeline's outcome: acknowledge (success, dead-lettered,
        dropped, failed for good), release (cancelled, dead-letter write failed) and report it
        with ``report`` (:meth:`_Settler.report`) when anyone listens.

        Raises:
            BaseException: a cancellation or ``KeyboardInterrupt``/``SystemExit`` from the
                pipeline, after the delivery was released.
        """
        error = exc
        if exc is None:
            if settling and delivery.outcome is not _DEFERRED:
                await self._ack(delivery)
        elif isinstance(exc, asyncio.CancelledError):
            delivery.outcome = Outcome.CANCELLED
            error = None  # reported without an error type, as a shutdown is no error
            if settling:
                await self._release(delivery)
        elif not isinstance(exc, Exception):
            raise exc  # KeyboardInterrupt, SystemExit: the process is going down
        elif isinstance(exc, Unsettled):
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
        else:
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
        if self.events.listeners:
            report(delivery, error)
        if exc is not None and error is not exc:
            raise exc  # the cancellation goes on

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
        # Shielded: a second cancellation (a caller giving up on shutdown) must not leave the
        # message neither acknowledged nor released until the broker's timeout.
        try:
            await asyncio.shield(self.backend.release(delivery.message))  # type: ignore[attr-defined]
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning(
                "Releasing message %s failed; the broker redelivers it after its timeout: %s",
                delivery.message_id,
                exc,
            )

    # -- stopping ------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop pulling, let in-flight messages finish until ``drain_timeout``, then cancel them.

        Cancelled messages are released, never acknowledged or dead-lettered, before
        :meth:`run` returns; :meth:`run` returns normally (it does not raise
        ``CancelledError``) after any shutdown, and :attr:`drain_timed_out` tells whether
        messages had to be cancelled. Idempotent and safe before :meth:`run`.
        """
        task = self._task
        if not self._running or task is None:
            await super().shutdown()
            return
        self._stopping = True
        self.drain_timed_out = False
        for worker in list(self._workers):
            if worker.delivery is None and worker.task is not None and not worker.task.done():
                worker.task.cancel()  # interrupt the pull; the worker then stops
        if not task.done():
            await self._wait(task, self.drain_timeout)
        if not task.done():
            busy = [w for w in self._workers if w.delivery is not None]
            self.drain_timed_out = True
            logger.warning(
                "Drain timeout (%.3gs) reached; cancelling %d in-flight message(s)",
                self.drain_timeout,
                len(busy),
            )
            for worker in list(self._workers):
                if worker.task is not None:
                    worker.task.cancel()
            # The run task ends once every cancelled message is released.
            await asyncio.wait({task})
        await super().shutdown()
        self._stopping = False

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
    def stopping(self) -> bool:
        """Whether :meth:`shutdown` is under way (no new messages are taken)."""
        return self._stopping

    @property
    def in_flight(self) -> int:
        """Messages being processed right now."""
        return sum(1 for worker in self._workers if worker.delivery is not None)

    @property
    def pipeline(self) -> Pipeline | None:
        """The pipeline built at start (``None`` before :meth:`run`)."""
        return self._pipeline


class _Puller:
    """The workers' shared view of the delivery iterator: :meth:`take` a message that is ready
    (``next_nowait()``, when the iterator offers it), else :meth:`wait` for one; with several
    workers only one awaits the iterator at a time (async generators allow no more)."""

    __slots__ = ("_gates", "_lock", "_pull", "take")

    def __init__(self, source: AsyncIterator[Any], shared: bool, gates: tuple[Gate, ...]) -> None:
        self._pull = source.__anext__
        nowait: Callable[[], Any] | None = getattr(source, "next_nowait", None)
        self.take: Callable[[], Any] = nowait if nowait is not None else _nothing
        self._lock = asyncio.Lock() if shared else None
        self._gates = gates

    async def wait(self) -> Any:
        if self._lock is None:
            return await self._pull()
        async with self._lock:
            # The gates again: a gate may have closed while this worker waited for its turn,
            # and a paused consumer takes no message at all.
            for gate in self._gates:
                if gate.paused:
                    await gate.wait_resumed()
            message = self.take()  # another worker's pull may have filled the buffer
            if message is not None:
                return message
            return await self._pull()


def _nothing() -> None:
    return None


async def _cancel_all(tasks: Sequence[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until they have ended (each releases what it holds)."""
    for task in tasks:
        task.cancel()
    pending = [task for task in tasks if not task.done()]
    while pending:
        try:
            await asyncio.wait(pending)
        except asyncio.CancelledError:
            # Cancelled again while the workers release their messages: finish that first.
            await asyncio.wait(pending)
            raise
        pending = [task for task in pending if not task.done()]
