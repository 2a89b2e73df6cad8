"""The dead-letter middleware: terminal failures and poison messages go to a sink, never lost."""

from __future__ import annotations

import asyncio
import inspect
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from ..classify import Classifier, Verdict, default_classifier, terminal_reason
from ..clock import Clock, default_clock
from ..errors import DeadLetterWriteError, ResilienceError
from ..events import Event, Outcome
from ..hooks import SLOW_PATH, HookLayer
from ..types import GATES_EXTRA
from .envelope import EnvelopeBuilder, EnvelopeOptions, exception_name

if TYPE_CHECKING:
    from ..delivery import Delivery
    from ..types import CallNext, Gate
    from .sinks import DeadLetterSink

__all__ = [
    "DeadLetterFailed",
    "DeadLetterRouter",
    "DeadLetterStats",
    "DeadLettered",
    "InvalidPayload",
    "Validator",
]

log = structlog.get_logger("resilience.dead_letter")

_OUTAGE_REASONS = frozenset(("retries_exhausted", "timeout", "budget_exhausted"))
"""Reasons an open breaker can explain: out of attempts, time or retry budget."""


def _open_gate(delivery: Delivery, reason: str) -> Gate | None:
    """A pausing breaker the delivery went through that holds it back now, if the failure is
    one the breaker explains (out of attempts, time or budget)."""
    extras = delivery.extras
    if not extras or reason not in _OUTAGE_REASONS:
        return None
    gates: list[Gate] = extras.get(GATES_EXTRA) or []
    for gate in gates:
        if gate.holds(delivery):
            return gate
    return None


Validator = Callable[[dict[str, Any]], object]
"""``validate(payload)``: raise (or return ``False``) when the payload is invalid; may be async."""


class InvalidPayload(ResilienceError):
    """The validation hook returned ``False`` for a payload."""


@dataclass(frozen=True, slots=True)
class DeadLettered(Event):
    """A message was written to the dead-letter destination (it is acknowledged next)."""

    envelope_id: str
    reason: str
    stage: str
    error_type: str
    destination: str
    replay_count: int


@dataclass(frozen=True, slots=True)
class DeadLetterFailed(Event):
    """Writing a message to the dead-letter destination failed; it is released, not acked."""

    envelope_id: str
    reason: str
    error_type: str
    """The sink's error type."""
    error: str
    destination: str
    consecutive_failures: int


class DeadLetterStats:
    """Counters of one :class:`DeadLetterRouter` (per instance, never shared).

    Attributes:
        by_reason: Dead-lettered messages by reason.
        poison: Of those, how many never reached the handler (stage ``decode``).
        write_failures: Sink writes that failed (each left its message unacknowledged).
        held: Failures not dead-lettered because a pausing circuit breaker the message went
            through was forced open: the message was held and processed again once the
            breaker was reset.
    """

    __slots__ = ("by_reason", "held", "poison", "write_failures")

    def __init__(self) -> None:
        self.by_reason: Counter[str] = Counter()
        self.poison = 0
        self.write_failures = 0
        self.held = 0

    @property
    def dead_lettered(self) -> int:
        """Messages written to the sink."""
        return sum(self.by_reason.values())

    def __repr__(self) -> str:
        return (
            f"DeadLetterStats(dead_lettered={self.dead_lettered}, poison={self.poison}, "
            f"write_failures={self.write_failures})"
        )


class DeadLetterRouter(HookLayer):
    """Middleware that sends terminal failures and poison messages to a dead-letter sink.

    * A delivery whose payload could not be decoded (``message.decode_error``), or that fails
      ``validate``, is dead-lettered at once with stage ``decode`` and reason ``decode_error``;
      the handler is never called.
    * An exception escaping the rest of the pipeline is classified: ignored ones are re-raised
      (the consumer drops the message); everything else is dead-lettered with stage ``handle``
      and the reason the inner layers recorded (``retries_exhausted``, ``timeout``, ...) or
      :func:`~resilience.classify.terminal_reason`. ``CancelledError`` is never caught.
    * A failure that ran out of attempts, time or retry budget (``retries_exhausted``,
      ``timeout``, ``budget_exhausted``) while a pausing circuit breaker the message went
      through is forced open is *not* dead-lettered: the message is held until the breaker is
      reset and then processed afresh (attempts and total timeout start over; see
      :attr:`DeadLetterStats.held`). A breaker that opened by itself holds its calls without
      this layer's help; a message held longer than its total timeout is dead-lettered then,
      which is what lets a poison message that fails every probe go.
    * Only after the sink confirmed the write is the outcome set to ``DEAD_LETTERED`` (the
      consumer then acknowledges). When the write fails the middleware waits a short, growing
      backoff (so a broken sink does not turn redeliveries into a busy loop) and raises
      :class:`~resilience.errors.DeadLetterWriteError`: the consumer releases the message, which
      comes back later. Nothing is lost.

    Place it outside retry and timeouts (order 20: after telemetry, before the total timeout).

    Args:
        sink: Where envelopes go (a store, or a :class:`~.sinks.BackendSink`).
        classifier: The shared classifier (default: every ``Exception`` retryable).
        clock: Time source (failure times in the envelope, the write-failure backoff).
        options: Redaction and size caps of the envelope.
        validate: Optional payload check run before the handler: it raises (or returns
            ``False``) for an invalid payload, which is then dead-lettered as poison; an
            exception the classifier ignores (``Drop``) drops the message instead.
        handler_name: Recorded in envelopes.
        system: The source backend's name (``memory``, ``redis``), recorded in envelopes.
        write_failure_backoff: Cap, in seconds, on the wait after a failed write (it starts at
            0.1 s and doubles per consecutive failure); 0 disables it.
    """

    __slots__ = (
        "_builder",
        "_classifier",
        "_clock",
        "_failures_in_row",
        "_validate",
        "_warned_early",
        "sink",
        "stats",
        "write_failure_backoff",
    )

    def __init__(
        self,
        sink: DeadLetterSink,
        *,
        classifier: Classifier | None = None,
        clock: Clock | None = None,
        options: EnvelopeOptions | None = None,
        validate: Validator | None = None,
        handler_name: str | None = None,
        system: str | None = None,
        write_failure_backoff: float = 5.0,
    ) -> None:
        if not write_failure_backoff >= 0:
            raise ValueError(f"write_failure_backoff must be >= 0, got {write_failure_backoff!r}")
        self.sink = sink
        self.stats = DeadLetterStats()
        self.write_failure_backoff = float(write_failure_backoff)
        self._classifier = classifier or default_classifier
        self._clock = clock or default_clock
        self._validate = validate
        self._builder = EnvelopeBuilder(options, system=system, handler_name=handler_name)
        self._failures_in_row = 0
        self._warned_early = False

    @property
    def options(self) -> EnvelopeOptions:
        """The envelope options in use."""
        return self._builder.options

    def enter(self, delivery: Delivery) -> Any:
        """Take the layer's slow path for a payload that could not be decoded or must be
        validated first.

        Args:
            delivery: The message.

        Returns:
            ``None``, or :data:`~resilience.hooks.SLOW_PATH`.
        """
        message = delivery.message
        if (message is not None and message.decode_error is not None) or self._validate is not None:
            return SLOW_PATH
        return None

    async def slow(self, delivery: Delivery, call_next: CallNext) -> None:
        """Dead-letter an undecodable or invalid payload; otherwise run the rest of the
        pipeline and :meth:`fail` what escapes it.

        Args:
            delivery: The message.
            call_next: The rest of the pipeline.
        """
        message = delivery.message
        if message is not None and message.decode_error is not None:
            await self._route(delivery, message.decode_error, "decode_error", "decode")
            return
        if self._validate is not None:
            problem = await self._check(delivery)
            if problem is not None:
                await self._route(delivery, problem, "decode_error", "decode")
                return
        try:
            await call_next(delivery)
            return
        except BaseException as exc:
            error = exc
        await self.fail(None, delivery, error, call_next)

    async def fail(
        self, token: object, delivery: Delivery, exc: BaseException, call_next: CallNext
    ) -> None:
        """Dead-letter what escaped the rest of the pipeline, unless it must propagate.

        Args:
            token: Unused.
            delivery: The message.
            exc: What the rest of the pipeline raised.
            call_next: The rest of the pipeline (run again after a hold).

        Raises:
            BaseException: ``exc`` when it is not an ``Exception``, a failed dead-letter write
                of an inner router, or ignored by the classifier; ``DeadLetterWriteError``
                when this router's write fails.
        """
        if not isinstance(exc, Exception) or isinstance(exc, DeadLetterWriteError):
            raise exc
        await self._failed_call(delivery, call_next, exc)

    async def _failed_call(self, delivery: Delivery, call_next: CallNext, exc: Exception) -> None:
        """Dead-letter a terminal failure, or hold it while a pausing breaker is forced open."""
        while True:
            verdict = self._classifier.classify(exc)
            if verdict is Verdict.IGNORED:
                raise exc
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # A shutdown cancelled the message and the handler turned that into an error:
                # it was interrupted, not failed. Never dead-letter it; let it be released.
                raise asyncio.CancelledError from exc
            reason = delivery.reason or terminal_reason(exc, verdict)
            gate = _open_gate(delivery, reason)
            if gate is None:
                if not self._warned_early and reason in _OUTAGE_REASONS:
                    self._warn_early(delivery, reason)
                await self._route(delivery, exc, reason, "handle")
                return
            await self._hold(delivery, gate, exc, reason)
            try:
                await call_next(delivery)
                return
            except DeadLetterWriteError:
                raise
            except Exception as again:
                exc = again

    def _warn_early(self, delivery: Delivery, reason: str) -> None:
        gates = (delivery.extras or {}).get(GATES_EXTRA)
        if not gates:
            return
        self._warned_early = True
        log.warning(
            "dead_lettered_before_breaker_opened",
            message_id=delivery.message_id,
            key=delivery.key,
            reason=reason,
            breaker=gates[0].name,
            hint="the message ran out of attempts before the circuit breaker opened; for an "
            "outage to dead-letter nothing, let the breaker trip within one message's attempts "
            "(failure_threshold or window minimum_calls <= retry attempts). Logged once.",
        )

    async def _hold(self, delivery: Delivery, gate: Gate, exc: Exception, reason: str) -> None:
        # The breaker was forced open: the message could not run, its failure says nothing
        # about it. Hold it like the breaker holds calls, then give it a fresh start.
        self.stats.held += 1
        log.info(
            "dead_letter_held",
            message_id=delivery.message_id,
            key=delivery.key,
            reason=reason,
            error_type=exception_name(type(exc)),
            breaker=gate.name,
            action="held until the circuit breaker is reset, then processed again",
        )
        await gate.wait_resumed()
        delivery.attempt = max(1, delivery.delivery_count)
        delivery.deadline = None
        delivery.reason = None
        delivery.outcome = None

    async def _check(self, delivery: Delivery) -> Exception | None:
        assert self._validate is not None
        try:
            result = self._validate(delivery.payload)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            if self._classifier.classify(exc) is Verdict.IGNORED:
                raise
            return exc
        if result is False:
            return InvalidPayload("payload rejected by the validation hook")
        return None

    async def _route(self, delivery: Delivery, exc: BaseException, reason: str, stage: str) -> None:
        clock = self._clock
        now = clock.monotonic()
        failures = delivery.failures
        if failures is None or type(exc).__qualname__ not in failures:
            delivery.note_failure(exc, now)  # not seen by a retry layer: record it once
        delivery.reason = reason
        envelope = self._builder.build(delivery, exc, reason=reason, stage=stage, monotonic_now=now)
        envelope_id: str = envelope["id"]
        error_type: str = envelope["error"]["type"]
        try:
            await self.sink.write(envelope, delivery)
        except Exception as err:
            text = await self._failed(delivery, envelope, reason, err)
            # The sink error was raised while the handler's exception was being handled, so a
            # log line with its traceback would print that exception unredacted: the envelope
            # (not written) and the dead_letter_write_failed line carry it, masked.
            err.__suppress_context__ = True
            raise DeadLetterWriteError(
                f"dead-letter write to {self.sink.name} failed for message "
                f"{delivery.message_id}: {type(err).__name__}: {text}"
            ) from err
        self._failures_in_row = 0
        self.stats.by_reason[reason] += 1
        if stage == "decode":
            self.stats.poison += 1
        delivery.outcome = Outcome.DEAD_LETTERED
        log.warning(
            "dead_lettered",
            message_id=delivery.message_id,
            key=delivery.key,
            reason=reason,
            stage=stage,
            error_type=error_type,
            error=envelope["error"]["message"][:500],
            envelope_id=envelope_id,
            destination=self.sink.name,
        )
        if delivery.events:
            delivery.events.emit(
                DeadLettered(
                    delivery.message_id,
                    delivery.key,
                    envelope_id,
                    reason,
                    stage,
                    error_type,
                    self.sink.name,
                    int(envelope["replay_count"]),
                )
            )

    async def _failed(
        self, delivery: Delivery, envelope: dict[str, Any], reason: str, err: Exception
    ) -> str:
        """Log, count and report a failed write, wait the backoff; returns the masked error."""
        self.stats.write_failures += 1
        self._failures_in_row += 1
        in_row = self._failures_in_row
        envelope_id: str = envelope["id"]
        text = self._builder.scrub(str(err), delivery)
        log.error(
            "dead_letter_write_failed",
            message_id=delivery.message_id,
            key=delivery.key,
            reason=reason,
            envelope_id=envelope_id,
            destination=self.sink.name,
            error_type=exception_name(type(err)),
            error=text,
            failure_type=envelope["error"]["type"],
            failure=envelope["error"]["message"][:500],
            consecutive_failures=in_row,
            action="message left unacknowledged; it will be delivered again",
        )
        if delivery.events:
            delivery.events.emit(
                DeadLetterFailed(
                    delivery.message_id,
                    delivery.key,
                    envelope_id,
                    reason,
                    exception_name(type(err)),
                    text,
                    self.sink.name,
                    in_row,
                )
            )
        if self.write_failure_backoff > 0:
            wait = min(self.write_failure_backoff, 0.1 * 2 ** min(in_row - 1, 30))
            await self._clock.sleep(wait)
        return text

    def __repr__(self) -> str:
        return f"DeadLetterRouter(sink={self.sink.name!r})"
