"""Optional backend extensions for at-least-once delivery.

The published :class:`~abe.types.MessageQueueBackendProtocol` yields bare payloads and says
nothing about acknowledgement: a message is gone from the broker's point of view once it has been
handed out. Backends that can do better implement the protocols here:

* :class:`SettlingBackend` hands out :class:`InboundMessage` objects (payload plus metadata) and
  lets the consumer settle each one with :meth:`~SettlingBackend.ack` (done, never redeliver) or
  :meth:`~SettlingBackend.release` (not done, deliver again later).
* :class:`DeadLetteringBackend` writes a dead-letter record and acknowledges the source message in
  one atomic step, so a crash between the two can neither lose nor duplicate it.
* :class:`HeaderPublishingBackend` publishes with headers (for example W3C trace context).
* :class:`DelayingBackend` hands a delivery back to the broker to be delivered again after a
  delay, settling the current delivery in the same step, so the consumer's slot is free while
  the message waits in the broker.

Consumers check for these with ``isinstance`` (the protocols are runtime-checkable) and fall back
to plain ``consume()`` otherwise.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from abe.types import ConsumerGroup, MessageQueueKey, MessageQueuePayload

__all__ = [
    "DeadLetteringBackend",
    "DelayingBackend",
    "HeaderPublishingBackend",
    "InboundMessage",
    "SettlingBackend",
]


@dataclass(slots=True, eq=False)
class InboundMessage:
    """One delivery of one message, as handed out by a :class:`SettlingBackend`.

    Attributes:
        payload: The decoded message body (empty when decoding failed).
        key: The routing key, stream or queue the message was read from.
        message_id: The broker's id for the message (a stream entry id, a sequence number).
        delivery_count: How many times the broker has handed this message out, this time
            included (1 on first delivery).
        headers: Transport headers such as ``traceparent``; never ``None``.
        enqueued_at: Wall-clock time (seconds since the epoch) the message was published, when
            the broker knows it.
        group: The consumer group it was read in, if any.
        raw: The undecoded body, kept only when decoding failed.
        decode_error: Why decoding failed; such a message is poison and is never retried.
        handle: Backend-private settlement data (for example a batch reference).
        body_size: Size in bytes of the encoded body, when the backend knows it.
    """

    payload: MessageQueuePayload
    key: MessageQueueKey
    message_id: str | None = None
    delivery_count: int = 1
    headers: Mapping[str, str] = field(default_factory=dict)
    enqueued_at: float | None = None
    group: ConsumerGroup = None
    raw: bytes | str | None = None
    decode_error: BaseException | None = None
    handle: Any = None
    body_size: int | None = None


@runtime_checkable
class SettlingBackend(Protocol):
    """A backend whose deliveries are acknowledged explicitly (at-least-once)."""

    def deliveries(self, *, group: ConsumerGroup = None) -> AsyncIterator[InboundMessage]:
        """Yield deliveries until cancelled; each must later be acked or released."""
        ...

    async def ack(self, message: InboundMessage) -> None:
        """Mark ``message`` as done: it is never delivered again.

        Backends may batch acknowledgements; a crash before the batch is flushed means the
        message is delivered again (never lost).
        """
        ...

    async def release(self, message: InboundMessage) -> None:
        """Give ``message`` back unprocessed: it is delivered again later."""
        ...


# A SettlingBackend may also offer ``ack_nowait(message) -> None``: the same as ``ack`` but
# synchronous (it only records the acknowledgement, for example in a buffer flushed in batches).
# Consumers use it when present to save a coroutine per message on the hot path.
#
# Likewise the iterator ``deliveries()`` returns may offer ``next_nowait() -> InboundMessage |
# None``: the delivery its next ``__anext__`` would return if one is ready now (tracked as
# unacked the same way), else ``None`` without waiting. Consumers use it when present to save an
# awaitable per message while messages are waiting.


@runtime_checkable
class DeadLetteringBackend(Protocol):
    """A backend that can dead-letter and acknowledge a delivery atomically."""

    async def dead_letter(
        self,
        message: InboundMessage,
        destination: MessageQueueKey,
        record: Mapping[str, Any],
    ) -> str | None:
        """Write ``record`` to ``destination`` and ack ``message`` in one atomic step.

        Returns:
            The id the backend gave the dead-letter record, when it has one.

        Raises:
            Exception: the write failed; ``message`` is then not acknowledged either.
        """
        ...


@runtime_checkable
class HeaderPublishingBackend(Protocol):
    """A backend that can publish transport headers alongside the payload."""

    async def publish_message(
        self,
        key: MessageQueueKey,
        payload: MessageQueuePayload,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> str | None:
        """Publish ``payload`` with ``headers``; returns the broker's message id when known."""
        ...


# -- delayed redelivery ----------------------------------------------------------------------------


@runtime_checkable
class DelayingBackend(Protocol):
    """A backend that can redeliver a message after a delay, the wait held by the broker."""

    async def release_later(self, message: InboundMessage, delay: float) -> None:
        """Give ``message`` back to be delivered again no sooner than ``delay`` seconds from now.

        The current delivery is settled in the same step: once this returns, the consumer holds
        nothing for ``message`` and the broker keeps the wait. Should the process crash half-way,
        the message is delivered again (at worst twice, once early), never lost. The redelivery
        counts as a further delivery (its ``delivery_count`` is higher).

        Args:
            message: A delivery handed out by this backend and not settled yet.
            delay: Seconds to wait, ``>= 0``; a backend may round it up to a delay it supports
                (its documentation says how).

        Raises:
            ValueError: ``delay`` is negative or not finite.
            Exception: the broker did not take it; ``message`` is then not settled either.
        """
        ...
