"""One consumer of the RabbitMQ backend: a channel with a prefetch window, batched acks.

A :class:`QueueReader` backs one ``deliveries()`` (or ``consume()``) iterator. It opens a
robust channel of its own, sets ``basic.qos`` to the prefetch, and ``basic.consume``s every
configured queue on the channel's AMQP channel directly (aiormq's deliveries, without building
an aio-pika message and a second task per delivery), again after every reconnection.
Deliveries wait in a local deque until handed out. Acknowledgements from
:meth:`QueueReader.buffer_ack` are sent in batches: one ``basic.ack`` with ``multiple=True``
for the longest run of settled delivery tags from the start of the window, single acks for the
others, once a quarter of the prefetch window is waiting or after a short delay (20 ms).
A delivery of a channel that has closed (a lost connection) is never acknowledged: the broker
gives it to a consumer again, so it is dropped from the local state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from abe.backends.message_queue.base.extensions import InboundMessage

if TYPE_CHECKING:
    from aio_pika.abc import AbstractRobustChannel
    from aiormq.abc import DeliveredMessage

    from ._rabbitmq_settings import RabbitMQSettings

__all__ = ["COUNT_HEADER", "LOGGER_NAME", "QueueReader", "RabbitMQDeliveries", "to_inbound"]

LOGGER_NAME = "abe.backends.message_queue.service.rabbitmq"
"""Every module of the backend logs under this name."""

logger = logging.getLogger(LOGGER_NAME)

COUNT_HEADER = "x-abe-deliveries"
"""Header with the deliveries a message had before this copy was published (delayed copies)."""

_BROKER_HEADERS = frozenset(
    {
        "x-delivery-count",
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        COUNT_HEADER,
    }
)
"""Headers the broker (or the backend) adds: never shown as transport headers."""

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})

_ACK_DELAY = 0.02
"""Seconds a buffered acknowledgement may wait before it is sent on its own."""


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str | bytes):
        return 0
    try:
        return max(0, int(value))
    except ValueError:
        return 0


def channel_of(raw: DeliveredMessage) -> Any:
    """The open AMQP channel ``raw`` came on, or ``None`` once that channel has closed."""
    amqp = raw.channel
    return None if amqp.is_closed else amqp


def to_inbound(raw: DeliveredMessage, key: str, group: str | None, quorum: bool) -> InboundMessage:
    """The :class:`InboundMessage` of one AMQP delivery from queue ``key`` (its handle is
    ``raw``)."""
    properties = raw.header.properties
    amqp_headers = properties.headers
    headers: Mapping[str, str] = _NO_HEADERS
    carried = 0
    broker_count = 0
    if amqp_headers:
        kept: dict[str, str] = {}
        for name, value in amqp_headers.items():
            if name in _BROKER_HEADERS:
                if name == COUNT_HEADER:
                    carried = _count(value)
                elif name == "x-delivery-count":
                    broker_count = _count(value)
                continue
            if isinstance(value, bytes):
                kept[name] = value.decode("utf-8", "replace")
            elif isinstance(value, str | int | float | bool):
                kept[name] = str(value)
        if kept:
            headers = kept
    # Quorum queues count earlier deliveries; classic ones only flag a redelivery.
    redelivered = getattr(raw.delivery, "redelivered", False)
    count = carried + (broker_count + 1 if quorum else 2 if redelivered else 1)
    body = raw.body
    payload: dict[str, Any] = {}
    error: BaseException | None = None
    try:
        decoded = json.loads(body)
        if type(decoded) is dict:
            payload = decoded
        else:
            error = ValueError(f"the body is JSON {type(decoded).__name__}, not an object")
    except ValueError as exc:
        error = exc
    timestamp = properties.timestamp
    return InboundMessage(
        payload,
        key,
        properties.message_id,
        count,
        headers,
        timestamp.timestamp() if timestamp is not None else None,
        group,
        body if error is not None else None,
        error,
        raw,
        len(body),
    )


class QueueReader:
    """Reads the configured queues on a channel of its own.

    Args:
        channel: A robust channel opened for this reader (no publisher confirms needed).
        settings: The backend's settings.
        group: Reported as each delivery's ``group``.
        declare: Declares one queue on ``channel`` (the backend's topology).
    """

    def __init__(
        self,
        channel: AbstractRobustChannel | None,
        settings: RabbitMQSettings,
        group: str | None,
        declare: Callable[[AbstractRobustChannel, str], Awaitable[Any]],
    ) -> None:
        self.channel = channel
        self.settings = settings
        self.group = group
        self._declare = declare
        self._quorum = settings.queue_type == "quorum"
        self._ack_limit = max(1, settings.prefetch // 4)
        """Buffered acknowledgements sent at once (a quarter of the prefetch window)."""
        self.waiting: deque[InboundMessage] = deque()
        """Received and not handed out yet."""
        self.unsettled: dict[int, None] = {}
        """Delivery tags of the current AMQP channel not settled yet, in delivery order."""
        self.acks: list[int] = []
        """Delivery tags whose acknowledgement is buffered."""
        self._amqp: Any = None
        """The AMQP channel (aiormq) the tags belong to; a new one after a reconnection."""
        self._wakeup: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[None]] = set()
        self._started = False
        self.closed = False

    def owns(self, raw: DeliveredMessage) -> bool:
        """Whether ``raw`` came on this reader's current AMQP channel."""
        amqp = channel_of(raw)
        return amqp is not None and amqp is self._amqp

    async def start(self) -> None:
        """Set the prefetch window and start consuming every configured queue."""
        if self._started or self.channel is None:
            return
        self._started = True
        channel = self.channel
        await channel.set_qos(prefetch_count=self.settings.prefetch)  # restored on reopen
        for name in self.settings.queues:
            await self._declare(channel, name)  # declared again on reopen
        await self._consume()
        channel.reopen_callbacks.add(self._reopened)

    async def _consume(self) -> None:
        assert self.channel is not None
        amqp = await self.channel.get_underlay_channel()
        for name in self.settings.queues:
            await amqp.basic_consume(name, self._receiver(name), no_ack=False)

    async def _reopened(self, *args: Any) -> None:
        """Consume again on the AMQP channel that replaced a lost one."""
        if self.closed:
            return
        try:
            await self._consume()
        except Exception as exc:  # the connection went again: the next reopen retries
            logger.warning("Consuming again after a reconnection failed: %s", exc)

    def _receiver(self, key: str) -> Callable[[DeliveredMessage], Coroutine[Any, Any, None]]:
        async def receive(raw: DeliveredMessage) -> None:
            self.receive(raw, key)

        return receive

    def receive(self, raw: DeliveredMessage, key: str) -> None:
        """Take one delivery from the broker (called by aiormq's consumer callback)."""
        amqp = raw.channel
        if amqp is not self._amqp:
            # A new AMQP channel (after a reconnection): the old one's deliveries went back to
            # the queue with it and its tags mean nothing any more.
            self._amqp = amqp
            self.unsettled.clear()
            self.acks.clear()
            self.waiting = deque(m for m in self.waiting if channel_of(m.handle) is amqp)
        self.unsettled[raw.delivery.delivery_tag or 0] = None  # type: ignore[union-attr]
        self.waiting.append(to_inbound(raw, key, self.group, self._quorum))
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    def take_nowait(self) -> InboundMessage | None:
        """The next delivery if one is waiting (of a channel still open), else ``None``."""
        waiting = self.waiting
        while waiting:
            message = waiting.popleft()
            if channel_of(message.handle) is self._amqp:
                return message
        return None

    async def next(self) -> InboundMessage:
        """The next delivery, waiting for one."""
        while True:
            message = self.take_nowait()
            if message is not None:
                return message
            if self.closed:
                raise StopAsyncIteration
            loop = asyncio.get_running_loop()
            if self.acks and self._timer is None:
                self._timer = loop.call_later(_ACK_DELAY, self._send_acks)
            self._wakeup = loop.create_future()
            try:
                await self._wakeup
            finally:
                self._wakeup = None

    # -- settling --------------------------------------------------------------------------------

    def settle(self, message: InboundMessage) -> bool:
        """Forget ``message`` as unsettled; ``False`` when its channel has closed (the broker
        has already given it back to the queue, so nothing may be sent for it)."""
        raw = message.handle
        amqp = channel_of(raw)
        if amqp is None or amqp is not self._amqp:
            return False
        self.unsettled.pop(raw.delivery.delivery_tag, None)
        return True

    def buffer_ack(self, message: InboundMessage) -> None:
        """Buffer the acknowledgement of ``message``; sent in a batch soon."""
        if not self.settle(message):
            return
        self.acks.append(message.handle.delivery.delivery_tag)
        if len(self.acks) >= self._ack_limit:
            self._send_acks()
        elif self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(_ACK_DELAY, self._send_acks)

    def _send_acks(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        tags, self.acks = self.acks, []
        amqp = self._amqp
        if not tags or amqp is None or amqp.is_closed:
            return
        task = asyncio.get_running_loop().create_task(self._ack_tags(amqp, tags))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _ack_tags(self, amqp: Any, tags: list[int]) -> None:
        tags.sort()
        first_unsettled = next(iter(self.unsettled), None)
        run = [t for t in tags if first_unsettled is None or t < first_unsettled]
        try:
            if run:
                # Every tag up to run[-1] is settled: one frame acknowledges them all.
                await amqp.basic_ack(run[-1], multiple=True)
            for tag in tags[len(run) :]:
                await amqp.basic_ack(tag)
        except Exception as exc:
            # The channel closed: the broker requeued these deliveries; they come again.
            logger.warning("Acknowledgements lost with their channel (redelivered): %s", exc)

    async def flush(self) -> None:
        """Send buffered acknowledgements and wait until they are written."""
        self._send_acks()
        if self._flushing:
            await asyncio.wait(set(self._flushing))

    async def close(self) -> None:
        """Flush acknowledgements and close the channel (unsettled deliveries go back)."""
        if self.closed:
            return
        self.closed = True
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)
        with contextlib.suppress(Exception):
            await self.flush()
        self.waiting.clear()
        if self.channel is not None:
            with contextlib.suppress(Exception):
                await self.channel.close()


class RabbitMQDeliveries:
    """The iterator of ``RabbitMQBackend.deliveries()``, with :meth:`next_nowait`."""

    __slots__ = ("_reader", "_start", "next_nowait")

    def __init__(self, reader: QueueReader, start: Callable[[], Awaitable[None]]) -> None:
        self._reader = reader
        self._start: Callable[[], Awaitable[None]] | None = start
        self.next_nowait: Callable[[], InboundMessage | None] = reader.take_nowait
        """The next delivery if one is waiting, else ``None`` (no round trip)."""

    def __aiter__(self) -> RabbitMQDeliveries:
        return self

    async def __anext__(self) -> InboundMessage:
        if self._start is not None:
            start, self._start = self._start, None
            await start()
        return await self._reader.next()

    async def aclose(self) -> None:
        """Close the reader: flush acknowledgements; deliveries not settled go back."""
        await self._reader.close()
