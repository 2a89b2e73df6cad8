"""RabbitMQ backend on aio-pika: at-least-once delivery, confirmed dead letters, broker-held delays.

Many consumer processes share the messages of durable queues::

    backend = RabbitMQBackend("amqp://guest:guest@localhost:5672/", queues=["orders"])
    await backend.publish("orders", {"id": 7})
    async for message in backend.deliveries():      # at-least-once: ack when done
        ...
        await backend.ack(message)

Guarantees (see ``docs/rabbitmq.md``):

* Publishing waits for the broker's confirm (``mandatory``: an unroutable message is an error,
  never silently dropped). Queues are durable quorum queues by default, so the broker counts
  deliveries (``x-delivery-count``) and the count feeds the attempt limit.
* A delivery is acknowledged only when the consumer settles it (acks are batched, one
  ``multiple`` ack for a run of settled tags); the prefetch window bounds what a consumer holds.
  Deliveries of a consumer that dies or loses its connection go back to the queue.
* Dead-lettering publishes the record to the dead-letter exchange and waits for the confirm
  before the original is acknowledged: a crash in between makes a duplicate at worst.
* Delayed redelivery publishes a copy to a TTL queue ``<queue>.delay.<ms>`` that dead-letters
  back to the work queue when the time is up (no plugin), then acknowledges the original.
* The connection is robust: after a lost connection or a broker restart it reconnects and
  consuming resumes by itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import replace
from datetime import timedelta
from typing import Any, NoReturn

try:
    import aio_pika
    import aiormq
    from aio_pika.abc import (
        AbstractRobustChannel,
        AbstractRobustConnection,
        AbstractRobustExchange,
        AbstractRobustQueue,
    )
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "The RabbitMQ backend needs aio-pika: install it with "
        "`pip install 'abe-resilience[rabbitmq]'`"
    ) from exc

from abe.backends.message_queue.base.extensions import InboundMessage
from abe.types import ConsumerGroup, MessageQueueKey, MessageQueueMessage, MessageQueuePayload

from ._rabbitmq_reader import COUNT_HEADER, LOGGER_NAME, QueueReader, RabbitMQDeliveries
from ._rabbitmq_settings import DEFAULT_QUEUES, DEFAULT_URL, RabbitMQSettings
from ._settings_common import redact

__all__ = [
    "DEFAULT_QUEUES",
    "DEFAULT_URL",
    "RabbitMQBackend",
    "RabbitMQBackendError",
    "RabbitMQSettings",
    "RabbitMQUnavailableError",
]

logger = logging.getLogger(LOGGER_NAME)

_dumps = json.JSONEncoder(separators=(",", ":")).encode

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)
"""Errors of a broker that cannot be reached (or a connection being re-established)."""


class RabbitMQBackendError(Exception):
    """A RabbitMQ operation failed; the aio-pika error is the ``__cause__``."""


class RabbitMQUnavailableError(RabbitMQBackendError, ConnectionError):
    """RabbitMQ could not be reached or did not confirm in time (a transient failure)."""


class RabbitMQBackend:
    """Message-queue backend on RabbitMQ (AMQP 0-9-1 through aio-pika), at least once.

    Implements the plain ``publish`` / ``consume`` protocol and the extensions
    :class:`~abe.backends.message_queue.base.SettlingBackend`,
    :class:`~abe.backends.message_queue.base.DeadLetteringBackend`,
    :class:`~abe.backends.message_queue.base.HeaderPublishingBackend` and
    :class:`~abe.backends.message_queue.base.DelayingBackend`.

    A key is a queue name: publishing goes through the default exchange with the queue name as
    routing key, and the queue is declared (durable, ``queue_type``) on first use.

    Args:
        url: ``amqp://user:password@host:port/vhost`` (default
            ``amqp://guest:guest@localhost:5672/``).
        queues: Queues that ``consume()`` and ``deliveries()`` read (default ``("events",)``).
        prefetch: Unacknowledged deliveries in flight per consumer (default 200).
        queue_type: ``"quorum"`` (default) or ``"classic"``.
        delivery_limit: Quorum queues: deliveries after which the broker dead-letters a message
            itself (default: none).
        dead_letter_exchange: Exchange dead letters go to (default ``"abe.dlx"``).
        delay_tiers: Delays (seconds) of the TTL queues for delayed redelivery.
        settings: Ready :class:`RabbitMQSettings`; the other arguments override its fields.

    Raises:
        ValueError: an invalid setting (the message names it and what is allowed).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        queues: Iterable[str] | None = None,
        prefetch: int | None = None,
        queue_type: str | None = None,
        delivery_limit: int | None = None,
        dead_letter_exchange: str | None = None,
        delay_tiers: Iterable[float] | None = None,
        settings: RabbitMQSettings | None = None,
    ) -> None:
        if isinstance(queues, str):
            raise TypeError("queues must be an iterable of queue names, not a single string")
        overrides: dict[str, Any] = {
            name: value
            for name, value in (
                ("url", url),
                ("queues", None if queues is None else tuple(queues)),
                ("prefetch", prefetch),
                ("queue_type", queue_type),
                ("delivery_limit", delivery_limit),
                ("dead_letter_exchange", dead_letter_exchange),
                ("delay_tiers", None if delay_tiers is None else tuple(delay_tiers)),
            )
            if value is not None
        }
        self._settings = (
            replace(settings, **overrides)
            if settings is not None
            else RabbitMQSettings(**overrides)
        )
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._connecting = asyncio.Lock()
        self._declared: dict[str, AbstractRobustQueue] = {}
        self._dlx: AbstractRobustExchange | None = None
        self._bound: set[str] = set()
        self._readers: weakref.WeakSet[QueueReader] = weakref.WeakSet()
        self._closed = False

    @classmethod
    def from_env(cls) -> RabbitMQBackend:
        """Create a backend from ``RABBITMQ_*`` environment variables.

        ``RABBITMQ_URL``, ``RABBITMQ_QUEUES`` (comma-separated), ``RABBITMQ_PREFETCH``,
        ``RABBITMQ_QUEUE_TYPE``, ``RABBITMQ_DELIVERY_LIMIT``, ``RABBITMQ_DEAD_LETTER_EXCHANGE``
        and ``RABBITMQ_DELAY_TIERS`` (comma-separated seconds).

        Returns:
            The backend (it connects on first use).

        Raises:
            ValueError: a variable is invalid; the message names it, its value and what is
                allowed.
        """
        return cls(settings=RabbitMQSettings.from_environ())

    @property
    def settings(self) -> RabbitMQSettings:
        """The validated settings."""
        return self._settings

    # -- connection and topology -----------------------------------------------------------------

    async def _channel(self) -> AbstractRobustChannel:
        """The publishing channel (publisher confirms on), connecting on first use."""
        publisher = self._publisher
        if publisher is not None:
            return publisher
        if self._closed:
            raise RuntimeError("the RabbitMQ backend is closed")
        async with self._connecting:
            if self._publisher is None:
                try:
                    async with asyncio.timeout(self._settings.command_timeout):
                        connection = await aio_pika.connect_robust(
                            self._settings.url,
                            reconnect_interval=self._settings.reconnect_interval,
                            client_properties={"connection_name": "abe-resilience"},
                        )
                except Exception as exc:
                    self._fail("connecting", exc)
                self._connection = connection
                channel = await connection.channel(publisher_confirms=True)
                self._publisher = channel
        assert self._publisher is not None
        return self._publisher

    def queue_arguments(self, name: str) -> dict[str, Any]:
        """The ``x-`` arguments work queue ``name`` is declared with.

        Every process must declare a queue with the same arguments (RabbitMQ refuses a
        redeclaration that differs), so they follow from the settings alone.
        """
        s = self._settings
        if s.queue_type == "classic":
            return {}
        arguments: dict[str, Any] = {"x-queue-type": "quorum"}
        if s.delivery_limit is not None:
            arguments["x-delivery-limit"] = s.delivery_limit
            arguments["x-dead-letter-exchange"] = s.dead_letter_exchange
            arguments["x-dead-letter-routing-key"] = f"{name}.dlq"
        return arguments

    def _delay_arguments(self, key: str, tier: float) -> dict[str, Any]:
        arguments: dict[str, Any] = {
            "x-message-ttl": _millis(tier),
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": key,
        }
        if self._settings.queue_type == "quorum":
            # Expired messages move with a confirm between the queues (no loss on a crash).
            arguments |= {
                "x-queue-type": "quorum",
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            }
        return arguments

    async def _declare(
        self,
        channel: AbstractRobustChannel,
        name: str,
        arguments: dict[str, Any] | None = None,
    ) -> AbstractRobustQueue:
        queue = await channel.declare_queue(
            name,
            durable=True,
            arguments=self.queue_arguments(name) if arguments is None else arguments,
        )
        if self._settings.delivery_limit is not None and arguments is None:
            await self._bind_dead_letters(f"{name}.dlq")
        return queue

    async def _ensure(self, name: str, arguments: dict[str, Any] | None = None) -> None:
        if name not in self._declared:
            channel = await self._channel()
            self._declared[name] = await self._declare(channel, name, arguments)

    async def _bind_dead_letters(self, destination: str) -> AbstractRobustExchange:
        channel = await self._channel()
        if self._dlx is None:
            self._dlx = await channel.declare_exchange(
                self._settings.dead_letter_exchange, aio_pika.ExchangeType.DIRECT, durable=True
            )
        assert self._dlx is not None
        if destination not in self._bound:
            # A dead-letter queue has no delivery limit and dead-letters nowhere itself.
            arguments = {"x-queue-type": "quorum"} if self._settings.queue_type == "quorum" else {}
            queue = await channel.declare_queue(destination, durable=True, arguments=arguments)
            await queue.bind(self._dlx, routing_key=destination)
            self._bound.add(destination)
        return self._dlx

    # -- publishing ------------------------------------------------------------------------------

    async def publish(self, key: MessageQueueKey, payload: MessageQueuePayload) -> None:
        """Publish ``payload`` to queue ``key`` and wait for the broker's confirm.

        Raises:
            TypeError: ``payload`` is not a JSON-serialisable dict.
            ValueError: ``key`` is empty.
            RabbitMQUnavailableError: the broker could not be reached or did not confirm.
            RabbitMQBackendError: the broker refused the message.
        """
        await self.publish_message(key, payload)

    async def publish_message(
        self,
        key: MessageQueueKey,
        payload: MessageQueuePayload,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> str | None:
        """Publish ``payload`` with AMQP ``headers`` to queue ``key`` (confirmed).

        Returns:
            The ``message_id`` property given to the message.

        Raises:
            TypeError: ``payload`` is not a JSON-serialisable dict, or a header is not a string.
            ValueError: ``key`` is empty.
            RabbitMQUnavailableError: the broker could not be reached or did not confirm.
            RabbitMQBackendError: the broker refused the message.
        """
        _check_key(key)
        message = _message(_encode(payload), headers)
        await self._publish("", key, message)
        return message.message_id

    async def publish_many(
        self,
        key: MessageQueueKey,
        payloads: Iterable[MessageQueuePayload],
        *,
        headers: Mapping[str, str] | None = None,
    ) -> list[str]:
        """Publish many payloads to queue ``key``, confirms awaited together.

        Every payload is encoded before anything is sent, so an invalid one publishes nothing.

        Returns:
            The message ids, in order.

        Raises:
            TypeError: a payload is not a JSON-serialisable dict.
            ValueError: ``key`` is empty.
            RabbitMQUnavailableError: the broker could not be reached or did not confirm
                (some messages may have been published).
            RabbitMQBackendError: the broker refused a message.
        """
        _check_key(key)
        messages = [_message(_encode(p), headers) for p in payloads]
        await self._ensure(key)
        for start in range(0, len(messages), 1000):
            chunk = messages[start : start + 1000]
            await asyncio.gather(*(self._publish("", key, m) for m in chunk))
        return [m.message_id or "" for m in messages]

    async def _publish(
        self,
        exchange: str,
        routing_key: str,
        message: aio_pika.Message,
        arguments: dict[str, Any] | None = None,
    ) -> None:
        """Publish with confirm; a lost connection is waited out once (then it is an error)."""
        if exchange == "":
            await self._ensure(routing_key, arguments)
        deadline = time.monotonic() + self._settings.command_timeout
        for attempt in (1, 2):
            channel = await self._channel()
            target = (
                channel.default_exchange
                if exchange == ""
                else await self._bind_dead_letters(routing_key)
            )
            try:
                async with asyncio.timeout(max(0.01, deadline - time.monotonic())):
                    await target.publish(message, routing_key=routing_key, mandatory=True)
                return
            except aio_pika.exceptions.DeliveryError as exc:
                self._fail(f"publishing to {routing_key!r} (returned by the broker)", exc)
            except _UNAVAILABLE as exc:
                if attempt == 2 or time.monotonic() >= deadline:
                    self._fail(f"publishing to {routing_key!r}", exc)
                await self._await_connected(deadline)

    async def _await_connected(self, deadline: float) -> None:
        connection = self._connection
        if connection is None:
            return
        try:
            async with asyncio.timeout(max(0.01, deadline - time.monotonic())):
                await connection.connected.wait()
        except TimeoutError:
            return

    # -- consuming -------------------------------------------------------------------------------

    async def consume(self, *, group: ConsumerGroup = None) -> AsyncIterator[MessageQueueMessage]:
        """Yield payloads from the configured queues.

        A delivery is acknowledged once the caller asks for the next one (its handler has
        returned); one handed out when the iterator is closed, or whose process died, is
        delivered again. An undecodable body is logged and moved, as it is, to the dead-letter
        queue ``<queue>.dlq``. ``group`` is accepted for the protocol: consumers of a queue
        always share its messages.
        """
        deliveries = self.deliveries(group=group)
        try:
            async for message in deliveries:
                if message.decode_error is None:
                    yield message.payload
                    await self.ack(message)
                else:
                    logger.error(
                        "Moving undecodable message %s of %r to %r: %s",
                        message.message_id,
                        message.key,
                        f"{message.key}.dlq",
                        message.decode_error,
                    )
                    await self._park(message)
        finally:
            await deliveries.aclose()

    def deliveries(self, *, group: ConsumerGroup = None) -> RabbitMQDeliveries:
        """Yield deliveries (``InboundMessage``) that stay unacknowledged until settled.

        Each iterator consumes on a channel of its own with the configured prefetch. Messages
        that cannot be decoded are yielded with ``decode_error`` set and the body in ``raw``.
        ``group`` is only reported on the deliveries.
        """
        if self._closed:
            raise RuntimeError("the RabbitMQ backend is closed")
        if group is not None and (not isinstance(group, str) or not group):
            raise ValueError(f"group must be a non-empty string or None, got {group!r}")

        async def start() -> None:
            await self._channel()
            assert self._connection is not None
            channel: AbstractRobustChannel = await self._connection.channel(
                publisher_confirms=False
            )
            reader.channel = channel
            await reader.start()

        reader = QueueReader(None, self._settings, group, self._declare)
        self._readers.add(reader)
        return RabbitMQDeliveries(reader, start)

    # -- settling --------------------------------------------------------------------------------

    async def ack(self, message: InboundMessage) -> None:
        """Acknowledge ``message`` (batched: sent within a few milliseconds).

        A delivery whose channel has closed meanwhile is not acknowledged; the broker has put
        it back and delivers it again.
        """
        self.ack_nowait(message)

    def ack_nowait(self, message: InboundMessage) -> None:
        """:meth:`ack` without a coroutine: buffer the acknowledgement of ``message``."""
        reader = self._reader_of(message)
        if reader is not None:
            reader.buffer_ack(message)

    async def release(self, message: InboundMessage) -> None:
        """Give ``message`` back at once (``basic.nack`` with ``requeue``).

        Its next delivery counts one more (``x-delivery-count`` on quorum queues).
        """
        reader = self._reader_of(message)
        if reader is None or not reader.settle(message):
            return
        raw = message.handle
        try:
            await raw.channel.basic_nack(raw.delivery.delivery_tag, requeue=True)
        except _UNAVAILABLE as exc:
            logger.warning("Releasing %s: channel lost, redelivered anyway: %s", message.key, exc)

    async def release_later(self, message: InboundMessage, delay: float | timedelta) -> None:
        """Have ``message`` delivered again after ``delay`` (rounded up to a delay tier).

        A copy (same body, headers and ``message_id``, with the deliveries so far in
        ``x-abe-deliveries``) is published with confirm to the TTL queue
        ``<queue>.delay.<ms>``, which dead-letters it back to ``<queue>`` when it expires; the
        original is then acknowledged. A crash in between delivers it twice, never zero times.

        Raises:
            ValueError: ``delay`` is negative or not finite.
            RabbitMQUnavailableError: the copy was not confirmed; the original is not settled.
        """
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"delay must be a finite number of seconds >= 0, got {delay!r}")
        tier = self._settings.tier_for(seconds)
        raw = message.handle
        properties = raw.header.properties
        headers = dict(properties.headers or {})
        headers.pop("x-delivery-count", None)
        headers.pop("x-death", None)
        headers[COUNT_HEADER] = message.delivery_count
        copy = aio_pika.Message(
            raw.body,
            headers=headers,
            content_type=properties.content_type or "application/json",
            message_id=properties.message_id,
            timestamp=properties.timestamp,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        queue = f"{message.key}.delay.{_millis(tier)}"
        await self._publish("", queue, copy, self._delay_arguments(message.key, tier))
        self.ack_nowait(message)

    async def dead_letter(
        self,
        message: InboundMessage,
        destination: MessageQueueKey,
        record: Mapping[str, Any],
    ) -> str | None:
        """Publish ``record`` to queue ``destination`` through the dead-letter exchange, wait
        for the confirm, then acknowledge ``message``.

        ``destination`` is declared and bound to the exchange under its own name. The record
        is the JSON body; the message's headers travel along. A crash between the confirm and
        the acknowledgement delivers ``message`` again (a duplicate dead letter at worst).

        Returns:
            The ``message_id`` of the dead-letter message (the record's ``id`` when it has one).

        Raises:
            TypeError: ``record`` is not JSON-serialisable.
            ValueError: ``destination`` is empty.
            RabbitMQUnavailableError: the broker did not confirm; ``message`` is not settled.
        """
        _check_key(destination)
        body = _encode(record)
        dead = _message(body, message.headers or None)
        record_id = record.get("id")
        if isinstance(record_id, str) and record_id:
            dead.message_id = record_id
        await self._publish(self._settings.dead_letter_exchange, destination, dead)
        self.ack_nowait(message)
        return dead.message_id

    async def _park(self, message: InboundMessage) -> None:
        raw = message.handle
        properties = raw.header.properties
        dead = aio_pika.Message(
            raw.body,
            headers={
                **(properties.headers or {}),
                "x-abe-decode-error": str(message.decode_error),
            },
            content_type=properties.content_type,
            message_id=properties.message_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await self._publish(self._settings.dead_letter_exchange, f"{message.key}.dlq", dead)
        self.ack_nowait(message)

    def _reader_of(self, message: InboundMessage) -> QueueReader | None:
        raw = message.handle
        if raw is None:
            raise ValueError("the message did not come from a RabbitMQ backend's deliveries()")
        for reader in self._readers:
            if reader.owns(raw):
                return reader
        return None

    # -- operations ------------------------------------------------------------------------------

    async def queue_depth(self, key: MessageQueueKey) -> int:
        """Messages ready in queue ``key`` (not counting unacknowledged ones; 0 when the queue
        does not exist).

        Raises:
            RabbitMQUnavailableError: the broker could not be asked.
        """
        return (await self._inspect(key))[0]

    async def consumer_count(self, key: MessageQueueKey) -> int:
        """Consumers attached to queue ``key`` (0 when the queue does not exist).

        Raises:
            RabbitMQUnavailableError: the broker could not be asked.
        """
        return (await self._inspect(key))[1]

    async def _inspect(self, key: str) -> tuple[int, int]:
        await self._channel()
        assert self._connection is not None
        try:
            # A passive declaration of a missing queue closes its channel: use a spare one.
            channel = await self._connection.channel(publisher_confirms=False)
        except Exception as exc:
            self._fail(f"inspecting {key!r}", exc)
        try:
            queue = await channel.declare_queue(key, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return 0, 0
        except Exception as exc:
            self._fail(f"inspecting {key!r}", exc)
        finally:
            if not channel.is_closed:
                await channel.close()
        result = queue.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)

    async def flush(self) -> None:
        """Send every buffered acknowledgement now."""
        for reader in list(self._readers):
            await reader.flush()

    async def aclose(self) -> None:
        """Flush acknowledgements, close every reader and the connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for reader in list(self._readers):
            await reader.close()
        if self._connection is not None:
            await self._connection.close()

    async def close(self) -> None:
        """Same as :meth:`aclose`."""
        await self.aclose()

    async def __aenter__(self) -> RabbitMQBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        s = self._settings
        return f"RabbitMQBackend(url={redact(s.url)!r}, queues={list(s.queues)!r})"

    def _fail(self, what: str, exc: BaseException) -> NoReturn:
        text = f"{what} on {redact(self._settings.url)} failed: {type(exc).__name__}: {exc}"
        if isinstance(exc, _UNAVAILABLE):
            raise RabbitMQUnavailableError(text) from exc
        raise RabbitMQBackendError(text) from exc


def _millis(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _check_key(key: object) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"key must be a non-empty string, got {key!r}")


def _encode(payload: Mapping[str, Any]) -> bytes:
    if not isinstance(payload, Mapping):
        raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
    try:
        return _dumps(payload).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(f"payload is not JSON-serialisable: {exc}") from exc


def _message(body: bytes, headers: Mapping[str, str] | None) -> aio_pika.Message:
    if headers:
        for name, value in headers.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise TypeError(f"header {name!r} must map a string to a string, got {value!r}")
    return aio_pika.Message(
        body,
        headers=dict(headers) if headers else None,
        content_type="application/json",
        message_id=uuid.uuid4().hex,
        timestamp=time.time(),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
