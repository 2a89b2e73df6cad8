"""In-process message-queue backend for development, tests and the demo.

Messages live in process memory: they are lost when the process exits and are visible only to
consumers in the same process. Instances made with ``MemoryBackend()`` or ``from_env()`` share one
queue (the published behaviour); :meth:`MemoryBackend.isolated` gives a private queue, which is what
tests and the demo use.

Besides the plain protocol the backend implements the at-least-once extensions
(:class:`~abe.backends.message_queue.base.SettlingBackend`,
:class:`~abe.backends.message_queue.base.DeadLetteringBackend`,
:class:`~abe.backends.message_queue.base.HeaderPublishingBackend`): deliveries stay *unacked*
until settled, a released delivery comes back with its delivery count raised, and
:meth:`MemoryBackend.recover` hands back what a crashed consumer left unacked. It also implements
:class:`~abe.backends.message_queue.base.DelayingBackend`: :meth:`MemoryBackend.release_later`
settles a delivery and queues it again once a timer of the backend's ``clock`` fires (the event
loop's by default; a virtual clock makes the waits virtual too).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import math
import time
import warnings
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, ClassVar, Protocol

from abe.backends.message_queue.base.extensions import InboundMessage
from abe.types import ConsumerGroup, MessageQueueKey, MessageQueueMessage, MessageQueuePayload

__all__ = ["MemoryBackend", "MemoryChannel", "MemoryDeliveries"]


class TimerClock(Protocol):
    """What :meth:`MemoryBackend.release_later` needs of a clock: timers."""

    def call_later(self, seconds: float, callback: Callable[[], object]) -> object:
        """Run ``callback`` after ``seconds``."""
        ...


class _LoopTimers:
    """Timers on the running event loop (the default :class:`TimerClock`)."""

    def call_later(self, seconds: float, callback: Callable[[], object]) -> object:
        return asyncio.get_running_loop().call_later(seconds, callback)


class MemoryChannel:
    """The store behind one or more :class:`MemoryBackend` instances.

    Keeps one FIFO per key and a global sequence so that a consumer of several keys sees
    messages in publish order. Not bound to any event loop, so one channel can outlive a loop.
    """

    __slots__ = ("_queues", "_seq", "_unacked", "_waiters")

    def __init__(self) -> None:
        self._queues: dict[str, deque[tuple[int, InboundMessage]]] = {}
        self._seq = itertools.count(1)
        self._waiters: list[asyncio.Future[None]] = []
        self._unacked: dict[str, tuple[int, InboundMessage]] = {}

    def put(self, message: InboundMessage, seq: int | None = None, *, front: bool = False) -> None:
        """Queue ``message`` (at the front when redelivering) and wake the waiting consumers."""
        if seq is None:
            seq = next(self._seq)
        queue = self._queues.get(message.key)
        if queue is None:
            queue = self._queues[message.key] = deque()
        if front:
            queue.appendleft((seq, message))
        else:
            queue.append((seq, message))
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for fut in waiters:
                if not fut.done() and not fut.get_loop().is_closed():
                    fut.set_result(None)

    def next_id(self) -> int:
        """Return the next sequence number."""
        return next(self._seq)

    def pop_nowait(self, keys: frozenset[str] | None) -> tuple[int, InboundMessage] | None:
        """Remove and return the oldest message of ``keys`` (all when ``None``), or ``None``."""
        if keys is None and len(self._queues) == 1:
            for only in self._queues.values():
                return only.popleft() if only else None
        best: deque[tuple[int, InboundMessage]] | None = None
        queues: Iterable[deque[tuple[int, InboundMessage]] | None]
        queues = self._queues.values() if keys is None else (self._queues.get(k) for k in keys)
        for queue in queues:
            if queue and (best is None or queue[0][0] < best[0][0]):
                best = queue
        return None if best is None else best.popleft()

    async def get(self, keys: frozenset[str] | None) -> tuple[int, InboundMessage]:
        """Wait for and remove the oldest message of ``keys`` (all keys when ``None``)."""
        while True:
            item = self.pop_nowait(keys)
            if item is not None:
                return item
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                if not fut.done():
                    fut.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)

    def settle(self, message: InboundMessage) -> tuple[int, InboundMessage] | None:
        """Forget ``message`` as unacked; returns what was tracked, if anything."""
        if message.message_id is None:
            return None
        return self._unacked.pop(message.message_id, None)

    def size(self, key: str | None = None) -> int:
        """Messages waiting (not handed out) under ``key``, or under all keys."""
        if key is not None:
            return len(self._queues.get(key, ()))
        return sum(len(q) for q in self._queues.values())

    def peek(self, key: str) -> list[InboundMessage]:
        """The messages waiting under ``key``, oldest first, without removing them."""
        return [m for _, m in self._queues.get(key, ())]

    def unacked(self) -> list[InboundMessage]:
        """Deliveries handed out and not yet acked or released."""
        return [m for _, m in self._unacked.values()]

    def recover(self) -> int:
        """Requeue every unacked delivery, as a broker does for a dead consumer."""
        items = sorted(self._unacked.values(), key=lambda item: item[0], reverse=True)
        self._unacked.clear()
        for seq, message in items:
            redelivery = dataclasses.replace(
                message, delivery_count=message.delivery_count + 1, group=None
            )
            self.put(redelivery, seq, front=True)
        return len(items)


class MemoryDeliveries:
    """The iterator of :meth:`MemoryBackend.deliveries`.

    ``async for`` waits for messages; :meth:`next_nowait` takes one that is ready without
    waiting (the consumer's fast path while a backlog is queued). Either way the delivery is
    recorded as unacked before it is handed out.
    """

    __slots__ = ("_channel", "_group", "_keys", "_unacked")

    def __init__(
        self, channel: MemoryChannel, keys: frozenset[str] | None, group: ConsumerGroup
    ) -> None:
        self._channel = channel
        self._keys = keys
        self._group = group
        self._unacked = channel._unacked

    def __aiter__(self) -> MemoryDeliveries:
        return self

    async def __anext__(self) -> InboundMessage:
        item = self._channel.pop_nowait(self._keys)
        if item is None:
            item = await self._channel.get(self._keys)
        return self._track(item)

    def next_nowait(self) -> InboundMessage | None:
        """The next delivery if one is queued now (recorded as unacked), else ``None``."""
        item = self._channel.pop_nowait(self._keys)
        if item is None:
            return None
        if self._group is not None:
            return self._track(item)
        self._unacked[item[1].message_id] = item  # type: ignore[index]  # _track, inlined
        return item[1]

    def _track(self, item: tuple[int, InboundMessage]) -> InboundMessage:
        seq, message = item
        if self._group is not None:
            message = dataclasses.replace(message, group=self._group)
        self._unacked[message.message_id] = (seq, message)  # type: ignore[index]
        return message

    async def aclose(self) -> None:
        """Nothing to release: undelivered messages stay queued."""


class MemoryBackend:
    """In-memory message-queue backend (development and tests only).

    Args:
        channel: The store to use. ``None`` means the process-wide shared store, which is what
            ``MemoryBackend()`` and :meth:`from_env` give (the published behaviour).
        keys: Keys that :meth:`consume` and :meth:`deliveries` read. ``None`` (the default) reads
            every key, as the published backend does; naming keys keeps, for example, a
            ``<key>.dlq`` destination away from the consumer that dead-letters into it.
        clock: Timers for :meth:`release_later` (anything with ``call_later(seconds,
            callback)``, such as :class:`resilience.clock.FakeClock`); the running event loop's
            by default.
    """

    _shared: ClassVar[MemoryChannel] = MemoryChannel()

    def __init__(
        self,
        channel: MemoryChannel | None = None,
        *,
        keys: Iterable[MessageQueueKey] | None = None,
        clock: TimerClock | None = None,
    ) -> None:
        self.clock: TimerClock = clock if clock is not None else _LoopTimers()
        self._delayed: dict[int, InboundMessage] = {}
        self.channel = channel if channel is not None else MemoryBackend._shared
        if isinstance(keys, str):
            raise TypeError("keys must be an iterable of key names, not a single string")
        self.keys: frozenset[str] | None = None if keys is None else frozenset(keys)
        if self.keys is not None and not self.keys:
            raise ValueError("keys must name at least one key, or be None for every key")

    @classmethod
    def from_env(cls) -> MemoryBackend:
        """Return a backend on the shared in-process queue (warns: development only)."""
        warnings.warn(
            "MemoryBackend is for development and testing only: messages are lost on restart "
            "and are visible only to consumers in the same process.",
            UserWarning,
            stacklevel=2,
        )
        return cls()

    @classmethod
    def isolated(
        cls, *, keys: Iterable[MessageQueueKey] | None = None, clock: TimerClock | None = None
    ) -> MemoryBackend:
        """Return a backend with a private queue of its own."""
        return cls(MemoryChannel(), keys=keys, clock=clock)

    @classmethod
    def reset_shared(cls) -> None:
        """Drop everything in the process-wide shared queue (for tests)."""
        cls._shared = MemoryChannel()

    def view(self, *, keys: Iterable[MessageQueueKey] | None = None) -> MemoryBackend:
        """Another backend on the same store that reads ``keys`` (same clock)."""
        return MemoryBackend(self.channel, keys=keys, clock=self.clock)

    # -- plain protocol ------------------------------------------------------------------------

    async def publish(self, key: MessageQueueKey, payload: MessageQueuePayload) -> None:
        """Queue ``payload`` under ``key``."""
        await self.publish_message(key, payload)

    async def consume(self, *, group: ConsumerGroup = None) -> AsyncIterator[MessageQueueMessage]:
        """Yield payloads in publish order until cancelled (at-most-once; ``group`` ignored)."""
        channel = self.channel
        keys = self.keys
        while True:
            item = channel.pop_nowait(keys)
            _, message = item if item is not None else await channel.get(keys)
            yield message.payload

    # -- extensions -----------------------------------------------------------------------------

    async def publish_message(
        self,
        key: MessageQueueKey,
        payload: MessageQueuePayload,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> str | None:
        """Queue ``payload`` with ``headers``; returns the message id."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"key must be a non-empty string, got {key!r}")
        if not isinstance(payload, dict):
            raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
        seq = self.channel.next_id()
        message = InboundMessage(
            payload=payload,
            key=key,
            message_id=str(seq),
            headers=dict(headers) if headers else {},
            enqueued_at=time.time(),
        )
        self.channel.put(message, seq)
        return message.message_id

    def deliveries(self, *, group: ConsumerGroup = None) -> MemoryDeliveries:
        """Deliveries that stay unacked until :meth:`ack` or :meth:`release`, in publish order,
        until cancelled (the iterator also offers ``next_nowait()``)."""
        return MemoryDeliveries(self.channel, self.keys, group)

    async def ack(self, message: InboundMessage) -> None:
        """Settle ``message`` as done."""
        self.channel.settle(message)

    def ack_nowait(self, message: InboundMessage) -> None:
        """:meth:`ack` without a coroutine (the in-memory ack is synchronous anyway)."""
        self.channel._unacked.pop(message.message_id, None)  # type: ignore[arg-type]

    async def release(self, message: InboundMessage) -> None:
        """Give ``message`` back: it is redelivered first, with its delivery count raised."""
        tracked = self.channel.settle(message)
        if tracked is None:
            return
        seq, _ = tracked
        redelivery = dataclasses.replace(
            message, delivery_count=message.delivery_count + 1, group=None
        )
        self.channel.put(redelivery, seq, front=True)

    async def release_later(self, message: InboundMessage, delay: float) -> None:
        """Settle ``message`` and queue it again, delivery count raised, after ``delay`` seconds
        on the backend's clock (at the back of its key's queue, like a new message).

        Waiting messages live in this process only (see :meth:`delayed`): like every message of
        this backend they are lost if the process exits.

        Raises:
            ValueError: ``delay`` is negative or not finite.
        """
        if not (isinstance(delay, int | float) and math.isfinite(delay) and delay >= 0):
            raise ValueError(f"delay must be a finite number of seconds >= 0, got {delay!r}")
        tracked = self.channel.settle(message)
        if tracked is None and message.message_id is not None:
            return  # already settled: another release_later or ack got there first
        seq = self.channel.next_id()
        redelivery = dataclasses.replace(
            message,
            delivery_count=message.delivery_count + 1,
            group=None,
            headers=dict(message.headers),
        )
        self._delayed[seq] = redelivery

        def due() -> None:
            ready = self._delayed.pop(seq, None)
            if ready is not None:
                self.channel.put(ready, seq)

        self.clock.call_later(float(delay), due)

    def delayed(self) -> list[InboundMessage]:
        """Messages :meth:`release_later` holds until their delay is over."""
        return list(self._delayed.values())

    async def dead_letter(
        self,
        message: InboundMessage,
        destination: MessageQueueKey,
        record: Mapping[str, Any],
    ) -> str | None:
        """Queue ``record`` under ``destination`` and ack ``message`` in one step."""
        record_id = await self.publish_message(destination, dict(record))
        self.channel.settle(message)
        return record_id

    # -- introspection ---------------------------------------------------------------------------

    def size(self, key: MessageQueueKey | None = None) -> int:
        """Messages waiting under ``key`` (or all keys), not counting unacked deliveries."""
        return self.channel.size(key)

    def peek(self, key: MessageQueueKey) -> list[InboundMessage]:
        """Messages waiting under ``key``, oldest first."""
        return self.channel.peek(key)

    def unacked(self) -> list[InboundMessage]:
        """Deliveries handed out and not yet settled."""
        return self.channel.unacked()

    def recover(self) -> int:
        """Requeue all unacked deliveries (what a broker does when a consumer dies)."""
        return self.channel.recover()
