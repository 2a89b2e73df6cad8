"""The dead-letter middleware: terminal failures and poison messages go to a sink, never lost."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._log import get_logger
from ..backoff import store_failure_wait, wait_after
from ..classify import Classifier, Verdict, default_classifier, terminal_reason
from ..clock import Clock, default_clock
from ..errors import DeadLetterWriteError, ResilienceError, Unsettled
from ..events import Event, Outcome
from ..hooks import SLOW_PATH, FixedAttributes, HookLayer
from ..types import GATES_EXTRA
from ._pending import PendingWrite, PendingWrites, identity
from .envelope import EnvelopeBuilder, EnvelopeOptions, exception_name
from .sqlite import encoded_writer

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

log = get_logger("resilience.dead_letter")

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
    """Failed writes in a row to the destination, whatever the message."""
    write_failures: int = 0
    """Failed writes of this message so far (across its deliveries, in this process)."""


class DeadLetterStats:
    """Counters of one :class:`DeadLetterRouter` (per instance, never shared).

    Attributes:
        by_reason: Dead-lettered messages by reason.
        poison: Of those, how many never reached the handler (stage ``decode``).
        write_failures: Sink writes that failed (each retried after a backoff, or left its
            message unacknowledged).
        held: Failures not dead-lettered because a pausing circuit breaker the message went
            through was forced open: the message was held and processed again once the
            breaker was reset.
    """

    __slots__ = ("_pending", "by_reason", "held", "poison", "write_failures")

    def __init__(self, pending: PendingWrites | None = None) -> None:
        self.by_reason: Counter[str] = Counter()
        self.poison = 0
        self.write_failures = 0
        self.held = 0
        self._pending = pending

    @property
    def pending_writes(self) -> int:
        """Messages whose write failed and that are not in the destination yet (remembered
        for their next delivery)."""
        return 0 if self._pending is None else len(self._pending)

    @property
    def dead_lettered(self) -> int:
        """Messages written to the sink."""
        return sum(self.by_reason.values())

    def __repr__(self) -> str:
        return (
            f"DeadLetterStats(dead_lettered={self.dead_lettered}, poison={self.poison}, "
            f"write_failures={self.write_failures}, pending_writes={self.pending_writes})"
        )


class DeadLetterRouter(FixedAttributes, HookLayer):
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
      this layer's help; a message held longer than its total timeout is dead-lettered then.
    * Only after the sink confirmed the write is the outcome set to ``DEAD_LETTERED`` (the
      consumer then acknowledges). A failed write is tried again after a growing, jittered
      backoff of its own message (about 0.05-0.1 s, doubling, up to ``write_failure_backoff``),
      ``write_attempts`` times in all; then the layer raises
      :class:`~resilience.errors.DeadLetterWriteError` and the consumer releases the message,
      which comes back later. Nothing is lost. The message waits in its consumer slot, so
      other slots go on (with ``concurrency=1`` the consumer waits with it).
    * The layer remembers (per process, for up to 1024 messages) each message whose write
      failed: its next delivery waits out the rest of its backoff before writing, and when it
      comes back past its attempt limit (``delivery_limit``) it is written with the failure
      that sent it here (reason, error, traceback) instead of ``DeliveryLimitExceeded``. Every
      envelope lists its failed writes in ``write_failures``.

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
        write_failure_backoff: Cap, in seconds, on the wait after a failed write (it starts
            at 0.05-0.1 s and doubles per failed write of the same message); 0 disables it.
        write_attempts: Writes tried per delivery before the message is released (>= 1).

    Raises:
        ValueError: ``write_failure_backoff`` < 0 or ``write_attempts`` < 1.
    """

    __slots__ = (
        "_builder",
        "_classifier",
        "_clock",
        "_failures_in_row",
        "_pending",
        "_validate",
        "_warned_early",
        "_write_wait",
        "sink",
        "stats",
        "write_attempts",
        "write_failure_backoff",
    )

    fixed_attributes = frozenset({"_validate"})
    """``_validate`` is set once, when the layer is built: an inlined hook reads it then."""

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
        write_attempts: int = 3,
    ) -> None:
        if not write_failure_backoff >= 0:
            raise ValueError(f"write_failure_backoff must be >= 0, got {write_failure_backoff!r}")
        if isinstance(write_attempts, bool) or not isinstance(write_attempts, int):
            raise ValueError(f"write_attempts must be an integer >= 1, got {write_attempts!r}")
        if write_attempts < 1:
            raise ValueError(f"write_attempts must be an integer >= 1, got {write_attempts!r}")
        self.sink = sink
        self._pending = PendingWrites()
        self.stats = DeadLetterStats(self._pending)
        self.write_failure_backoff = float(write_failure_backoff)
        self.write_attempts = write_attempts
        self._write_wait = store_failure_wait(self.write_failure_backoff)
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
            BaseException: ``exc`` when it is not an ``Exception``, an
                :class:`~resilience.errors.Unsettled` (a failed dead-letter write of an inner
                router, a message another consumer holds), or ignored by the classifier;
                ``DeadLetterWriteError`` when this router's write fails.
        """
        if not isinstance(exc, Exception) or isinstance(exc, Unsettled):
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
            except Unsettled:
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
            hint="the message ran out of attempts before the circuit breaker opened; it counts "
            "distinct messages, so for an outage to dead-letter nothing, let failure_threshold "
            "(or the window's minimum_calls) messages be in flight at once (concurrency >= "
            "failure_threshold, and failure_threshold <= retry attempts). Logged once.",
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
        key = identity(delivery)
        pending = self._pending.get(key) if key is not None else None
        if pending is not None:
            if reason == "delivery_limit":
                # Only past its attempt limit this time: the failure that sent it here is the
                # one its earlier, failed write was for.
                pending.restore(envelope)
                reason = delivery.reason = envelope["error"]["reason"]
                stage = envelope["error"]["stage"]
            else:
                pending.remember(envelope)  # it failed again in the handler: keep the latest
            envelope["id"] = pending.envelope_id
            envelope["write_failures"] = pending.section()
            envelope = self._builder.refit(envelope)
            wait = pending.next_at - now
            if wait > 0:
                await clock.sleep(wait)  # the backoff goes on where the last delivery left it
        envelope = await self._write(delivery, envelope, reason, key, pending)
        self._failures_in_row = 0
        if key is not None:
            self._pending.pop(key)
        self.stats.by_reason[reason] += 1
        if stage == "decode":
            self.stats.poison += 1
        delivery.outcome = Outcome.DEAD_LETTERED
        envelope_id: str = envelope["id"]
        error_type: str = envelope["error"]["type"]
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
            write_failures=envelope["write_failures"]["count"],
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

    async def _write(
        self,
        delivery: Delivery,
        envelope: dict[str, Any],
        reason: str,
        key: tuple[str, str] | None,
        pending: PendingWrite | None,
    ) -> dict[str, Any]:
        """Write ``envelope``, retrying up to ``write_attempts`` times on the message's own
        backoff; when every try failed, remember the failure and raise.

        Returns:
            The envelope as written (with its ``write_failures``).

        Raises:
            DeadLetterWriteError: the last try failed (chained to the sink's error).
        """
        clock = self._clock
        tries = 0
        while True:
            tries += 1
            try:
                await self._sink_write(envelope, delivery)
                return envelope
            except Exception as err:
                if pending is None:
                    pending = PendingWrite.of(envelope)
                text = self._builder.scrub(str(err), delivery)
                pending.failed(time.time(), exception_name(type(err)), text[:500])
                envelope["write_failures"] = pending.section()
                envelope = self._builder.refit(envelope)
                wait = wait_after(self._write_wait, pending.count)
                pending.next_at = clock.monotonic() + wait
                if key is not None:
                    self._pending.put(key, pending)
                last = tries >= self.write_attempts
                self._failed(delivery, envelope, reason, err, text, pending.count, last)
                if last:
                    # The sink error was raised while the handler's exception was being
                    # handled, so a log line with its traceback would print that exception
                    # unredacted: the envelope (not written) and the dead_letter_write_failed
                    # line carry it, masked.
                    err.__suppress_context__ = True
                    raise DeadLetterWriteError(
                        f"dead-letter write to {self.sink.name} failed for message "
                        f"{delivery.message_id}: {type(err).__name__}: {text}"
                    ) from err
            if wait > 0:
                await clock.sleep(wait)

    async def _sink_write(self, envelope: dict[str, Any], delivery: Delivery) -> None:
        """``sink.write``; a SQLite store gets the JSON text the builder already made."""
        sink = self.sink
        text = self._builder.encoded(envelope)
        write = None if text is None else encoded_writer(sink)
        if write is not None and text is not None:
            await write(envelope, text)
        else:
            await sink.write(envelope, delivery)

    def _failed(
        self,
        delivery: Delivery,
        envelope: dict[str, Any],
        reason: str,
        err: Exception,
        text: str,
        message_failures: int,
        last: bool,
    ) -> None:
        """Log, count and report one failed write (``text`` is the sink's error, masked)."""
        self.stats.write_failures += 1
        self._failures_in_row += 1
        in_row = self._failures_in_row
        envelope_id: str = envelope["id"]
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
            write_failures=message_failures,
            action="message left unacknowledged; it will be delivered again"
            if last
            else "write retried after a backoff",
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
                    message_failures,
                )
            )

    def __repr__(self) -> str:
        return f"DeadLetterRouter(sink={self.sink.name!r})"
